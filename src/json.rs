//! JSON written by hand, as it goes: the stats pages, the state files and
//! the tracker requests are fixed shapes of numbers and strings, so they
//! need no tree of values nor serde's serializer (nor its float printer).

use std::fmt::Write as _;

use serde_json::Value;

/// A JSON text written as it goes: the stats pages are a fixed shape of
/// numbers and a few strings, so they need no tree of values. Keys are
/// written in the order given (the pages keep them sorted).
pub struct Json {
    pub out: String,
    /// No comma before the next item: just after `{`, `[` or a key.
    fresh: bool,
}

impl Default for Json {
    fn default() -> Json {
        Json::new()
    }
}

impl Json {
    pub fn new() -> Json {
        Json {
            out: String::with_capacity(1024),
            fresh: true,
        }
    }

    fn item(&mut self) {
        if !self.fresh {
            self.out.push(',');
        }
        self.fresh = false;
    }

    /// A key of the open object; its value comes next.
    pub fn key(&mut self, key: &str) -> &mut Json {
        self.item();
        self.quoted_into(key);
        self.out.push(':');
        self.fresh = true;
        self
    }

    pub fn open(&mut self) -> &mut Json {
        self.item();
        self.out.push('{');
        self.fresh = true;
        self
    }

    pub fn close(&mut self) -> &mut Json {
        self.out.push('}');
        self.fresh = false;
        self
    }

    pub fn open_list(&mut self) -> &mut Json {
        self.item();
        self.out.push('[');
        self.fresh = true;
        self
    }

    pub fn close_list(&mut self) -> &mut Json {
        self.out.push(']');
        self.fresh = false;
        self
    }

    pub fn str(&mut self, value: &str) -> &mut Json {
        self.item();
        self.quoted_into(value);
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Json {
        self.item();
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn opt_u64(&mut self, value: Option<u64>) -> &mut Json {
        match value {
            Some(value) => self.u64(value),
            None => self.null(),
        }
    }

    /// A finite number, `null` otherwise (as serde_json writes them).
    pub fn f64(&mut self, value: f64) -> &mut Json {
        if !value.is_finite() {
            return self.null();
        }
        self.item();
        let _ = write!(self.out, "{value:?}");
        self
    }

    pub fn bool(&mut self, value: bool) -> &mut Json {
        self.item();
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    pub fn null(&mut self) -> &mut Json {
        self.item();
        self.out.push_str("null");
        self
    }

    /// A string with the escapes serde_json writes.
    fn quoted_into(&mut self, value: &str) {
        self.out.push('"');
        for c in value.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if c < ' ' => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A JSON string: `text` quoted and escaped as serde_json writes it.
pub fn quoted(text: &str) -> String {
    let mut json = Json::new();
    json.str(text);
    json.out
}

/// `value` written as serde_json's `Display` writes it (compact), for
/// error messages.
pub fn shown(value: &Value) -> String {
    let mut json = Json::new();
    json.value(value);
    json.out
}

impl Json {
    /// Any value, as serde_json writes it (compact, keys in the map's order).
    pub fn value(&mut self, value: &Value) -> &mut Json {
        match value {
            Value::Null => self.null(),
            Value::Bool(b) => self.bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => self.u64(u),
                (None, Some(i)) => {
                    self.item();
                    let _ = write!(self.out, "{i}");
                    self
                }
                (None, None) => self.f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => self.str(s),
            Value::Array(items) => {
                self.open_list();
                for item in items {
                    self.value(item);
                }
                self.close_list()
            }
            Value::Object(map) => {
                self.open();
                for (k, v) in map {
                    self.key(k).value(v);
                }
                self.close()
            }
        }
    }
}

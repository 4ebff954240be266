//! A config file's values, read with toml's own parser (`DeTable`) and
//! kept in a small owned form. Going through toml's serde `Value` would
//! link serde's deserializer machinery for a file read once at start.

use std::borrow::Cow;
use std::ops::Range;

use ::toml::de::{DeTable, DeValue};

/// A table's entries, in key order (as toml's own table keeps them).
pub type Table = Vec<(String, Value)>;

/// A TOML value; a datetime keeps only its kind (no option takes one).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    String(String),
    Integer(i128),
    Float(f64),
    Boolean(bool),
    Datetime,
    Array(Vec<Value>),
    Table(Table),
}

impl Value {
    /// The kind's name, as TOML calls it ("string", "integer", ...).
    pub fn type_str(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Integer(_) => "integer",
            Value::Float(_) => "float",
            Value::Boolean(_) => "boolean",
            Value::Datetime => "datetime",
            Value::Array(_) => "array",
            Value::Table(_) => "table",
        }
    }

    pub fn as_table(&self) -> Option<&Table> {
        match self {
            Value::Table(table) => Some(table),
            _ => None,
        }
    }
}

/// The value of `key` in `table`.
pub fn get<'t>(table: &'t Table, key: &str) -> Option<&'t Value> {
    table.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Parses a TOML document. An error names the line and column.
pub fn parse(text: &str) -> Result<Table, String> {
    let table = DeTable::parse(text).map_err(|e| e.to_string())?;
    table_of(text, table.into_inner())
}

fn table_of(text: &str, table: DeTable<'_>) -> Result<Table, String> {
    table
        .into_iter()
        .map(|(key, value)| {
            let span = value.span();
            let value = value_of(text, span, value.into_inner())?;
            Ok((key.into_inner().into_owned(), value))
        })
        .collect()
}

fn value_of(text: &str, span: Range<usize>, value: DeValue<'_>) -> Result<Value, String> {
    Ok(match value {
        DeValue::String(s) => Value::String(Cow::into_owned(s)),
        DeValue::Integer(n) => match i128::from_str_radix(n.as_str(), n.radix()) {
            Ok(n) => Value::Integer(n),
            Err(_) => return Err(at(text, span, "integer number overflowed")),
        },
        DeValue::Float(x) => match x.as_str().parse::<f64>() {
            Ok(f) if !f.is_infinite() || x.as_str().contains("inf") => Value::Float(f),
            _ => return Err(at(text, span, "floating-point number overflowed")),
        },
        DeValue::Boolean(b) => Value::Boolean(b),
        DeValue::Datetime(_) => Value::Datetime,
        DeValue::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| {
                    let span = item.span();
                    value_of(text, span, item.into_inner())
                })
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(table) => Value::Table(table_of(text, table)?),
    })
}

/// `message` with the line and column where `span` starts.
fn at(text: &str, span: Range<usize>, message: &str) -> String {
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    format!("TOML parse error at line {line}, column {column}\n{message}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_errors() {
        let table = parse("a = 1\n[s]\nb = [\"x\", 2.5, true]\nd = 1979-05-27\n").unwrap();
        assert_eq!(get(&table, "a"), Some(&Value::Integer(1)));
        let s = get(&table, "s").and_then(Value::as_table).unwrap();
        assert_eq!(
            get(s, "b"),
            Some(&Value::Array(vec![
                Value::String("x".into()),
                Value::Float(2.5),
                Value::Boolean(true),
            ]))
        );
        assert_eq!(get(s, "d").map(Value::type_str), Some("datetime"));
        assert_eq!(parse("a = 0x1f").unwrap()[0].1, Value::Integer(31));
        assert_eq!(parse("a = 1_000").unwrap()[0].1, Value::Integer(1000));
        let e = parse("a = 1\n\nb = 1000000000000000000000000000000000000000000").unwrap_err();
        assert!(e.contains("line 3, column 5"), "{e}");
        let e = parse("a = 1\nb = \n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse("a = 1e999").unwrap_err();
        assert!(e.contains("overflowed"), "{e}");
        assert!(matches!(parse("a = inf").unwrap()[0].1, Value::Float(f) if f.is_infinite()));
        assert!(matches!(parse("a = nan").unwrap()[0].1, Value::Float(f) if f.is_nan()));
    }
}

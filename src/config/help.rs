//! `--help`, written from the option table.

use super::options::{self, Arg, GROUPS, Shown};

const INTRO: &str = "\
peerix: a peer-to-peer binary cache for Nix.

Serves this host's Nix store as a binary cache on http://BIND:PORT for the
local nix (root endpoints, loopback only) and under /local/ for the network
(only the paths the share policy allows).

Usage: peerix [OPTIONS]
";

/// Lines are kept within this many columns, but for a word that alone is
/// longer (a default key).
pub(super) const WIDTH: usize = 80;
/// Where the help of a flag starts.
const HELP_COLUMN: usize = 25;
/// Where the keys of a config file section start.
const KEYS_COLUMN: usize = 13;

pub(super) fn render() -> String {
    let mut out = String::from(INTRO);
    for group in GROUPS {
        out.push('\n');
        out.push_str(group.heading);
        out.push('\n');
        for opt in group.options {
            for (i, flag) in opt.flags.iter().enumerate() {
                let mut left = String::from("  ");
                if let Some(short) = flag.short {
                    left.push_str(&format!("-{short}, "));
                }
                left.push_str("--");
                left.push_str(flag.long);
                if let Arg::Value(metavar) = flag.arg {
                    left.push(' ');
                    left.push_str(metavar);
                }
                let default = match (i, opt.env, opt.default) {
                    (0, Some(var), Shown::Value(v) | Shown::Text(v)) => {
                        Some(format!("[default: ${var}, else {v}]"))
                    }
                    (0, Some(var), Shown::Nothing) => Some(format!("[default: ${var}]")),
                    (0, None, Shown::Value(v) | Shown::Text(v)) => Some(format!("[default: {v}]")),
                    _ => None,
                };
                write_item(&mut out, &left, HELP_COLUMN, flag.help, default.as_deref());
            }
        }
    }
    out.push_str("\nConfig file keys (flags win over the file, the file over the environment):\n");
    for section in sections() {
        let keys: Vec<&str> = options::all()
            .filter_map(|opt| opt.key)
            .filter(|&(s, _)| s == section)
            .map(|(_, key)| key)
            .collect();
        write_item(
            &mut out,
            &format!("  [{section}]"),
            KEYS_COLUMN,
            &keys.join(", "),
            None,
        );
    }
    out
}

/// The config file's sections, in the order the table first names them.
pub(super) fn sections() -> Vec<&'static str> {
    let mut sections = Vec::new();
    for (section, _) in options::all().filter_map(|opt| opt.key) {
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    sections
}

/// `left`, then `text` from `column` on, wrapped at [`WIDTH`]: lines break
/// at each `\n` of `text` and between words. `last`, if any, ends the text.
fn write_item(out: &mut String, left: &str, column: usize, text: &str, last: Option<&str>) {
    let mut line = left.to_string();
    let pad = |line: &mut String| {
        let spaces = if line.len() < column {
            column - line.len()
        } else {
            2
        };
        line.extend(std::iter::repeat_n(' ', spaces));
    };
    pad(&mut line);
    let mut empty = true;
    let paragraphs: Vec<&str> = text.split('\n').collect();
    for (p, paragraph) in paragraphs.iter().enumerate() {
        if p > 0 {
            out.push_str(line.trim_end());
            out.push('\n');
            line.clear();
            pad(&mut line);
            empty = true;
        }
        let mut words: Vec<String> = paragraph.split_whitespace().map(String::from).collect();
        if let (true, Some(last)) = (p + 1 == paragraphs.len(), last) {
            // Broken between words too, but `[default:` stays with its value.
            let mut rest = last.split_whitespace();
            words.extend(
                rest.next()
                    .map(|w| format!("{w} {}", rest.next().unwrap_or(""))),
            );
            words.extend(rest.map(String::from));
        }
        for word in &words {
            if !empty && line.len() + 1 + word.len() > WIDTH {
                out.push_str(line.trim_end());
                out.push('\n');
                line.clear();
                pad(&mut line);
                empty = true;
            }
            if !empty {
                line.push(' ');
            }
            line.push_str(word);
            empty = false;
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

//! A streaming NAR validator: feed it bytes as they arrive, in any chunking.
//!
//! It checks the whole grammar of `nix-archive-1` and keeps O(depth) state;
//! file contents are counted, never buffered. It rejects what Nix would
//! reject and what a path on disk could never produce: unsorted or duplicate
//! directory entries, names that are empty, `.`, `..` or contain `/` or NUL,
//! non-zero padding, absurd lengths or depth, truncation, and trailing bytes.

use std::fmt;

pub const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name accepted (Linux allows 255 bytes).
pub const MAX_NAME: usize = 255;
/// Longest symlink target accepted (Linux PATH_MAX).
pub const MAX_TARGET: usize = 4096;
/// Deepest directory nesting accepted.
pub const MAX_DEPTH: usize = 256;
/// Longest keyword in the grammar ("nix-archive-1").
const MAX_KEYWORD: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarError {
    /// Offset of the byte at which the stream became invalid: for a string
    /// the grammar does not allow there, the first byte of its length.
    pub offset: u64,
    pub message: String,
}

impl fmt::Display for NarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NAR at byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for NarError {}

/// The next string the grammar expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Magic,
    /// `(` opening a node.
    Open,
    /// `type`
    Type,
    /// `regular`, `symlink` or `directory`
    TypeValue,
    /// `executable` or `contents`
    RegularField,
    /// the empty string after `executable`
    ExecutableValue,
    /// `contents`, after `executable ""`
    Contents,
    /// `)` closing a node
    Close,
    /// `target`
    Target,
    TargetValue,
    /// `entry` or `)`, inside a directory
    DirectoryItem,
    /// `(` opening an entry
    EntryOpen,
    /// `name`
    Name,
    NameValue,
    /// `node`
    Node,
    /// `)` closing an entry
    EntryClose,
    /// Nothing: the root node is complete.
    End,
}

/// How the bytes at hand are being read.
#[derive(Debug)]
enum Lex {
    /// The u64 length of a string (or of file contents).
    Length { buf: [u8; 8], have: usize },
    /// The bytes of a string.
    Bytes { want: usize },
    /// File contents: counted, not kept.
    Contents { left: u64, padding: usize },
    /// Zero padding after a string or contents.
    Padding {
        left: usize,
        then_contents_done: bool,
    },
}

pub struct NarValidator {
    offset: u64,
    expect: Expect,
    lex: Lex,
    token: Vec<u8>,
    /// Offset of the length that began `token`.
    token_start: u64,
    /// For each open directory, the last entry name seen (to check order).
    dirs: Vec<Option<Vec<u8>>>,
    /// Whether the next `Length` is of file contents.
    reading_contents_length: bool,
}

impl Default for NarValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl NarValidator {
    pub fn new() -> NarValidator {
        NarValidator {
            offset: 0,
            expect: Expect::Magic,
            lex: Lex::Length {
                buf: [0; 8],
                have: 0,
            },
            token: Vec::with_capacity(64),
            token_start: 0,
            dirs: Vec::new(),
            reading_contents_length: false,
        }
    }

    /// Bytes accepted so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn is_complete(&self) -> bool {
        self.expect == Expect::End
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, NarError> {
        Err(NarError {
            offset: self.offset,
            message: message.into(),
        })
    }

    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), NarError> {
        while !chunk.is_empty() {
            if self.expect == Expect::End {
                return self.fail("bytes after the end of the archive");
            }
            let used = self.step(chunk)?;
            self.offset += used as u64;
            chunk = &chunk[used..];
        }
        Ok(())
    }

    /// Ends the stream: an error unless the archive is complete.
    pub fn finish(self) -> Result<(), NarError> {
        if self.is_complete() {
            Ok(())
        } else {
            self.fail(format!("truncated archive (expected {:?})", self.expect))
        }
    }

    /// Consumes some of `input` (at least one byte) and returns how many.
    fn step(&mut self, input: &[u8]) -> Result<usize, NarError> {
        match &mut self.lex {
            Lex::Length { buf, have } => {
                let n = (8 - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                if *have == 8 {
                    let len = u64::from_le_bytes(*buf);
                    // The error offset names the length's first byte.
                    let start = self.offset + n as u64 - 8;
                    self.token_start = start;
                    self.on_length(len).map_err(|mut e| {
                        e.offset = start;
                        e
                    })?;
                }
                Ok(n)
            }
            Lex::Bytes { want } => {
                let n = (*want - self.token.len()).min(input.len());
                self.token.extend_from_slice(&input[..n]);
                if self.token.len() == *want {
                    let padding = (8 - *want % 8) % 8;
                    self.lex = Lex::Padding {
                        left: padding,
                        then_contents_done: false,
                    };
                    if padding == 0 {
                        self.end_padding()?;
                    }
                }
                Ok(n)
            }
            Lex::Contents { left, padding } => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= n as u64;
                if *left == 0 {
                    let padding = *padding;
                    self.lex = Lex::Padding {
                        left: padding,
                        then_contents_done: true,
                    };
                    if padding == 0 {
                        self.end_padding()?;
                    }
                }
                Ok(n)
            }
            Lex::Padding { left, .. } => {
                let n = (*left).min(input.len());
                if let Some(i) = input[..n].iter().position(|&b| b != 0) {
                    self.offset += i as u64;
                    return self.fail("non-zero padding");
                }
                *left -= n;
                if *left == 0 {
                    self.end_padding()?;
                }
                Ok(n)
            }
        }
    }

    fn on_length(&mut self, len: u64) -> Result<(), NarError> {
        if self.reading_contents_length {
            self.reading_contents_length = false;
            let padding = ((8 - len % 8) % 8) as usize;
            self.lex = if len == 0 {
                Lex::Padding {
                    left: 0,
                    then_contents_done: true,
                }
            } else {
                Lex::Contents { left: len, padding }
            };
            if len == 0 {
                self.end_padding()?;
            }
            return Ok(());
        }
        let max = match self.expect {
            Expect::NameValue => MAX_NAME,
            Expect::TargetValue => MAX_TARGET,
            _ => MAX_KEYWORD,
        };
        if len > max as u64 {
            return self.fail(format!(
                "string of {len} bytes where {:?} was expected",
                self.expect
            ));
        }
        self.token.clear();
        let want = len as usize;
        if want == 0 {
            self.lex = Lex::Padding {
                left: 0,
                then_contents_done: false,
            };
            return self.end_padding();
        }
        self.lex = Lex::Bytes { want };
        Ok(())
    }

    /// A string or file contents, with its padding, is complete.
    fn end_padding(&mut self) -> Result<(), NarError> {
        let contents_done = matches!(
            self.lex,
            Lex::Padding {
                then_contents_done: true,
                ..
            }
        );
        self.lex = Lex::Length {
            buf: [0; 8],
            have: 0,
        };
        if contents_done {
            self.expect = Expect::Close;
            return Ok(());
        }
        let token = std::mem::take(&mut self.token);
        let result = self.on_string(&token);
        self.token = token;
        // The string is at fault, not whatever follows it.
        let start = self.token_start;
        result.map_err(|mut e| {
            e.offset = start;
            e
        })
    }

    fn on_string(&mut self, s: &[u8]) -> Result<(), NarError> {
        let keyword = |want: &[u8], next: Expect, this: &mut Self| {
            if s == want {
                this.expect = next;
                Ok(())
            } else {
                this.fail(format!(
                    "expected `{}`, got `{}`",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(s)
                ))
            }
        };
        match self.expect {
            Expect::Magic => keyword(MAGIC, Expect::Open, self),
            Expect::Open => keyword(b"(", Expect::Type, self),
            Expect::Type => keyword(b"type", Expect::TypeValue, self),
            Expect::TypeValue => match s {
                b"regular" => {
                    self.expect = Expect::RegularField;
                    Ok(())
                }
                b"symlink" => {
                    self.expect = Expect::Target;
                    Ok(())
                }
                b"directory" => {
                    if self.dirs.len() >= MAX_DEPTH {
                        return self.fail(format!("directories nested deeper than {MAX_DEPTH}"));
                    }
                    self.dirs.push(None);
                    self.expect = Expect::DirectoryItem;
                    Ok(())
                }
                _ => self.fail(format!(
                    "unknown node type `{}`",
                    String::from_utf8_lossy(s)
                )),
            },
            Expect::RegularField => match s {
                b"executable" => {
                    self.expect = Expect::ExecutableValue;
                    Ok(())
                }
                b"contents" => {
                    self.reading_contents_length = true;
                    Ok(())
                }
                _ => self.fail("expected `executable` or `contents`"),
            },
            Expect::ExecutableValue => keyword(b"", Expect::Contents, self),
            Expect::Contents => {
                keyword(b"contents", Expect::Close, self)?;
                self.reading_contents_length = true;
                Ok(())
            }
            Expect::Target => keyword(b"target", Expect::TargetValue, self),
            Expect::TargetValue => {
                if s.is_empty() || s.contains(&0) {
                    return self.fail("symlink target is empty or contains NUL");
                }
                self.expect = Expect::Close;
                Ok(())
            }
            Expect::Close => {
                keyword(b")", Expect::Close, self)?;
                self.node_closed();
                Ok(())
            }
            Expect::DirectoryItem => match s {
                b"entry" => {
                    self.expect = Expect::EntryOpen;
                    Ok(())
                }
                b")" => {
                    self.dirs.pop();
                    self.node_closed();
                    Ok(())
                }
                _ => self.fail("expected `entry` or `)` in a directory"),
            },
            Expect::EntryOpen => keyword(b"(", Expect::Name, self),
            Expect::Name => keyword(b"name", Expect::NameValue, self),
            Expect::NameValue => {
                if s.is_empty() || s == b"." || s == b".." || s.contains(&b'/') || s.contains(&0) {
                    return self.fail(format!(
                        "invalid entry name `{}`",
                        String::from_utf8_lossy(s)
                    ));
                }
                let Some(last) = self.dirs.last_mut() else {
                    return self.fail("entry outside a directory");
                };
                if last.as_deref().is_some_and(|prev| prev >= s) {
                    let message = format!(
                        "entry `{}` is out of order or repeated",
                        String::from_utf8_lossy(s)
                    );
                    return self.fail(message);
                }
                *last = Some(s.to_vec());
                self.expect = Expect::Node;
                Ok(())
            }
            Expect::Node => keyword(b"node", Expect::Open, self),
            Expect::EntryClose => {
                keyword(b")", Expect::DirectoryItem, self)?;
                Ok(())
            }
            Expect::End => self.fail("bytes after the end of the archive"),
        }
    }

    /// A node's `)` was read: the archive ends, or the entry holding it closes.
    fn node_closed(&mut self) {
        self.expect = if self.dirs.is_empty() {
            Expect::End
        } else {
            Expect::EntryClose
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::testdata::{DIR_NAR, FILE_NAR};

    fn validate(bytes: &[u8], chunk: usize) -> Result<(), NarError> {
        let mut v = NarValidator::new();
        for piece in bytes.chunks(chunk.max(1)) {
            v.feed(piece)?;
        }
        v.finish()
    }

    fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }

    fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for t in tokens {
            nar_str(&mut out, t);
        }
        out
    }

    #[test]
    fn nix_made_nars_validate_in_any_chunking() {
        for bytes in [DIR_NAR, FILE_NAR] {
            for chunk in [1, 3, 7, 8, 13, 64, 4096] {
                validate(bytes, chunk).unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for bytes in [DIR_NAR, FILE_NAR] {
            for n in 0..bytes.len() {
                assert!(
                    validate(&bytes[..n], 5).is_err(),
                    "prefix of {n} bytes accepted"
                );
            }
        }
    }

    #[test]
    fn any_single_flipped_byte_in_framing_is_rejected_or_changes_only_contents() {
        // Flip each byte: the result must be rejected, unless the byte was
        // file content or symlink target text (which any value may be).
        let mut accepted = 0;
        for i in 0..DIR_NAR.len() {
            let mut bytes = DIR_NAR.to_vec();
            bytes[i] ^= 0x01;
            if validate(&bytes, 8).is_ok() {
                accepted += 1;
            }
        }
        // Contents "hi\n", "#!/bin/sh\n" and the target "sub/f" are 18 bytes in all;
        // flips in names may also keep the order valid, but never more than that.
        assert!(accepted < 40, "{accepted} single-byte flips accepted");
    }

    #[test]
    fn trailing_bytes_and_bad_padding_are_rejected() {
        let mut trailing = FILE_NAR.to_vec();
        trailing.push(0);
        assert!(validate(&trailing, 4096).is_err());
        // The magic string is 13 bytes: its padding starts at offset 8 + 13.
        let mut padded = FILE_NAR.to_vec();
        padded[8 + 13] = 1;
        let e = validate(&padded, 4096).unwrap_err();
        assert_eq!(e.offset, 21, "{e}");
    }

    #[test]
    fn a_wrong_string_is_blamed_at_its_start() {
        // Found by the `nar` fuzz target: an 8-byte string where the magic
        // belongs was blamed at byte 16, after it, so the bytes before the
        // reported offset were not all valid.
        let crash = [8, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0, 0, 0, 0x92, 0xfe, 0x1d];
        let e = validate(&crash, 3).unwrap_err();
        assert_eq!(e.offset, 0, "{e}");
        // A padded string deeper in: `)` where `type` belongs, at byte 40.
        let wrong = nar(&[MAGIC, b"(", b")"]);
        for chunk in [1, 8, 4096] {
            let e = validate(&wrong, chunk).unwrap_err();
            assert_eq!(e.offset, 40, "{e}");
            assert!(
                validate(&wrong[..40], chunk)
                    .unwrap_err()
                    .message
                    .contains("truncated")
            );
        }
    }

    #[test]
    fn grammar_violations_are_rejected() {
        let dir_with = |names: &[&[u8]]| {
            let mut out = nar(&[MAGIC, b"(", b"type", b"directory"]);
            for name in names {
                out.extend(nar(&[
                    b"entry", b"(", b"name", name, b"node", b"(", b"type",
                ]));
                out.extend(nar(&[b"regular", b"contents"]));
                nar_str(&mut out, b"x");
                out.extend(nar(&[b")", b")"]));
            }
            out.extend(nar(&[b")"]));
            out
        };
        assert!(validate(&dir_with(&[b"a", b"b"]), 8).is_ok());
        for names in [
            &[b"b".as_slice(), b"a"][..],
            &[b"a", b"a"],
            &[b""],
            &[b"."],
            &[b".."],
            &[b"a/b"],
            &[b"a\0"],
        ] {
            assert!(validate(&dir_with(names), 8).is_err(), "{names:?}");
        }
        let long_name = vec![b'n'; MAX_NAME + 1];
        assert!(validate(&dir_with(&[&long_name]), 8).is_err());
        let bad_magic = nar(&[
            b"nix-archive-2",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"x",
            b")",
        ]);
        assert!(validate(&bad_magic, 8).is_err());
        let ok_link = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"x", b")"]);
        assert!(validate(&ok_link, 8).is_ok());
        let bad_type = nar(&[MAGIC, b"(", b"type", b"fifo", b")"]);
        assert!(validate(&bad_type, 8).is_err());
        let empty_target = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"", b")"]);
        assert!(validate(&empty_target, 8).is_err());
        let mut huge_keyword = nar(&[MAGIC, b"("]);
        huge_keyword.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(validate(&huge_keyword, 8).is_err());
    }

    #[test]
    fn absurd_depth_is_rejected() {
        let mut deep = nar(&[MAGIC]);
        for _ in 0..=MAX_DEPTH {
            deep.extend(nar(&[
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ]));
        }
        assert!(validate(&deep, 4096).is_err());
    }

    #[test]
    fn empty_and_executable_files() {
        let empty = nar(&[MAGIC, b"(", b"type", b"regular", b"contents", b"", b")"]);
        assert!(validate(&empty, 1).is_ok());
        let exec = nar(&[
            MAGIC,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"abc",
            b")",
        ]);
        assert!(validate(&exec, 1).is_ok());
        let exec_bad = nar(&[
            MAGIC,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"x",
            b"contents",
            b"abc",
            b")",
        ]);
        assert!(validate(&exec_bad, 1).is_err());
    }
}

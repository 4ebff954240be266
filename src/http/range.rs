//! The HTTP `Range` header, as far as NAR downloads need it: one byte range.
//!
//! Nix resumes a broken download with `Range: bytes=N-`. A syntactically
//! invalid header or a multi-range request is ignored (RFC 9110 allows that),
//! and the whole NAR is sent; a well-formed range past the end is a 416.

/// What to send for a body of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200, the whole body.
    Full,
    /// 206, bytes `start..end` (end exclusive).
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

pub fn answer(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first, last) {
        ("", suffix) => match number(suffix) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) if len > 0 => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len,
            },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (first, "") => match number(first) {
            Some(start) if start < len => RangeAnswer::Partial { start, end: len },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        (first, last) => match (number(first), number(last)) {
            (Some(start), Some(last)) if start <= last => {
                if start < len {
                    RangeAnswer::Partial {
                        start,
                        end: last.saturating_add(1).min(len),
                    }
                } else {
                    RangeAnswer::Unsatisfiable
                }
            }
            _ => RangeAnswer::Full,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::RangeAnswer::*;
    use super::answer;

    #[test]
    fn ranges() {
        assert_eq!(answer(None, 100), Full);
        assert_eq!(
            answer(Some("bytes=10-"), 100),
            Partial {
                start: 10,
                end: 100
            }
        );
        assert_eq!(
            answer(Some("bytes=10-19"), 100),
            Partial { start: 10, end: 20 }
        );
        assert_eq!(
            answer(Some("bytes=90-200"), 100),
            Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            answer(Some("bytes=-10"), 100),
            Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            answer(Some("bytes=-500"), 100),
            Partial { start: 0, end: 100 }
        );
        assert_eq!(answer(Some("bytes=0-0"), 100), Partial { start: 0, end: 1 });
        assert_eq!(answer(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=100-150"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=-0"), 100), Unsatisfiable);
    }

    #[test]
    fn invalid_or_multiple_ranges_are_ignored() {
        for h in [
            "bytes=a-",
            "bytes=5-1",
            "bytes=1-2,4-5",
            "items=1-2",
            "bytes=",
            "bytes=-",
            "bytes=+1-",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(answer(Some(h), 100), Full, "{h}");
        }
    }
}

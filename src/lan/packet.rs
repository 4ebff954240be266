//! The LAN discovery packets, wire-compatible with the original peerix.
//!
//! - request:  `[0][id: u32 BE][hash part, ASCII]`
//! - response: `[1][id: u32 BE][http port: u32 BE][url path, ASCII]`
//!
//! and two of peerix-rs's own, which the original ignores (its receive loop
//! handles types 0 and 1 and drops the rest without a reply):
//!
//! - announce: `[2][generation: u64 BE][paths: u32 BE][http port: u32 BE]`,
//!   "my store summary is at this generation, at /local/summary";
//! - solicit:  `[3]`, "announce yourselves", sent by a host that starts.
//!
//! Decoding is strict: a packet that is not exactly one of these, with a valid
//! hash part and a narinfo URL path for that hash, is rejected with a reason,
//! so the UDP thread can drop and count it.

use crate::nix::store_path::HashPart;

/// Larger datagrams are never valid and are dropped unread.
pub const MAX_PACKET: usize = 512;

const REQUEST: u8 = 0;
const RESPONSE: u8 = 1;
const ANNOUNCE: u8 = 2;
const SOLICIT: u8 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// "Who has this hash part?"
    Request { id: u32, hash: HashPart },
    /// "I have it: GET `http://<sender>:<port>/local/<hash>.narinfo`." The
    /// url path is the only form ever fetched, so the packet keeps its hash.
    Response { id: u32, port: u16, hash: HashPart },
    /// "My store summary is at `generation`, with `paths` paths, at
    /// `http://<sender>:<port>/local/summary`."
    Announce {
        generation: u64,
        paths: u32,
        port: u16,
    },
    /// "Announce yourselves."
    Solicit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketError {
    Empty,
    TooLong,
    UnknownType(u8),
    Truncated,
    BadHashPart,
    BadPort,
    BadUrlPath,
    TrailingBytes,
}

impl std::fmt::Display for PacketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PacketError::Empty => f.write_str("empty packet"),
            PacketError::TooLong => write!(f, "packet longer than {MAX_PACKET} bytes"),
            PacketError::UnknownType(t) => write!(f, "unknown packet type {t}"),
            PacketError::Truncated => f.write_str("truncated packet"),
            PacketError::BadHashPart => f.write_str("request carries no valid hash part"),
            PacketError::BadPort => f.write_str("response carries port 0 or one above 65535"),
            PacketError::BadUrlPath => f.write_str("response carries no valid narinfo url path"),
            PacketError::TrailingBytes => f.write_str("packet longer than its type allows"),
        }
    }
}

impl std::error::Error for PacketError {}

impl Packet {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Packet::Request { id, hash } => {
                let mut out = Vec::with_capacity(5 + 32);
                out.push(REQUEST);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(hash.as_str().as_bytes());
                out
            }
            Packet::Announce {
                generation,
                paths,
                port,
            } => {
                let mut out = Vec::with_capacity(17);
                out.push(ANNOUNCE);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&paths.to_be_bytes());
                out.extend_from_slice(&u32::from(*port).to_be_bytes());
                out
            }
            Packet::Solicit => vec![SOLICIT],
            Packet::Response { id, port, hash } => {
                let url_path = narinfo_url_path(hash);
                let mut out = Vec::with_capacity(9 + url_path.len());
                out.push(RESPONSE);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&u32::from(*port).to_be_bytes());
                out.extend_from_slice(url_path.as_bytes());
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Packet, PacketError> {
        if bytes.len() > MAX_PACKET {
            return Err(PacketError::TooLong);
        }
        let (&kind, rest) = bytes.split_first().ok_or(PacketError::Empty)?;
        match kind {
            ANNOUNCE => {
                let (high, rest) = split_u32(rest)?;
                let (low, rest) = split_u32(rest)?;
                let (paths, rest) = split_u32(rest)?;
                let (port, rest) = split_u32(rest)?;
                if !rest.is_empty() {
                    return Err(PacketError::TrailingBytes);
                }
                return Ok(Packet::Announce {
                    generation: u64::from(high) << 32 | u64::from(low),
                    paths,
                    port: valid_port(port)?,
                });
            }
            SOLICIT if rest.is_empty() => return Ok(Packet::Solicit),
            SOLICIT => return Err(PacketError::TrailingBytes),
            _ => {}
        }
        let (id, rest) = split_u32(rest)?;
        match kind {
            REQUEST => {
                let hash = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| HashPart::parse(s).ok())
                    .ok_or(PacketError::BadHashPart)?;
                Ok(Packet::Request { id, hash })
            }
            RESPONSE => {
                let (port, rest) = split_u32(rest)?;
                let port = valid_port(port)?;
                let hash = std::str::from_utf8(rest)
                    .ok()
                    .and_then(narinfo_hash)
                    .ok_or(PacketError::BadUrlPath)?;
                Ok(Packet::Response { id, port, hash })
            }
            other => Err(PacketError::UnknownType(other)),
        }
    }
}

/// The url path a responder advertises for `hash`.
fn narinfo_url_path(hash: &HashPart) -> String {
    format!("local/{}.narinfo", hash.as_str())
}

/// The hash part named by an advertised url path, if it has the one form we
/// ever fetch: `local/<hash>.narinfo`. Anything else could point our HTTP
/// client at an arbitrary path of the peer, so it is refused.
fn narinfo_hash(url_path: &str) -> Option<HashPart> {
    let name = url_path.strip_prefix("local/")?.strip_suffix(".narinfo")?;
    HashPart::parse(name).ok()
}

fn valid_port(port: u32) -> Result<u16, PacketError> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(PacketError::BadPort)
}

fn split_u32(bytes: &[u8]) -> Result<(u32, &[u8]), PacketError> {
    let (head, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or(PacketError::Truncated)?;
    Ok((u32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";

    fn hash() -> HashPart {
        HashPart::parse(HASH).unwrap()
    }

    #[test]
    fn wire_format_matches_the_original() {
        let request = Packet::Request {
            id: 0x01020304,
            hash: hash(),
        };
        let mut expected = vec![0, 1, 2, 3, 4];
        expected.extend_from_slice(HASH.as_bytes());
        assert_eq!(request.encode(), expected);
        assert_eq!(Packet::decode(&expected), Ok(request));

        let response = Packet::Response {
            id: 7,
            port: 12304,
            hash: hash(),
        };
        let mut expected = vec![1, 0, 0, 0, 7, 0, 0, 0x30, 0x10];
        expected.extend_from_slice(format!("local/{HASH}.narinfo").as_bytes());
        assert_eq!(response.encode(), expected);
        assert_eq!(Packet::decode(&expected), Ok(response));
    }

    #[test]
    fn announcements_and_solicitations_round_trip() {
        let announce = Packet::Announce {
            generation: 0x0102_0304_0506_0708,
            paths: 300,
            port: 12304,
        };
        let bytes = announce.encode();
        assert_eq!(
            bytes,
            [2, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 44, 0, 0, 0x30, 0x10]
        );
        assert_eq!(Packet::decode(&bytes), Ok(announce));
        for n in 0..bytes.len() {
            assert!(Packet::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Packet::decode(&long), Err(PacketError::TrailingBytes));
        let mut port_zero = bytes.clone();
        port_zero[13..17].copy_from_slice(&[0; 4]);
        assert_eq!(Packet::decode(&port_zero), Err(PacketError::BadPort));
        assert_eq!(Packet::Solicit.encode(), [3]);
        assert_eq!(Packet::decode(&[3]), Ok(Packet::Solicit));
        assert_eq!(Packet::decode(&[3, 0]), Err(PacketError::TrailingBytes));
    }

    #[test]
    fn malformed_packets_are_rejected() {
        let valid_request = Packet::Request {
            id: 1,
            hash: hash(),
        }
        .encode();
        for n in 0..valid_request.len() {
            assert!(
                Packet::decode(&valid_request[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        let valid_response = Packet::Response {
            id: 1,
            port: 80,
            hash: hash(),
        }
        .encode();
        for n in 0..valid_response.len() {
            assert!(
                Packet::decode(&valid_response[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        assert_eq!(Packet::decode(&[]), Err(PacketError::Empty));
        assert_eq!(
            Packet::decode(&[9, 0, 0, 0, 0]),
            Err(PacketError::UnknownType(9))
        );
        assert_eq!(Packet::decode(&[0; 600]), Err(PacketError::TooLong));
        let mut port_zero = vec![1, 0, 0, 0, 1, 0, 0, 0, 0];
        port_zero.extend_from_slice(narinfo_url_path(&hash()).as_bytes());
        assert_eq!(Packet::decode(&port_zero), Err(PacketError::BadPort));
        let mut port_big = vec![1, 0, 0, 0, 1, 0, 1, 0, 0];
        port_big.extend_from_slice(narinfo_url_path(&hash()).as_bytes());
        assert_eq!(Packet::decode(&port_big), Err(PacketError::BadPort));
        for path in [
            "local/../../etc/passwd",
            "nar/x.nar",
            "local/abc.narinfo",
            "/local/{HASH}.narinfo",
        ] {
            let mut packet = vec![1, 0, 0, 0, 1, 0, 0, 0x30, 0x10];
            packet.extend_from_slice(path.as_bytes());
            assert_eq!(
                Packet::decode(&packet),
                Err(PacketError::BadUrlPath),
                "{path}"
            );
        }
        let mut bad_utf8 = vec![0, 0, 0, 0, 1];
        bad_utf8.extend_from_slice(&[0xff; 32]);
        assert_eq!(Packet::decode(&bad_utf8), Err(PacketError::BadHashPart));
    }
}

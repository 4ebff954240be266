//! The LAN discovery packet codec (`Packet::decode` / `encode`), as the UDP
//! thread runs it on every datagram it receives.
//!
//! Checks: no panic; decoding is strict, so an accepted datagram is exactly
//! the encoding of what it decoded to (nothing ignored, nothing normalised),
//! and that decodes back to the same packet; a response carries a port of
//! 1 to 65535; refusals have a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::lan::packet::{MAX_PACKET, Packet};

fuzz_target!(|data: &[u8]| {
    let packet = match Packet::decode(data) {
        Ok(packet) => packet,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(data.len() <= MAX_PACKET);
    if let Packet::Response { port, .. } = packet {
        assert_ne!(port, 0, "a response with port 0 was accepted");
    }
    let encoded = packet.encode();
    assert_eq!(
        encoded, data,
        "{packet:?} was decoded from other bytes than its encoding"
    );
    assert!(encoded.len() <= MAX_PACKET);
    assert_eq!(Packet::decode(&encoded), Ok(packet));
});

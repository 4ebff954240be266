//! The narinfo parser (`NarInfo::parse`), as peerix runs it on a peer's
//! narinfo body.
//!
//! Checks: no panic; an accepted narinfo is self-consistent (NarSize > 0,
//! printable values, one line per field) and survives render -> parse
//! unchanged, with a rendering that is a fixed point; its signatures can be
//! checked; a refusal says why.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use peerix::nix::keys::{PublicKey, any_valid_signature};
use peerix::nix::narinfo::{MAX_NARINFO_LEN, NarInfo};

/// The key the seed narinfos are signed with (src/nix/testdata.rs).
const PUBLIC_KEY: &str = "peerix-test-1:xinwI5uI3quuMs+xYP44C4fJWyCXVMslJ2CQwHoiG3A=";

fn key() -> &'static [PublicKey] {
    static KEY: OnceLock<[PublicKey; 1]> = OnceLock::new();
    KEY.get_or_init(|| [PublicKey::parse(PUBLIC_KEY).expect("the test key parses")])
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    // The client refuses a body that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let info = match NarInfo::parse(text) {
        Ok(info) => info,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() > "invalid narinfo: ".len(),
                "an error without a reason: {message:?}"
            );
            return;
        }
    };
    assert!(text.len() <= MAX_NARINFO_LEN);
    assert!(info.nar_size > 0, "NarSize 0 accepted");
    for value in [&info.url, &info.compression]
        .into_iter()
        .chain(info.file_hash.iter())
        .chain(info.sigs.iter())
        .chain(info.ca.iter())
    {
        assert!(printable(value), "non-printable value {value:?} accepted");
    }
    assert_eq!(
        info.store_path.to_string().len(),
        "/nix/store/".len() + info.store_path.base_name().len()
    );

    let rendered = info.render();
    let again = NarInfo::parse(&rendered).unwrap_or_else(|e| {
        panic!("the rendering of an accepted narinfo is refused: {e}\n{rendered}")
    });
    assert_eq!(
        again, info,
        "render -> parse changed the narinfo:\n{rendered}"
    );
    assert_eq!(again.render(), rendered, "rendering is not a fixed point");

    // The signature check runs on the peer's Sig lines as given.
    let fingerprint = info.fingerprint();
    assert!(fingerprint.starts_with("1;/nix/store/"));
    let _ = any_valid_signature(key(), &fingerprint, &info.sigs);
});

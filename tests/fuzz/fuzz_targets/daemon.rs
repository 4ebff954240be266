//! The nix-daemon worker protocol reader (`ReplyReader`): what peerix reads
//! from the daemon's socket, from the handshake to the replies of every op
//! it sends.
//!
//! Input: one byte `n`, then `n % 8` op bytes (the ops the client sent, in
//! order: see `Op`), then the bytes the daemon sent. The seeds are sessions
//! recorded between peerix's client and a real nix-daemon 2.8.
//!
//! Checks: no panic and no unbounded allocation; a negotiated version is one
//! the client accepts; every refusal says why; a path's metadata that the
//! store accepts (`LocalPathInfo::from_daemon`) becomes a narinfo that
//! renders and parses back unchanged, as nix and peers will read it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::nix::narinfo::NarInfo;
use peerix::store::LocalPathInfo;
use peerix::store::daemon::{Fault, FaultResult, ReplyReader};

/// The path the recorded QueryPathInfo asked about; its reply does not name it.
const PATH: &str = "/nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-x";

/// The ops peerix sends, by the byte that names them in the input.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    IsValidPath,
    QueryAllValidPaths,
    QueryPathInfo,
    QueryPathFromHashPart,
    QueryValidPaths,
}

const OPS: [Op; 5] = [
    Op::IsValidPath,
    Op::QueryAllValidPaths,
    Op::QueryPathInfo,
    Op::QueryPathFromHashPart,
    Op::QueryValidPaths,
];

fn check_fault(fault: &Fault) {
    match fault {
        Fault::Io(e) => assert!(!e.to_string().is_empty()),
        Fault::Protocol(message) => {
            assert!(!message.is_empty(), "a protocol error without a reason")
        }
        // The daemon's own message may be anything, even empty.
        Fault::Remote(_) => {}
    }
}

fn reply(replies: &mut ReplyReader<&[u8]>, op: Op) -> FaultResult<()> {
    replies.stderr_loop()?;
    match op {
        Op::IsValidPath => {
            replies.read_bool()?;
        }
        Op::QueryAllValidPaths | Op::QueryValidPaths => {
            replies.read_string_list()?;
        }
        Op::QueryPathFromHashPart => {
            replies.read_string()?;
        }
        Op::QueryPathInfo => {
            if let Some(info) = replies.read_path_info(PATH)? {
                assert_eq!(info.path, PATH);
                check_path_info(info);
            }
        }
    }
    Ok(())
}

/// What the store makes of the metadata must be a narinfo nix accepts.
fn check_path_info(info: peerix::store::daemon::PathInfo) {
    let Ok(local) = LocalPathInfo::from_daemon(info) else {
        return;
    };
    let narinfo = local.to_narinfo(None);
    let text = narinfo.render();
    match NarInfo::parse(&text) {
        Ok(parsed) => assert_eq!(parsed, narinfo, "the narinfo changed on the way:\n{text}"),
        Err(e) => panic!("the store accepted metadata whose narinfo is invalid: {e}\n{text:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(rest.len());
    let (ops, stream) = rest.split_at(count);
    let mut replies = ReplyReader::new(stream);
    let hello = replies.read_hello().and_then(|()| {
        let minor = replies.minor();
        assert!((10..=35).contains(&minor), "negotiated 1.{minor}");
        replies.read_hello_end()
    });
    if let Err(fault) = hello {
        check_fault(&fault);
        return;
    }
    for &op in ops {
        let op = OPS[usize::from(op) % OPS.len()];
        if let Err(fault) = reply(&mut replies, op) {
            check_fault(&fault);
            // The pool keeps a connection only after the daemon's own error.
            if !matches!(fault, Fault::Remote(_)) {
                return;
            }
        }
    }
});

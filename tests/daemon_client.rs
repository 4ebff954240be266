//! The nix-daemon client against a real `nix-daemon --store` on a chroot
//! store: every op peerix uses, its answers compared with `nix path-info`,
//! bad input, concurrency through one pool, and a daemon restart.

mod common;

use std::sync::Arc;

use common::{Host, TestDir, hash_part, many_fixture};
use peerix::nix::hash::NarHash;
use peerix::store::daemon::{DaemonError, DaemonPool};

fn pool(host: &Host) -> DaemonPool {
    DaemonPool::new(host.socket.clone(), 4)
}

#[test]
fn ops_agree_with_nix_path_info() {
    let dir = TestDir::new("daemon_ops");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.third]);
    let key = a.nix.generate_key(&dir.path, "daemon-test-1");
    a.sign(&key, &[&many.third], true);
    let expected = a.path_infos(&[&many.third], true);
    assert_eq!(expected.len(), 3, "closure of the third item: {expected:?}");
    let daemon = pool(&a);

    let mut all = daemon.query_all_valid_paths().expect("QueryAllValidPaths");
    all.sort();
    let mut want: Vec<String> = expected.iter().map(|i| i.path.clone()).collect();
    want.sort();
    assert_eq!(all, want);
    let mut streamed = Vec::new();
    let count = daemon
        .for_each_valid_path(|path| streamed.push(path.to_string()))
        .expect("QueryAllValidPaths, streamed");
    streamed.sort();
    assert_eq!((count, &streamed), (want.len() as u64, &want));

    for info in &expected {
        let got = daemon
            .query_path_info(&info.path)
            .expect("QueryPathInfo")
            .unwrap_or_else(|| panic!("{} is valid", info.path));
        assert_eq!(got.path, info.path);
        assert_eq!(
            NarHash(got.nar_hash).to_string(),
            info.nar_hash,
            "{}",
            info.path
        );
        assert_eq!(got.nar_size, info.nar_size, "{}", info.path);
        let mut refs = got.references.clone();
        refs.sort();
        assert_eq!(refs, info.references, "{}", info.path);
        assert_eq!(got.deriver, info.deriver, "{}", info.path);
        assert_eq!(got.sigs, info.signatures, "{}", info.path);
        assert_eq!(got.ca, info.ca, "{}", info.path);
        assert!(got.sigs.iter().any(|s| s.starts_with("daemon-test-1:")));

        let by_hash = daemon
            .query_path_from_hash_part(info.hash_part())
            .expect("QueryPathFromHashPart");
        assert_eq!(by_hash.as_deref(), Some(info.path.as_str()));
        assert!(daemon.is_valid_path(&info.path).expect("IsValidPath"));
    }

    let unknown = format!("/nix/store/{}-gone", "0".repeat(32));
    assert_eq!(
        daemon.query_path_info(&unknown).expect("QueryPathInfo"),
        None
    );
    assert_eq!(
        daemon
            .query_path_from_hash_part(&"0".repeat(32))
            .expect("by hash"),
        None
    );
    assert!(!daemon.is_valid_path(&unknown).expect("IsValidPath"));
    let mut asked = vec![unknown.clone(), many.first.clone(), many.second.clone()];
    asked.sort();
    let mut valid = daemon.query_valid_paths(&asked).expect("QueryValidPaths");
    valid.sort();
    let mut want = vec![many.first.clone(), many.second.clone()];
    want.sort();
    assert_eq!(valid, want);
    assert!(hash_part(&many.first).len() == 32);
}

#[test]
fn bad_input_is_refused_without_breaking_the_pool() {
    let dir = TestDir::new("daemon_bad");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let daemon = pool(&a);
    for bad in ["/nix/store/short", "/etc/passwd", "/nix/store/../etc", ""] {
        assert!(
            matches!(
                daemon.query_path_info(bad),
                Err(DaemonError::InvalidArgument(_))
            ),
            "{bad:?} must be refused before it reaches the daemon"
        );
    }
    assert!(matches!(
        daemon.query_path_from_hash_part("eeee"),
        Err(DaemonError::InvalidArgument(_))
    ));
    assert!(daemon.query_path_info(&many.first).unwrap().is_some());
}

#[test]
fn many_threads_share_one_pool() {
    let dir = TestDir::new("daemon_threads");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.third]);
    let daemon = Arc::new(pool(&a));
    let paths = [many.first.clone(), many.second.clone(), many.third.clone()];
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let daemon = Arc::clone(&daemon);
            let paths = paths.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let path = &paths[(t + i) % paths.len()];
                    let info = daemon.query_path_info(path).expect("QueryPathInfo");
                    assert_eq!(info.map(|i| i.path).as_deref(), Some(path.as_str()));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a worker thread failed");
    }
}

#[test]
fn the_pool_recovers_after_a_daemon_restart() {
    let dir = TestDir::new("daemon_restart");
    let many = many_fixture();
    let mut a = Host::with_paths(&dir, "a", &[&many.first]);
    let daemon = pool(&a);
    assert!(daemon.query_path_info(&many.first).unwrap().is_some());

    // nix-daemon forks a worker per connection, titled `nix-daemon <client
    // pid> <store>`. Killing only the worker kills the pool's idle
    // connection while the daemon lives: the next op must retry on a new one.
    kill_all(&format!("^nix-daemon [0-9]+ .*{}$", a.store()));
    assert!(daemon.query_path_info(&many.first).unwrap().is_some());
    // The streamed listing too, which had handed out nothing when it failed.
    kill_all(&format!("^nix-daemon [0-9]+ .*{}$", a.store()));
    let mut listed = Vec::new();
    daemon
        .for_each_valid_path(|path| listed.push(path.to_string()))
        .expect("the listing retries on a new connection");
    assert_eq!(listed, std::slice::from_ref(&many.first));

    // Now the daemon and its workers: ops fail until it is back.
    kill_all(&format!("^nix-daemon .*{}$", a.store()));
    a.stop_daemon();
    let result = daemon.query_path_info(&many.first);
    assert!(
        matches!(
            result,
            Err(DaemonError::Connect { .. } | DaemonError::Io { .. })
        ),
        "with the daemon gone the op must fail, got {result:?}"
    );
    a.start_daemon();
    assert!(daemon.query_path_info(&many.first).unwrap().is_some());
    daemon.check().expect("the pool reconnects");
}

/// SIGKILLs every process whose command line matches `pattern`, and waits
/// until they are gone.
fn kill_all(pattern: &str) {
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", pattern])
        .status()
        .expect("running pkill");
    assert!(killed.success(), "no process matches {pattern}");
    common::poll_until(&format!("processes matching {pattern} to die"), || {
        let alive = std::process::Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .expect("running pgrep");
        match alive.stdout.is_empty() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&alive.stdout).into_owned()),
        }
    });
}

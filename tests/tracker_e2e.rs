//! The tracker end to end: the real `peerix-tracker` with its real SQLite
//! file in one network namespace, and peerix hosts in others, with LAN
//! discovery off on all of them (a tracker is configured), real nix and
//! real nix-daemons.
//!
//! - B realises a closure only C holds, through the tracker T, and `nix
//!   store verify` passes; a path no one holds is a 404.
//! - T restarts on the same database: the registrations survive, and B
//!   still finds C. T loses its database: the clients register and
//!   announce in full by themselves.
//! - C stops: after the TTL, T no longer lists C, and B's lookups name no
//!   holder (they do not wait on C).

mod common;

use common::lan::*;
use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// The tracker's port in its namespace.
const TRACKER_PORT: u16 = 12305;

fn tracker_binary() -> PathBuf {
    std::env::var_os("PEERIX_TRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_peerix-tracker")))
}

/// `peerix-tracker` in namespace `ns`, on its database `db`; killed on drop.
struct Tracker {
    ns: String,
    addr: SocketAddr,
    db: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Tracker {
    fn start(dir: &TestDir, lan: &Lan, i: usize, db: &Path) -> Tracker {
        let mut tracker = Tracker {
            ns: lan.ns(i).to_string(),
            addr: SocketAddr::from((lan_ip(i), TRACKER_PORT)),
            db: db.to_path_buf(),
            log: dir.join(&format!("tracker-{}.log", unique_number())),
            child: None,
        };
        tracker.run();
        tracker
    }

    fn run(&mut self) {
        let log = std::fs::File::create(&self.log).expect("tracker log");
        let child = netns_command(Some(&self.ns), tracker_binary())
            .args(["--bind", "0.0.0.0", "--port", &TRACKER_PORT.to_string()])
            .arg("--db")
            .arg(&self.db)
            .args(["--peer-ttl", "4"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting peerix-tracker");
        self.child = Some(child);
        poll_until("the tracker to answer /health", || {
            self.get("/health").map(|_| ())
        });
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET `path` on the tracker, from its own namespace.
    fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        let (addr, path) = (self.addr, path.to_string());
        let response = in_netns(&self.ns, move || common::http::get(addr, &path))
            .map_err(|e| e.to_string())?;
        if response.status != 200 {
            return Err(response.describe());
        }
        serde_json::from_slice(&response.body).map_err(|e| e.to_string())
    }

    /// The node ids `/find/<hash>` names.
    fn providers(&self, hash: &str) -> Vec<String> {
        self.get(&format!("/find/{hash}")).map_or_else(
            |_| Vec::new(),
            |answer| {
                answer["providers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["node_id"].as_str().map(str::to_string))
                    .collect()
            },
        )
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- tracker log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The node id a host's peerix reports on `/health`.
fn node_id(host: &LanHost) -> String {
    host.health()["tracker"]["node_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no tracker node id on {}: {}", host.name(), host.health()))
        .to_string()
}

#[test]
fn hosts_find_each_other_through_the_tracker_across_restarts_and_expiry() {
    let many = many_fixture();
    let (dir, lan, up) = world("tracker_e2e", 3);
    let db = dir.join("tracker.sqlite");
    let mut tracker = Tracker::start(&dir, &lan, 0, &db);
    let flags = ["--tracker", &tracker.url()];
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &flags);
    let mut c = signed_host(&dir, &lan, 2, "c", &up, &[&many.second], &flags);
    let closure = c.host.nix.closure(&c.host.store(), &many.second);
    let c_id = node_id(&c);

    // LAN discovery is off: a tracker is configured.
    assert_eq!(b.health()["lan"]["enabled"], false, "{}", b.health());
    for path in &closure {
        let hash = hash_part(path);
        poll_until("T to list C as a holder of C's paths", || {
            let providers = tracker.providers(hash);
            providers
                .contains(&c_id)
                .then_some(())
                .ok_or(format!("{hash}: {providers:?}"))
        });
    }
    substitute_ok(
        &b,
        &up,
        &many.second,
        "nix-store -r in B through the tracker",
    );
    assert_success(
        "nix store verify in B trusting only upstream",
        &b.verify(&[&up.public], &[&many.second]),
    );
    assert!(
        b.health()["tracker"]["lookups"].as_u64().unwrap_or(0) >= 1,
        "{}",
        b.health()
    );
    let nobody = "/00000000000000000000000000000000.narinfo";
    assert_eq!(b.must_get(nobody).status, 404, "a path no one holds");

    // A restart on the same database: the registrations are still there.
    tracker.stop();
    tracker.run();
    let third = hash_part(&many.third).to_string();
    assert!(
        tracker.providers(hash_part(&many.first)).contains(&c_id),
        "C's rows survived the restart"
    );
    // A lost database: C registers and announces in full by itself (its
    // next heartbeat finds the tracker does not know it).
    tracker.stop();
    std::fs::remove_file(&db).expect("removing the tracker's database");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    tracker.run();
    assert!(
        tracker.providers(hash_part(&many.first)).is_empty(),
        "a new database"
    );
    poll_until("C to announce its paths to the new database", || {
        let providers = tracker.providers(hash_part(&many.first));
        providers
            .contains(&c_id)
            .then_some(())
            .ok_or(format!("{providers:?}"))
    });
    assert!(
        tracker.providers(&third).is_empty(),
        "nobody holds many.third"
    );

    // C stops: after the TTL, T no longer lists it, and B's lookups name
    // no holder.
    drop(c.peerix.take());
    poll_until("T to forget C after the TTL", || {
        let peers = tracker.get("/iroh/peers")?;
        let listed = peers.to_string().contains(&c_id);
        (!listed).then_some(()).ok_or(peers.to_string())
    });
    assert!(tracker.providers(hash_part(&many.first)).is_empty());
}

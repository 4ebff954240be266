//! A simulated LAN for peerix's LAN mode, on one machine.
//!
//! [`Lan`] builds a "switch" network namespace holding a Linux bridge and, per
//! host, a namespace joined to the bridge by a veth pair, with address
//! `10.77.0.<i+1>/24` and broadcast `10.77.0.255`. Each test's namespaces are
//! its own, so the subnet repeats freely; only namespace names are global, and
//! they carry the process id and a counter. The veth ends are created inside
//! the namespaces (`p<i>` in the switch, `eth0` in the host), so no interface
//! ever appears in this machine's own namespace and no traffic leaves the test.
//!
//! [`LanHost`] is a [`Host`] (chroot store + its own nix-daemon) living in one
//! of those namespaces, with its own peerix on `0.0.0.0:12304` there; nix
//! commands for it run inside the namespace against `http://127.0.0.1:12304`.
//!
//! [`FakePeer`] is an adversarial peer run by the test process itself: threads
//! whose sockets live in a host's namespace, answering the LAN packets (encoded
//! here by hand, so the test checks the wire format) and serving `/local/...`
//! with a chosen misbehaviour.
//!
//! Everything is stopped and deleted by `Drop`, also when a test panics.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::http::{self, Response};
use super::{
    Host, KeyPair, NixEnv, Peerix, Readiness, TestDir, hash_part, ip, ip_ok, poll_until,
    unique_number,
};

/// The port of every peerix on the simulated LAN, for HTTP and UDP alike.
pub const LAN_PORT: u16 = 12304;
/// The longest a nix command of a LAN host may run: far more than any of
/// them needs, and less than the 300 s after which nix retries a stalled
/// download, so that a stall fails the test instead of hiding in a retry.
pub const NIX_TIME_LIMIT: Duration = Duration::from_secs(90);
/// The broadcast address of the simulated LAN.
pub const BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 255);

/// The address of host `i` on the simulated LAN.
pub fn lan_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, u8::try_from(i + 1).expect("at most 254 hosts"))
}

// ---------------------------------------------------------------------------
// Entering a namespace
// ---------------------------------------------------------------------------

/// A fake host's UDP socket on the LAN port, broadcast allowed; call it
/// inside [`in_netns`].
pub fn lan_udp_socket() -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, LAN_PORT)).into())?;
    Ok(socket.into())
}

/// A fake host's TCP listener on `port` (0: any), all addresses; call it
/// inside [`in_netns`].
pub fn tcp_listener(port: u16, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Run `f` on a fresh thread that has moved into network namespace `ns`, and
/// return its result. Sockets created in `f` belong to `ns` for good, so they
/// may be handed back and used from any thread.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("opening {path} to enter netns {ns}: {e}"));
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

// ---------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------

/// A switch namespace with a bridge, and `n` host namespaces on it. The
/// namespaces are deleted on drop (which deletes the bridge and the veths).
pub struct Lan {
    pub switch: String,
    /// Namespace names of the hosts; host `i` has address [`lan_ip`]`(i)`.
    pub hosts: Vec<String>,
}

impl Lan {
    pub fn new(n: usize) -> Lan {
        assert!((1..=250).contains(&n), "a LAN of {n} hosts");
        let tag = format!("{:x}x{:x}", std::process::id(), unique_number());
        let switch = format!("pxl{tag}s");
        let names: Vec<String> = std::iter::once(switch.clone())
            .chain((0..n).map(|i| format!("pxl{tag}h{i}")))
            .collect();
        // A namespace with our pid in its name can only be left over from a
        // killed run of an earlier process that had the same pid.
        for name in &names {
            if Path::new("/run/netns").join(name).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
        ip_ok(&["netns", "add", &switch]);
        // From here on, Drop cleans up even if a later step fails.
        let mut lan = Lan {
            switch,
            hosts: Vec::new(),
        };
        let sw = lan.switch.clone();
        ip_ok(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, ns) in names[1..].iter().enumerate() {
            let ns = ns.clone();
            ip_ok(&["netns", "add", &ns]);
            lan.hosts.push(ns.clone());
            let port = format!("p{i}");
            ip_ok(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip_ok(&["-n", &sw, "link", "set", &port, "master", "br0"]);
            ip_ok(&["-n", &sw, "link", "set", &port, "up"]);
            let addr = format!("{}/24", lan_ip(i));
            ip_ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &addr,
                "brd",
                &BROADCAST.to_string(),
                "dev",
                "eth0",
            ]);
            ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        // Without STP a bridge port forwards as soon as it is up; check it,
        // so that a lost first broadcast never looks like a peerix bug.
        for i in 0..n {
            let port = format!("p{i}");
            poll_until(&format!("bridge port {port} in {sw} to forward"), || {
                let out = ip(&["-n", &sw, "-d", "link", "show", &port]);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if text.contains("state forwarding") && text.contains("LOWER_UP") {
                    Ok(())
                } else {
                    Err(text)
                }
            });
        }
        lan
    }

    /// Namespace name of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let out = ip(&["netns", "del", ns]);
            if !out.status.success() {
                eprintln!(
                    "warning: could not delete netns {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Hosts on the LAN
// ---------------------------------------------------------------------------

/// A host on the simulated LAN: a chroot store with its own nix-daemon, nix
/// commands run in the host's namespace, and (once started) its own peerix.
pub struct LanHost {
    /// Declared first so that it stops before the daemon it talks to.
    pub peerix: Option<Peerix>,
    pub host: Host,
    pub ns: String,
    pub ip: Ipv4Addr,
    dir: PathBuf,
}

impl LanHost {
    /// Host `i` of `lan`, its store holding the closures of `paths` (unsigned,
    /// like local builds), its nix-daemon running. No peerix yet.
    pub fn new(dir: &TestDir, lan: &Lan, i: usize, name: &str, paths: &[&str]) -> LanHost {
        let mut host = Host::new(dir, name);
        host.nix.netns = Some(lan.ns(i).to_string());
        host.nix.time_limit = Some(NIX_TIME_LIMIT);
        if !paths.is_empty() {
            host.add_closure(paths);
        }
        host.start_daemon();
        LanHost {
            peerix: None,
            host,
            ns: lan.ns(i).to_string(),
            ip: lan_ip(i),
            dir: dir.path.clone(),
        }
    }

    /// Start peerix in this host's namespace on port 12304, trusting `key`
    /// (for shared paths and peers' narinfos alike), plus `extra` flags; waits
    /// for its first scan.
    pub fn start_peerix(&mut self, dir: &TestDir, key: &KeyPair, extra: &[&str]) {
        assert!(
            self.peerix.is_none(),
            "peerix of {} already runs",
            self.name()
        );
        let mut args = vec!["--trusted-key", key.public.as_str()];
        args.extend_from_slice(extra);
        self.peerix = Some(Peerix::spawn_in_netns(
            dir,
            &self.host,
            &self.ns,
            LAN_PORT,
            &args,
            Readiness::Scanned,
        ));
    }

    pub fn name(&self) -> &str {
        &self.host.name
    }

    pub fn peerix(&self) -> &Peerix {
        self.peerix
            .as_ref()
            .unwrap_or_else(|| panic!("peerix of host {} is not running", self.host.name))
    }

    pub fn peerix_mut(&mut self) -> &mut Peerix {
        let name = self.host.name.clone();
        self.peerix
            .as_mut()
            .unwrap_or_else(|| panic!("peerix of host {name} is not running"))
    }

    /// This host's peerix as peers see it: `<ip>:12304`.
    pub fn peer_addr(&self) -> String {
        format!("{}:{LAN_PORT}", self.ip)
    }

    /// The local substituter URL, valid inside this host's namespace.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{LAN_PORT}")
    }

    /// A nix environment in this host's namespace with a fresh
    /// `XDG_CACHE_HOME`, so that no narinfo answer (positive or negative) of
    /// an earlier command is reused.
    pub fn nix(&self) -> NixEnv {
        let mut env = self.host.nix.clone();
        env.cache_dir = self
            .dir
            .join(format!("{}-xdg-{}", self.host.name, unique_number()));
        std::fs::create_dir_all(&env.cache_dir).expect("creating a fresh XDG_CACHE_HOME");
        env
    }

    /// `nix-store -r PATH` into this host's store with its own peerix as the
    /// only substituter and `keys` as the only trusted keys.
    pub fn substitute(&self, keys: &[&str], path: &str) -> Output {
        self.nix()
            .substitute(&self.host.store(), &self.url(), keys, path)
    }

    /// `nix store verify -r` in this host's store, trusting only `keys`.
    pub fn verify(&self, keys: &[&str], paths: &[&str]) -> Output {
        self.nix().verify(&self.host.store(), keys, paths)
    }

    /// GET `path` from this host's own peerix, from inside its namespace
    /// (so the root endpoints answer).
    pub fn get(&self, path: &str) -> io::Result<Response> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, LAN_PORT));
        let path = path.to_string();
        in_netns(&self.ns, move || http::get(addr, &path))
    }

    /// GET that must answer; panics with the error otherwise.
    pub fn must_get(&self, path: &str) -> Response {
        self.get(path).unwrap_or_else(|e| {
            panic!(
                "GET {path} from peerix of {}: expected a response, got {e}",
                self.name()
            )
        })
    }

    /// `/health` of this host's peerix.
    pub fn health(&self) -> serde_json::Value {
        self.peerix()
            .health()
            .unwrap_or_else(|e| panic!("/health of {}: {e}", self.name()))
    }

    /// A number under `/health`'s `lan` object (0 if absent).
    pub fn lan_counter(&self, key: &str) -> u64 {
        self.health()["lan"][key].as_u64().unwrap_or(0)
    }

    /// The `/health` `peers` entry for `addr` (`ip:port`), if any.
    pub fn peer_entry(&self, addr: &str) -> Option<serde_json::Value> {
        self.health()["peers"]
            .as_array()?
            .iter()
            .find(|p| p["addr"] == addr)
            .cloned()
    }
}

// ---------------------------------------------------------------------------
// Raw LAN packets, encoded by hand from the documented wire format
// ---------------------------------------------------------------------------

/// `[0x00][id u32 BE][32-char hash part]`
pub fn request_packet(id: u32, hash: &str) -> Vec<u8> {
    let mut packet = vec![0u8];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(hash.as_bytes());
    packet
}

/// `[0x01][id u32 BE][http port u32 BE]["local/<hash>.narinfo"]`
pub fn response_packet(id: u32, port: u32, hash: &str) -> Vec<u8> {
    let mut packet = vec![1u8];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet.extend_from_slice(format!("local/{hash}.narinfo").as_bytes());
    packet
}

/// A request packet, if `packet` is exactly one: `(id, hash part)`.
fn parse_request(packet: &[u8]) -> Option<(u32, String)> {
    if packet.len() != 37 || packet[0] != 0 {
        return None;
    }
    let id = u32::from_be_bytes(packet[1..5].try_into().ok()?);
    let hash = std::str::from_utf8(&packet[5..]).ok()?;
    Some((id, hash.to_string()))
}

/// A UDP socket for probing the LAN by hand, bound to an ephemeral port in
/// namespace `ns`, allowed to broadcast. Reads time out after 100 ms.
pub fn probe_socket(ns: &str) -> UdpSocket {
    let socket = in_netns(ns, || UdpSocket::bind("0.0.0.0:0"))
        .unwrap_or_else(|e| panic!("binding a UDP probe socket in {ns}: {e}"));
    socket.set_broadcast(true).expect("SO_BROADCAST on probe");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout on probe");
    socket
}

/// Collect datagrams on `socket` until `done` says so (bounded by
/// `poll_until`'s limit), then for `linger` more. Returns `(sender, bytes)`.
pub fn collect_datagrams(
    socket: &UdpSocket,
    what: &str,
    done: impl Fn(&[(SocketAddr, Vec<u8>)]) -> bool,
    linger: Duration,
) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    poll_until(what, || {
        // Each poll step drains what has arrived; recv times out in 100 ms.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            got.push((from, buf[..n].to_vec()));
        }
        if done(&got) {
            Ok(())
        } else {
            Err(format!("{} datagrams so far: {:?}", got.len(), got))
        }
    });
    let steps = linger.as_millis() / 100 + 1;
    for _ in 0..steps {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            got.push((from, buf[..n].to_vec()));
        }
    }
    got
}

// ---------------------------------------------------------------------------
// Fixtures for the LAN tests
// ---------------------------------------------------------------------------

/// The narinfo a peer serves under `/local` for `info`, written from the path
/// info as nix prints it (not by peerix), with the NAR URL relative to /local.
pub fn narinfo_for(info: &super::PathInfo) -> String {
    let hash = hash_part(&info.path);
    let nix32 = info.nar_hash.trim_start_matches("sha256:");
    let refs: Vec<&str> = info
        .references
        .iter()
        .map(|r| super::base_name(r))
        .collect();
    let mut text = format!(
        "StorePath: {}\nURL: nar/{hash}-{nix32}.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        info.path,
        info.nar_hash,
        info.nar_size,
        refs.join(" ")
    );
    if let Some(deriver) = &info.deriver {
        text.push_str(&format!("Deriver: {}\n", super::base_name(deriver)));
    }
    for sig in &info.signatures {
        text.push_str(&format!("Sig: {sig}\n"));
    }
    if let Some(ca) = &info.ca {
        text.push_str(&format!("CA: {ca}\n"));
    }
    text
}

/// The NAR file name under `nar/` for `info`.
pub fn nar_file(info: &super::PathInfo) -> String {
    format!(
        "{}-{}.nar",
        hash_part(&info.path),
        info.nar_hash.trim_start_matches("sha256:")
    )
}

/// XOR one byte of a file in place (same size): the NAR stays well-formed, but
/// its hash no longer matches the store's NarHash.
pub fn flip_byte(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap_or_else(|e| panic!("opening {} to corrupt it: {e}", file.display()));
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, offset)
        .unwrap_or_else(|e| panic!("reading byte {offset} of {}: {e}", file.display()));
    byte[0] ^= 0x01;
    f.write_all_at(&byte, offset)
        .unwrap_or_else(|e| panic!("writing byte {offset} of {}: {e}", file.display()));
}

/// `len` bytes of deterministic garbage.
pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The fake peer
// ---------------------------------------------------------------------------

/// How a fake peer serves a NAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NarMode {
    /// The real bytes (and `Range: bytes=N-` honoured).
    Honest,
    /// `200` with the right Content-Length, but bytes that are not the NAR.
    Garbage,
    /// `200` with the right Content-Length; send this many real bytes, then close.
    CloseAfter(u64),
}

/// How a fake peer's TCP side behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// Serve `/local/...` as its items say.
    Serve,
    /// No TCP listener at all: connections are refused.
    Refuse,
    /// Accept connections, read the request, never answer (until stopped).
    Hang,
}

/// One path a fake peer claims to have.
#[derive(Clone)]
pub struct FakeItem {
    pub hash: String,
    pub narinfo: String,
    /// The NAR file name under `/local/nar/`.
    pub nar_file: String,
    pub nar: Arc<Vec<u8>>,
    pub mode: NarMode,
}

impl FakeItem {
    /// `path` as it is in `source`'s store (narinfo from `nix path-info`, NAR
    /// from `nix-store --dump`), served as `mode` says.
    pub fn from_store(source: &Host, path: &str, mode: NarMode) -> FakeItem {
        let info = source
            .path_infos(&[path], false)
            .pop()
            .unwrap_or_else(|| panic!("path info of {path} in {}", source.name));
        FakeItem {
            hash: hash_part(path).to_string(),
            narinfo: narinfo_for(&info),
            nar_file: nar_file(&info),
            nar: Arc::new(source.dump(path)),
            mode,
        }
    }
}

/// What a fake peer has seen and done.
#[derive(Default, Debug)]
pub struct FakeStats {
    pub udp_requests: AtomicU64,
    pub udp_replies: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub narinfo_requests: AtomicU64,
    pub nar_requests: AtomicU64,
    /// NAR responses cut short on purpose (`CloseAfter`).
    pub nars_cut: AtomicU64,
    /// NAR responses that sent garbage.
    pub nars_garbage: AtomicU64,
}

impl FakeStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// An adversarial peer in a host's namespace: answers LAN requests for its
/// items on UDP 12304 and serves `/local/...` on TCP 12304 as `TcpMode` says.
/// Stopped (threads joined, connections shut) on drop.
pub struct FakePeer {
    pub stats: Arc<FakeStats>,
    pub ip: Ipv4Addr,
    tcp: TcpMode,
    /// Whether connections are held without an answer (`TcpMode::Hang`).
    hang: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Poll interval of the fake peer's loops: how fast it notices a stop.
const FAKE_TICK: Duration = Duration::from_millis(50);
/// Upper bound on anything a fake peer's connection waits for.
const FAKE_IO_TIMEOUT: Duration = Duration::from_secs(30);

impl FakePeer {
    /// Start a fake peer in host `i`'s namespace of `lan`.
    pub fn start(lan: &Lan, i: usize, items: Vec<FakeItem>, tcp: TcpMode) -> FakePeer {
        FakePeer::start_late(lan, i, items, tcp, Duration::ZERO)
    }

    /// [`FakePeer::start`], for a peer whose UDP replies leave `udp_delay`
    /// after the query came in: a Wi-Fi peer, or one under load.
    pub fn start_late(
        lan: &Lan,
        i: usize,
        items: Vec<FakeItem>,
        tcp: TcpMode,
        udp_delay: Duration,
    ) -> FakePeer {
        let ns = lan.ns(i).to_string();
        let items: Arc<HashMap<String, FakeItem>> =
            Arc::new(items.into_iter().map(|i| (i.hash.clone(), i)).collect());
        let (udp, listener) = in_netns(&ns, || {
            let udp = lan_udp_socket()?;
            let listener = match tcp {
                TcpMode::Refuse => None,
                TcpMode::Serve | TcpMode::Hang => Some(tcp_listener(LAN_PORT, 64)?),
            };
            io::Result::Ok((udp, listener))
        })
        .unwrap_or_else(|e| panic!("binding the fake peer's sockets in {ns}: {e}"));
        let mut peer = FakePeer {
            stats: Arc::new(FakeStats::default()),
            ip: lan_ip(i),
            tcp,
            hang: Arc::new(AtomicBool::new(tcp == TcpMode::Hang)),
            stop: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        };
        udp.set_read_timeout(Some(FAKE_TICK))
            .expect("read timeout on fake UDP socket");
        // Make itself heard, as a peer does when its own nix asks the LAN
        // for something: peerix hosts then know a host without a store
        // summary is there, and keep asking the LAN by broadcast.
        let _ = udp.send_to(
            &request_packet(0xfa4e_0000 | i as u32, "00000000000000000000000000000000"),
            SocketAddr::from((BROADCAST, LAN_PORT)),
        );
        {
            let (stop, stats, items) = (peer.stop.clone(), peer.stats.clone(), items.clone());
            peer.threads.push(thread::spawn(move || {
                fake_udp(&udp, &stop, &stats, &items, udp_delay)
            }));
        }
        if let Some(listener) = listener {
            listener
                .set_nonblocking(true)
                .expect("nonblocking fake listener");
            let (stop, stats, conns, hang) = (
                peer.stop.clone(),
                peer.stats.clone(),
                peer.connections.clone(),
                peer.hang.clone(),
            );
            peer.threads.push(thread::spawn(move || {
                fake_accept(&listener, &hang, &stop, &stats, &conns, &items)
            }));
        }
        peer
    }

    pub fn addr(&self) -> String {
        format!("{}:{LAN_PORT}", self.ip)
    }

    /// From now on, hold every new connection without an answer: a peer
    /// that served well, then hung (UDP still answers).
    pub fn hang_from_now(&self) {
        assert!(
            self.tcp != TcpMode::Refuse,
            "a fake peer started with TcpMode::Refuse has no listener to hang"
        );
        self.hang.store(true, Ordering::SeqCst);
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for stream in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn fake_udp(
    socket: &UdpSocket,
    stop: &AtomicBool,
    stats: &FakeStats,
    items: &HashMap<String, FakeItem>,
    delay: Duration,
) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(_) => continue, // timeout: check the stop flag
        };
        let Some((id, hash)) = parse_request(&buf[..n]) else {
            continue;
        };
        stats.udp_requests.fetch_add(1, Ordering::SeqCst);
        if items.contains_key(&hash) {
            // Queries are answered one at a time: a delay holds the next
            // one too, as a slow link would.
            thread::sleep(delay);
            let reply = response_packet(id, u32::from(LAN_PORT), &hash);
            if socket.send_to(&reply, from).is_ok() {
                stats.udp_replies.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn fake_accept(
    listener: &TcpListener,
    hang: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
    stats: &Arc<FakeStats>,
    connections: &Arc<Mutex<Vec<TcpStream>>>,
    items: &Arc<HashMap<String, FakeItem>>,
) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(FAKE_TICK / 5);
                continue;
            }
            Err(_) => continue,
        };
        stats.tcp_connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(FAKE_TICK));
        let _ = stream.set_write_timeout(Some(FAKE_IO_TIMEOUT));
        if let Ok(clone) = stream.try_clone() {
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(clone);
        }
        let hang = hang.load(Ordering::SeqCst);
        let (stop, stats, items) = (stop.clone(), stats.clone(), items.clone());
        handlers.push(thread::spawn(move || {
            let closer = stream.try_clone();
            let _ = fake_connection(stream, hang, &stop, &stats, &items);
            // The registry holds a clone of this socket: dropping ours would
            // not close it, so the client would wait for EOF until we stop.
            if let Ok(closer) = closer {
                let _ = closer.shutdown(Shutdown::Both);
            }
        }));
    }
    for handler in handlers {
        let _ = handler.join();
    }
}

/// Read one request head; `None` if the client left or we were stopped.
fn read_head(stream: &mut TcpStream, stop: &AtomicBool) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let limit = FAKE_IO_TIMEOUT.as_millis() / FAKE_TICK.as_millis();
    for _ in 0..limit {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Some(String::from_utf8_lossy(&head[..end]).into_owned());
                }
                if head.len() > 64 * 1024 {
                    return None;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(_) => return None,
        }
    }
    None
}

fn fake_connection(
    mut stream: TcpStream,
    hang: bool,
    stop: &AtomicBool,
    stats: &FakeStats,
    items: &HashMap<String, FakeItem>,
) -> io::Result<()> {
    let Some(head) = read_head(&mut stream, stop) else {
        return Ok(());
    };
    if hang {
        // Never answer; hold the connection until stopped.
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(FAKE_TICK);
        }
        return Ok(());
    }
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let range_start: Option<u64> = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| {
            v.trim()
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        });
    let head_only = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");

    let respond = |stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        let text = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(text.as_bytes())?;
        if !head_only {
            stream.write_all(body)?;
        }
        stream.flush()
    };

    if path == "/local/nix-cache-info" {
        return respond(
            &mut stream,
            "200 OK",
            "Content-Type: text/x-nix-cache-info\r\n",
            b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 5\n",
        );
    }
    if let Some(hash) = path
        .strip_prefix("/local/")
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        stats.narinfo_requests.fetch_add(1, Ordering::SeqCst);
        return match items.get(hash) {
            Some(item) => respond(
                &mut stream,
                "200 OK",
                "Content-Type: text/x-nix-narinfo\r\n",
                item.narinfo.as_bytes(),
            ),
            None => respond(&mut stream, "404 Not Found", "", b"not found\n"),
        };
    }
    let item = path
        .strip_prefix("/local/nar/")
        .and_then(|file| items.values().find(|i| i.nar_file == file));
    let Some(item) = item else {
        return respond(&mut stream, "404 Not Found", "", b"not found\n");
    };
    stats.nar_requests.fetch_add(1, Ordering::SeqCst);
    let size = item.nar.len() as u64;
    match item.mode {
        NarMode::Honest => match range_start {
            Some(start) if start < size => {
                let headers = format!(
                    "Content-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\nContent-Range: bytes {start}-{}/{size}\r\n",
                    size - 1
                );
                respond(
                    &mut stream,
                    "206 Partial Content",
                    &headers,
                    &item.nar[start as usize..],
                )
            }
            _ => respond(
                &mut stream,
                "200 OK",
                "Content-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\n",
                &item.nar,
            ),
        },
        NarMode::Garbage => {
            stats.nars_garbage.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut stream,
                "200 OK",
                "Content-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\n",
                &garbage(item.nar.len(), size),
            )
        }
        NarMode::CloseAfter(n) => {
            stats.nars_cut.fetch_add(1, Ordering::SeqCst);
            let text = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\nContent-Length: {size}\r\n\r\n"
            );
            stream.write_all(text.as_bytes())?;
            if !head_only {
                let n = n.min(size) as usize;
                stream.write_all(&item.nar[..n])?;
            }
            stream.flush()?;
            stream.shutdown(Shutdown::Both)
        }
    }
}

/// Wait until `host`'s `/health` shows the peer `addr` as `ready` says;
/// returns that entry.
pub fn wait_peer(
    host: &LanHost,
    addr: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_until(what, || {
        let health = host.peerix().health()?;
        let entry = health["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["addr"] == addr).cloned());
        match entry {
            Some(entry) if ready(&entry) => Ok(entry),
            _ => Err(format!("peers of {}: {}", host.name(), health["peers"])),
        }
    })
}

// ---------------------------------------------------------------------------
// The test world shared by the LAN tests
// ---------------------------------------------------------------------------

/// The name of the test upstream key (as cache.nixos.org-1 is upstream's).
pub const UPSTREAM: &str = "upstream-test-1";

/// A test's scratch dir, its LAN of `n` hosts and the upstream key pair.
pub fn world(name: &str, n: usize) -> (TestDir, Lan, KeyPair) {
    let dir = TestDir::new(name);
    let lan = Lan::new(n);
    let upstream = NixEnv::new(&dir.subdir("keys")).generate_key(&dir.path, UPSTREAM);
    (dir, lan, upstream)
}

/// LAN host `i` holding the closures of `paths`, signed by `key`, with its
/// peerix started with `extra` flags.
pub fn signed_host(
    dir: &TestDir,
    lan: &Lan,
    i: usize,
    name: &str,
    key: &KeyPair,
    paths: &[&str],
    extra: &[&str],
) -> LanHost {
    let mut host = LanHost::new(dir, lan, i, name, paths);
    if !paths.is_empty() {
        host.host.sign(key, paths, true);
    }
    host.start_peerix(dir, key, extra);
    host
}

/// A store outside the LAN holding the closures of `paths` signed by `key`:
/// where a fake peer's narinfos and NARs come from.
pub fn source_store(dir: &TestDir, key: &KeyPair, paths: &[&str]) -> Host {
    let host = Host::new(dir, "src");
    host.add_closure(paths);
    host.sign(key, paths, true);
    host
}

/// `nix-store -r PATH` in `host` must succeed on this attempt.
pub fn substitute_ok(host: &LanHost, key: &KeyPair, path: &str, what: &str) {
    let out = host.substitute(&[&key.public], path);
    super::assert_success(what, &out);
}

// ---------------------------------------------------------------------------
// Store summaries, written and read by the test from the documented format
// (src/lan/summary.rs), not with peerix's own code
// ---------------------------------------------------------------------------

/// Probes per path of a version-1 summary.
pub const SUMMARY_PROBES: u64 = 7;
/// The header of a version-1 summary, in bytes.
pub const SUMMARY_HEADER: usize = 24;

/// The filter length, in bits, a version-1 summary of `count` paths has.
pub fn summary_filter_bits(count: u32) -> u64 {
    (u64::from(count) * 10).div_ceil(8) * 8
}

/// The 20 bytes a 32-character nix32 hash part stands for (Nix's base32:
/// the last character holds the lowest bits).
pub fn nix32_decode_hash_part(hash: &str) -> [u8; 20] {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    assert_eq!(hash.len(), 32, "a hash part has 32 characters: {hash:?}");
    let mut bytes = [0u8; 20];
    for (n, c) in hash.bytes().rev().enumerate() {
        let digit = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("{:?} is not a nix32 character in {hash}", c as char))
            as u16;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let shifted = digit << j;
        bytes[i] |= shifted as u8;
        if i + 1 < bytes.len() {
            bytes[i + 1] |= (shifted >> 8) as u8;
        }
    }
    bytes
}

/// The bits a hash part sets in a filter of `bits` bits: `(h1 + j * h2) mod
/// bits`, `h1`, `h2` the first and second 8 bytes little-endian, `h2 | 1`.
pub fn summary_probes(hash: &str, bits: u64) -> Vec<u64> {
    let bytes = nix32_decode_hash_part(hash);
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (h1, h2) = (word(0), word(8) | 1);
    (0..SUMMARY_PROBES)
        .map(|j| h1.wrapping_add(j.wrapping_mul(h2)) % bits)
        .collect()
}

/// A summary's wire form with the header fields as given: magic `PXSM`,
/// `version`, 7 probes, 2 reserved bytes, then generation, count and the
/// filter's length in bits (little-endian), then `filter`.
pub fn summary_wire(version: u8, generation: u64, count: u32, filter: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SUMMARY_HEADER + filter.len());
    out.extend_from_slice(b"PXSM");
    out.push(version);
    out.push(SUMMARY_PROBES as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    let bits = u32::try_from(filter.len() * 8).expect("a filter under 4 Gbit");
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(filter);
    out
}

/// An honest version-1 summary of `hashes` at `generation`.
pub fn build_summary(generation: u64, hashes: &[&str]) -> Vec<u8> {
    let count = u32::try_from(hashes.len()).expect("count fits u32");
    let bits = summary_filter_bits(count);
    let mut filter = vec![0u8; (bits / 8) as usize];
    if bits > 0 {
        for hash in hashes {
            for bit in summary_probes(hash, bits) {
                filter[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
    }
    summary_wire(1, generation, count, &filter)
}

/// A version-1 summary as the test reads it.
#[derive(Clone, Debug)]
pub struct SummaryView {
    pub generation: u64,
    pub count: u32,
    pub filter: Vec<u8>,
}

impl SummaryView {
    /// Reads a version-1 summary; panics (naming `what`) on anything else.
    pub fn parse(bytes: &[u8], what: &str) -> SummaryView {
        assert!(
            bytes.len() >= SUMMARY_HEADER,
            "{what}: {} bytes, shorter than the header",
            bytes.len()
        );
        assert_eq!(&bytes[..4], b"PXSM", "{what}: magic");
        assert_eq!(bytes[4], 1, "{what}: version");
        assert_eq!(u64::from(bytes[5]), SUMMARY_PROBES, "{what}: probes");
        assert_eq!(bytes[6..8], [0, 0], "{what}: reserved bytes");
        let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let bits = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        assert_eq!(
            u64::from(bits),
            summary_filter_bits(count),
            "{what}: filter bits for {count} paths"
        );
        assert_eq!(
            bytes.len() as u64,
            SUMMARY_HEADER as u64 + u64::from(bits) / 8,
            "{what}: length"
        );
        SummaryView {
            generation,
            count,
            filter: bytes[SUMMARY_HEADER..].to_vec(),
        }
    }

    /// Whether the summary may contain `hash` (false: it does not).
    pub fn may_contain(&self, hash: &str) -> bool {
        let bits = self.filter.len() as u64 * 8;
        bits > 0
            && summary_probes(hash, bits)
                .into_iter()
                .all(|bit| self.filter[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }
}

/// `[0x02][generation u64 BE][paths u32 BE][http port u32 BE]`
pub fn announce_packet(generation: u64, paths: u32, port: u32) -> Vec<u8> {
    let mut packet = vec![2u8];
    packet.extend_from_slice(&generation.to_be_bytes());
    packet.extend_from_slice(&paths.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet
}

// ---------------------------------------------------------------------------
// A fake host that announces a store summary
// ---------------------------------------------------------------------------

/// What a [`FakeSummaryHost`] answers to `GET /local/summary`.
#[derive(Clone, Debug)]
pub enum SummaryServe {
    /// `200` with these bytes.
    Bytes(Vec<u8>),
    /// This status, with a short text body.
    Status(u16),
}

/// How a [`FakeSummaryHost`] behaves.
pub struct SummaryHostSpec {
    /// The generation it announces.
    pub generation: u64,
    /// The path count it announces.
    pub paths: u32,
    /// What `/local/summary` serves (whatever was announced).
    pub summary: SummaryServe,
    /// The paths it has: LAN queries for them are answered, and their
    /// narinfos and NARs are served honestly.
    pub items: Vec<FakeItem>,
    /// Answer every LAN query, held or not (a host that claims everything).
    pub answer_every_query: bool,
}

/// A peer of peerix-rs's kind, run by the test: it announces a store summary
/// over UDP once at start (broadcast) and to every host that solicits one,
/// and serves `/local/summary` as its spec says, on port 12304 in host `i`'s
/// namespace. Stopped (threads joined) on drop.
pub struct FakeSummaryHost {
    /// UDP queries seen and answered; narinfo and NAR requests served.
    pub stats: Arc<FakeStats>,
    /// `GET /local/summary` requests, with the address they came from.
    pub summary_requests: Arc<Mutex<Vec<Ipv4Addr>>>,
    pub ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeSummaryHost {
    pub fn start(lan: &Lan, i: usize, spec: SummaryHostSpec) -> FakeSummaryHost {
        let ns = lan.ns(i).to_string();
        let (udp, listener) = in_netns(&ns, || {
            io::Result::Ok((lan_udp_socket()?, tcp_listener(LAN_PORT, 64)?))
        })
        .unwrap_or_else(|e| panic!("binding the fake summary host's sockets in {ns}: {e}"));
        let spec = Arc::new(spec);
        let mut host = FakeSummaryHost {
            stats: Arc::new(FakeStats::default()),
            summary_requests: Arc::new(Mutex::new(Vec::new())),
            ip: lan_ip(i),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        udp.set_read_timeout(Some(FAKE_TICK))
            .expect("read timeout on the fake summary host's UDP socket");
        listener
            .set_nonblocking(true)
            .expect("nonblocking fake summary listener");
        let announcement = announce_packet(spec.generation, spec.paths, u32::from(LAN_PORT));
        udp.send_to(&announcement, SocketAddr::from((BROADCAST, LAN_PORT)))
            .expect("broadcasting the fake host's announcement");
        {
            let (stop, stats, spec) = (host.stop.clone(), host.stats.clone(), spec.clone());
            host.threads.push(thread::spawn(move || {
                summary_host_udp(&udp, &stop, &stats, &spec, &announcement)
            }));
        }
        {
            let (stop, stats, requests) = (
                host.stop.clone(),
                host.stats.clone(),
                host.summary_requests.clone(),
            );
            host.threads.push(thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let (stream, from) = match listener.accept() {
                        Ok(accepted) => accepted,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(FAKE_TICK / 5);
                            continue;
                        }
                        Err(_) => continue,
                    };
                    stats.tcp_connections.fetch_add(1, Ordering::SeqCst);
                    let (stop, stats, requests, spec) =
                        (stop.clone(), stats.clone(), requests.clone(), spec.clone());
                    handlers.push(thread::spawn(move || {
                        let from = match from.ip() {
                            std::net::IpAddr::V4(v4) => v4,
                            std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
                        };
                        let _ =
                            summary_host_connection(stream, from, &stop, &stats, &requests, &spec);
                    }));
                }
                for handler in handlers {
                    let _ = handler.join();
                }
            }));
        }
        host
    }

    /// `ip:12304`.
    pub fn addr(&self) -> String {
        format!("{}:{LAN_PORT}", self.ip)
    }

    /// How many times `from` fetched `/local/summary`.
    pub fn summary_requests_from(&self, from: Ipv4Addr) -> usize {
        self.summary_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|&&ip| ip == from)
            .count()
    }
}

impl Drop for FakeSummaryHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn summary_host_udp(
    socket: &UdpSocket,
    stop: &AtomicBool,
    stats: &FakeStats,
    spec: &SummaryHostSpec,
    announcement: &[u8],
) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue; // timeout: check the stop flag
        };
        if buf[..n] == [3] {
            let _ = socket.send_to(announcement, from);
            continue;
        }
        let Some((id, hash)) = parse_request(&buf[..n]) else {
            continue;
        };
        stats.udp_requests.fetch_add(1, Ordering::SeqCst);
        if spec.answer_every_query || spec.items.iter().any(|item| item.hash == hash) {
            let reply = response_packet(id, u32::from(LAN_PORT), &hash);
            if socket.send_to(&reply, from).is_ok() {
                stats.udp_replies.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn summary_host_connection(
    mut stream: TcpStream,
    from: Ipv4Addr,
    stop: &AtomicBool,
    stats: &FakeStats,
    requests: &Mutex<Vec<Ipv4Addr>>,
    spec: &SummaryHostSpec,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(FAKE_TICK))?;
    stream.set_write_timeout(Some(FAKE_IO_TIMEOUT))?;
    let Some(head) = read_head(&mut stream, stop) else {
        return Ok(());
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let head_only = parts.next() == Some("HEAD");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let mut respond = |status: &str, kind: &str, body: &[u8]| {
        let text = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(text.as_bytes())?;
        if !head_only {
            stream.write_all(body)?;
        }
        stream.flush()?;
        stream.shutdown(Shutdown::Both)
    };
    if path == "/local/summary" {
        requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(from);
        return match &spec.summary {
            SummaryServe::Bytes(bytes) => respond("200 OK", "application/octet-stream", bytes),
            SummaryServe::Status(code) => respond(
                &format!("{code} Status"),
                "text/plain",
                b"no summary here\n",
            ),
        };
    }
    if let Some(hash) = path
        .strip_prefix("/local/")
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        stats.narinfo_requests.fetch_add(1, Ordering::SeqCst);
        return match spec.items.iter().find(|item| item.hash == hash) {
            Some(item) => respond("200 OK", "text/x-nix-narinfo", item.narinfo.as_bytes()),
            None => respond("404 Not Found", "text/plain", b"not found\n"),
        };
    }
    let item = path
        .strip_prefix("/local/nar/")
        .and_then(|file| spec.items.iter().find(|item| item.nar_file == file));
    match item {
        Some(item) => {
            stats.nar_requests.fetch_add(1, Ordering::SeqCst);
            respond("200 OK", "application/x-nix-nar", &item.nar)
        }
        None => respond("404 Not Found", "text/plain", b"not found\n"),
    }
}

//! Records the real traffic the fuzz seeds are made of (see make-seeds.sh).
//!
//! - `record daemon SOCKET OUT PATH...`: runs peerix's own daemon client
//!   against the nix-daemon at SOCKET through a relay, and writes what the
//!   daemon sent on each connection as a seed of the `daemon` target (one
//!   byte of op count and the op bytes first, as that target reads them).
//!   The PATHs must be valid in the daemon's store.
//! - `record http LISTEN_PORT UPSTREAM_PORT OUT`: a loopback TCP relay that
//!   appends what each client sent to OUT/conn-N, until killed.
//! - `record packets OUT HASH...`: LAN packets as peerix and the original
//!   peerix send them, for these hash parts.
//! - `record free-port`: prints a free loopback TCP port.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;

use peerix::lan::packet::Packet;
use peerix::nix::store_path::HashPart;
use peerix::store::daemon::DaemonPool;

/// Op bytes of the `daemon` fuzz target.
const IS_VALID_PATH: u8 = 0;
const QUERY_ALL_VALID_PATHS: u8 = 1;
const QUERY_PATH_INFO: u8 = 2;
const QUERY_PATH_FROM_HASH_PART: u8 = 3;
const QUERY_VALID_PATHS: u8 = 4;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("daemon") if args.len() >= 4 => {
            daemon(Path::new(&args[1]), Path::new(&args[2]), &args[3..])
        }
        Some("http") if args.len() == 4 => http(&args[1], &args[2], Path::new(&args[3])),
        Some("packets") if args.len() >= 3 => packets(Path::new(&args[1]), &args[2..]),
        Some("free-port") => {
            let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
            println!("{}", listener.local_addr().expect("its address").port());
        }
        _ => {
            eprintln!(
                "usage: record daemon SOCKET OUT PATH... | http LISTEN UPSTREAM OUT | packets OUT HASH... | free-port"
            );
            std::process::exit(2);
        }
    }
}

/// Copies `from` to `to` until EOF, keeping a copy when `keep` is given.
fn pump(mut from: impl Read, mut to: impl Write, mut keep: Option<&mut Vec<u8>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(keep) = keep.as_deref_mut() {
                    keep.extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Relays one connection on `relay` to `upstream`; returns what upstream sent.
fn relay_once(listener: &UnixListener, upstream: &Path) -> thread::JoinHandle<Vec<u8>> {
    let (client, _) = listener.accept().expect("accepting the client");
    let daemon = UnixStream::connect(upstream).expect("connecting to nix-daemon");
    thread::spawn(move || {
        let (client_r, daemon_w) = (client.try_clone().unwrap(), daemon.try_clone().unwrap());
        let up = thread::spawn(move || {
            pump(&client_r, &daemon_w, None);
            let _ = daemon_w.shutdown(Shutdown::Write);
        });
        let mut sent = Vec::new();
        pump(&daemon, &client, Some(&mut sent));
        let _ = client.shutdown(Shutdown::Write);
        up.join().unwrap();
        sent
    })
}

fn daemon(socket: &Path, out: &Path, paths: &[String]) {
    fs::create_dir_all(out).expect("creating the output dir");
    let relay = std::env::temp_dir().join(format!("peerix-record-{}.sock", std::process::id()));
    let _ = fs::remove_file(&relay);
    let listener = UnixListener::bind(&relay).expect("binding the relay socket");
    let missing = "/nix/store/00000000000000000000000000000000-not-there".to_string();
    let missing_hash = "00000000000000000000000000000000";
    let hash = |path: &str| path["/nix/store/".len()..][..32].to_string();

    let first = paths[0].clone();
    // One session per connection: the ops, and what runs them.
    type Session<'a> = (String, Vec<u8>, Box<dyn Fn(&DaemonPool) + Sync + 'a>);
    let mut sessions: Vec<Session> = vec![(
        "handshake".into(),
        vec![],
        Box::new(|d: &DaemonPool| d.check().expect("handshake")),
    )];
    for (i, path) in paths.iter().enumerate() {
        let path = path.clone();
        sessions.push((
            format!("path-info-{i}"),
            vec![QUERY_PATH_INFO],
            Box::new(move |d: &DaemonPool| {
                assert!(
                    d.query_path_info(&path).expect("QueryPathInfo").is_some(),
                    "{path} is valid"
                );
            }),
        ));
    }
    sessions.push((
        "path-info-missing".into(),
        vec![QUERY_PATH_INFO],
        Box::new(|d: &DaemonPool| assert!(d.query_path_info(&missing).unwrap().is_none())),
    ));
    sessions.push((
        "is-valid".into(),
        vec![IS_VALID_PATH, IS_VALID_PATH],
        Box::new(|d: &DaemonPool| {
            assert!(d.is_valid_path(&first).unwrap());
            assert!(!d.is_valid_path(&missing).unwrap());
        }),
    ));
    sessions.push((
        "from-hash-part".into(),
        vec![QUERY_PATH_FROM_HASH_PART, QUERY_PATH_FROM_HASH_PART],
        Box::new(|d: &DaemonPool| {
            assert_eq!(
                d.query_path_from_hash_part(&hash(&first))
                    .unwrap()
                    .as_deref(),
                Some(first.as_str())
            );
            assert_eq!(d.query_path_from_hash_part(missing_hash).unwrap(), None);
        }),
    ));
    let mut asked: Vec<String> = paths.to_vec();
    asked.push(missing.clone());
    sessions.push((
        "valid-paths".into(),
        vec![QUERY_VALID_PATHS],
        Box::new(move |d: &DaemonPool| {
            assert_eq!(d.query_valid_paths(&asked).unwrap().len(), asked.len() - 1)
        }),
    ));
    sessions.push((
        "all-valid-paths".into(),
        vec![QUERY_ALL_VALID_PATHS],
        Box::new(|d: &DaemonPool| assert!(d.query_all_valid_paths().unwrap().len() >= paths.len())),
    ));
    sessions.push((
        "all-ops".into(),
        vec![
            IS_VALID_PATH,
            QUERY_PATH_FROM_HASH_PART,
            QUERY_PATH_INFO,
            QUERY_PATH_INFO,
            QUERY_VALID_PATHS,
            QUERY_ALL_VALID_PATHS,
        ],
        Box::new(|d: &DaemonPool| {
            d.is_valid_path(&first).unwrap();
            d.query_path_from_hash_part(&hash(&first)).unwrap();
            d.query_path_info(&first).unwrap();
            d.query_path_info(&missing).unwrap();
            d.query_valid_paths(std::slice::from_ref(&first)).unwrap();
            d.query_all_valid_paths().unwrap();
        }),
    ));

    for (name, ops, run) in &sessions {
        let pool = DaemonPool::new(relay.clone(), 1);
        let recorded = thread::scope(|s| {
            let client = s.spawn(|| {
                run(&pool);
                drop(pool);
            });
            let recorded = relay_once(&listener, socket);
            client.join().expect("the session ran");
            recorded.join().expect("the relay ran")
        });
        write_seed(out, name, ops, &recorded);
    }

    // A daemon error frame: a path outside the store is refused (and the
    // daemon then closes the connection). peerix never sends one, so this
    // client speaks the protocol itself.
    let raw = thread::spawn({
        let relay = relay.clone();
        move || raw_bad_path_info(&relay)
    });
    let recorded = relay_once(&listener, socket).join().unwrap();
    raw.join().unwrap();
    write_seed(out, "path-info-error", &[QUERY_PATH_INFO], &recorded);
    let _ = fs::remove_file(&relay);
}

fn write_seed(out: &Path, name: &str, ops: &[u8], recorded: &[u8]) {
    let mut seed = vec![ops.len() as u8];
    seed.extend_from_slice(ops);
    seed.extend_from_slice(recorded);
    let file = out.join(name);
    fs::write(&file, &seed).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    eprintln!("{}: {} bytes", file.display(), seed.len());
}

fn raw_bad_path_info(socket: &Path) {
    let mut s = UnixStream::connect(socket).expect("connecting to the relay");
    let u64le = |n: u64| n.to_le_bytes();
    let string = |text: &str| {
        let mut out = u64le(text.len() as u64).to_vec();
        out.extend_from_slice(text.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
        out
    };
    let read_u64 = |s: &mut UnixStream| {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).expect("reading from the daemon");
        u64::from_le_bytes(b)
    };
    s.write_all(&u64le(0x6e697863)).unwrap();
    assert_eq!(read_u64(&mut s), 0x6478696f);
    let _version = read_u64(&mut s);
    for n in [0x123, 0, 0] {
        s.write_all(&u64le(n)).unwrap();
    }
    s.write_all(&u64le(26)).unwrap();
    s.write_all(&string("/tmp/peerix-fuzz-not-in-the-store"))
        .unwrap();
    // Read until the daemon hangs up; the relay keeps the bytes.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

fn http(listen: &str, upstream: &str, out: &Path) {
    fs::create_dir_all(out).expect("creating the output dir");
    let listener =
        TcpListener::bind(format!("127.0.0.1:{listen}")).expect("binding the relay port");
    for (n, client) in listener.incoming().enumerate() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(format!("127.0.0.1:{upstream}")) else {
            continue;
        };
        let log = fs::File::create(out.join(format!("conn-{n}"))).expect("creating a log");
        thread::spawn(move || {
            let (client_r, server_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = thread::spawn(move || {
                pump(
                    Tee {
                        inner: &client_r,
                        log,
                    },
                    &server_w,
                    None,
                );
                let _ = server_w.shutdown(Shutdown::Write);
            });
            pump(&server, &client, None);
            let _ = client.shutdown(Shutdown::Write);
            let _ = up.join();
        });
    }
}

/// A reader that writes what it reads to `log` at once.
struct Tee<R> {
    inner: R,
    log: fs::File,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.log.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn packets(out: &Path, hashes: &[String]) {
    fs::create_dir_all(out).expect("creating the output dir");
    // The original draws ids at random; a fixed generator keeps the files stable.
    let mut state: u32 = 0x2545_f491;
    let mut next_id = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    for text in hashes {
        let hash = HashPart::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let id = next_id();
        let request = Packet::Request { id, hash };
        let response = Packet::Response {
            id,
            port: 12304,
            hash,
        };
        for (kind, packet) in [("request", request), ("response", response)] {
            let file: PathBuf = out.join(format!("{kind}-{text}"));
            fs::write(&file, packet.encode()).expect("writing a packet");
        }
    }
}

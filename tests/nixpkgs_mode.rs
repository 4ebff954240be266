//! The `nixpkgs` share mode against a local upstream: a `nix copy --to
//! file://` export of some of the paths, served over HTTP on loopback by a
//! small file server in this test. Real nix, a real nix-daemon per host, and
//! peerix with `--no-lan` in this machine's namespace.
//!
//! - a path upstream has is shared (its narinfo answers 200 on /local);
//! - a path upstream lacks is not (404);
//! - a path whose upstream NarHash differs is not, unless `--no-verify`;
//! - with upstream down (503, then refused), nothing new is shared; the
//!   paths are asked again later (here on SIGHUP) and shared then.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::http;
use common::{Host, Peerix, TestDir, hash_part, many_fixture, poll_until};

/// What the test upstream answers.
const SERVE: u8 = 0;
const UNAVAILABLE: u8 = 1;

/// A file server on 127.0.0.1 over `root`: GET /NAME answers the file NAME
/// (no subdirectories), or 404; in the UNAVAILABLE mode, 503 for all.
struct Upstream {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(root: &Path) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test upstream");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(SERVE));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (root, m, r, s) = (
            root.to_path_buf(),
            Arc::clone(&mode),
            Arc::clone(&requests),
            Arc::clone(&stop),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = serve(stream, &root, m.load(Ordering::SeqCst));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Upstream {
            addr,
            mode,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, root: &Path, mode: u8) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The rest of the head, up to the empty line.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let name = line
        .split(' ')
        .nth(1)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or("");
    let (status, body) = if mode == UNAVAILABLE {
        ("503 Service Unavailable", b"down\n".to_vec())
    } else if name.is_empty() || name.contains('/') || name.contains("..") {
        ("404 Not Found", b"no\n".to_vec())
    } else {
        match fs::read(root.join(name)) {
            Ok(body) => ("200 OK", body),
            Err(_) => ("404 Not Found", b"no\n".to_vec()),
        }
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)
}

/// The fixture paths: `has` upstream with the same NarHash, `differs`
/// upstream with another NarHash, `lacks` not upstream. `differs`
/// references `has`, and `lacks` references `differs`.
struct Paths {
    has: String,
    differs: String,
    lacks: String,
}

/// A store holding the three paths, and an upstream export of two of them,
/// one with its NarHash changed.
fn world(name: &str) -> (TestDir, Host, PathBuf, Paths) {
    let dir = TestDir::new(name);
    let many = many_fixture();
    let paths = Paths {
        has: many.first.clone(),
        differs: many.second.clone(),
        lacks: many.third.clone(),
    };
    let host = Host::with_paths(&dir, "a", &[&paths.lacks]);
    let export = dir.subdir("upstream");
    let to = format!("file://{}", export.display());
    host.nix.run(
        "nix",
        &[
            "copy",
            "--no-check-sigs",
            "--from",
            &host.store(),
            "--to",
            &to,
            &paths.differs,
        ],
    );
    let narinfo = |path: &str| export.join(format!("{}.narinfo", hash_part(path)));
    assert!(
        narinfo(&paths.has).is_file(),
        "the export holds {}",
        paths.has
    );
    assert!(!narinfo(&paths.lacks).exists());
    // Upstream's `differs` gets the NarHash of `has`: a valid hash, not ours.
    let nar_hash = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("NarHash: "))
            .expect("a NarHash line")
            .to_string()
    };
    let theirs = nar_hash(&fs::read_to_string(narinfo(&paths.has)).unwrap());
    let text = fs::read_to_string(narinfo(&paths.differs)).unwrap();
    let ours = nar_hash(&text);
    assert_ne!(ours, theirs);
    fs::write(narinfo(&paths.differs), text.replace(&ours, &theirs)).unwrap();
    (dir, host, export, paths)
}

fn local_status(peerix: &Peerix, path: &str) -> u16 {
    http::get(peerix.addr, &format!("/local/{}.narinfo", hash_part(path)))
        .map(|r| r.status)
        .unwrap_or(0)
}

fn shared_paths(peerix: &Peerix) -> u64 {
    peerix
        .health()
        .ok()
        .and_then(|h| h["shared_paths"].as_u64())
        .unwrap_or(0)
}

fn nixpkgs_flags(upstream: &Upstream) -> Vec<String> {
    vec![
        "--filter-mode".into(),
        "nixpkgs".into(),
        "--upstream-cache".into(),
        upstream.url(),
        "--allow-insecure-http".into(),
        "--filter-concurrency".into(),
        "2".into(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Waits until `path` is shared on /local.
fn wait_shared(peerix: &Peerix, path: &str) {
    poll_until(&format!("{path} to be shared"), || {
        match local_status(peerix, path) {
            200 => Ok(()),
            other => Err(format!("/local narinfo answers {other}")),
        }
    });
}

#[test]
fn shares_what_upstream_has_with_our_nar_hash() {
    let (dir, host, export, paths) = world("nixpkgs-verify");
    let upstream = Upstream::start(&export);
    let peerix = Peerix::start(&dir, &host, &strs(&nixpkgs_flags(&upstream)));
    wait_shared(&peerix, &paths.has);
    // One batch decides all three: once one is shared, all are decided.
    assert_eq!(
        local_status(&peerix, &paths.lacks),
        404,
        "upstream lacks it"
    );
    assert_eq!(
        local_status(&peerix, &paths.differs),
        404,
        "upstream's NarHash differs"
    );
    assert_eq!(shared_paths(&peerix), 1);
    // This host's own nix still gets everything on the root endpoints.
    for path in [&paths.has, &paths.differs, &paths.lacks] {
        http::expect_status(peerix.addr, &format!("/{}.narinfo", hash_part(path)), 200);
    }
    assert!(
        peerix.stderr().contains("NarHash of"),
        "the differing NarHash is logged"
    );
}

#[test]
fn no_verify_shares_a_path_whose_upstream_nar_hash_differs() {
    let (dir, host, export, paths) = world("nixpkgs-no-verify");
    let upstream = Upstream::start(&export);
    let mut flags = nixpkgs_flags(&upstream);
    flags.push("--no-verify".into());
    let peerix = Peerix::start(&dir, &host, &strs(&flags));
    wait_shared(&peerix, &paths.has);
    wait_shared(&peerix, &paths.differs);
    assert_eq!(
        local_status(&peerix, &paths.lacks),
        404,
        "upstream lacks it"
    );
    assert_eq!(shared_paths(&peerix), 2);
}

#[test]
fn with_upstream_down_nothing_new_is_shared_until_it_answers() {
    let (dir, host, export, paths) = world("nixpkgs-down");
    let upstream = Upstream::start(&export);
    upstream.set_mode(UNAVAILABLE);
    let mut peerix = Peerix::start(&dir, &host, &strs(&nixpkgs_flags(&upstream)));
    poll_until("peerix to find upstream unavailable", || {
        if peerix.stderr().contains("cannot be asked") {
            Ok(())
        } else {
            Err(format!("{} upstream requests", upstream.requests()))
        }
    });
    for path in [&paths.has, &paths.differs, &paths.lacks] {
        assert_eq!(
            local_status(&peerix, path),
            404,
            "{path} while upstream is down"
        );
    }
    assert_eq!(shared_paths(&peerix), 0);

    // Upstream answers again: on the next round (SIGHUP here) the paths
    // are asked again, and the one it has is shared.
    upstream.set_mode(SERVE);
    peerix.send_sighup();
    wait_shared(&peerix, &paths.has);
    assert_eq!(local_status(&peerix, &paths.differs), 404);
    assert_eq!(local_status(&peerix, &paths.lacks), 404);
    peerix.assert_alive_without_panic();

    // A restart remembers the answers (the state dir's answers file):
    // with upstream gone, the path upstream had is still shared, and
    // nothing is asked.
    drop(peerix);
    let state = fs::read_dir(dir.path.clone())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("upstream-answers").is_file())
        .expect("a state dir with the upstream answers");
    let before = upstream.requests();
    upstream.set_mode(UNAVAILABLE);
    let mut flags = nixpkgs_flags(&upstream);
    flags.extend(["--state-dir".into(), state.display().to_string()]);
    let again = Peerix::start(&dir, &host, &strs(&flags));
    wait_shared(&again, &paths.has);
    assert_eq!(local_status(&again, &paths.differs), 404);
    assert_eq!(upstream.requests(), before, "answers came from the file");
}

#[test]
fn an_unreachable_upstream_shares_nothing() {
    let (dir, host, export, paths) = world("nixpkgs-refused");
    // An upstream that was never there: its port is closed.
    let closed = {
        let upstream = Upstream::start(&export);
        upstream.url()
    };
    let flags = [
        "--filter-mode",
        "nixpkgs",
        "--upstream-cache",
        &closed,
        "--allow-insecure-http",
    ];
    let peerix = Peerix::start(&dir, &host, &flags);
    poll_until("peerix to find upstream unreachable", || {
        if peerix.stderr().contains("cannot be asked") {
            Ok(())
        } else {
            Err("no failure logged yet".into())
        }
    });
    for path in [&paths.has, &paths.differs, &paths.lacks] {
        assert_eq!(local_status(&peerix, path), 404, "{path}");
    }
    assert_eq!(shared_paths(&peerix), 0);
}

#[test]
fn an_http_upstream_needs_allow_insecure_http() {
    let dir = TestDir::new("nixpkgs-insecure");
    let host = Host::new(&dir, "a");
    let output = std::process::Command::new(common::peerix_binary())
        .args([
            "--no-lan",
            "--filter-mode",
            "nixpkgs",
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--daemon-socket",
        ])
        .arg(&host.socket)
        .output()
        .expect("running peerix");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-insecure-http"), "{stderr}");
}

//! Shared harness for peerix integration tests.
//!
//! Everything here drives real programs: the `nix` client (Debian's `nix-bin`
//! 2.8 works offline), one `nix-daemon` per simulated host serving a chroot
//! store, the `peerix` binary under test, and network namespaces for clients
//! that must not look like loopback.
//!
//! Rules the harness keeps so that tests can run in parallel, as root, in one
//! process per test file:
//! - Every name is unique: an atomic counter plus the process id picks test
//!   directories, socket paths, namespace names and subnets. TCP ports come
//!   from binding `127.0.0.1:0`.
//! - Everything a test starts is stopped by a guard's `Drop`, which also runs
//!   when the test panics. Guards are declared after the [`TestDir`] they live
//!   in, so they drop (stop) before the directory is removed.
//! - Every wait is a bounded poll loop; nothing asserts on wall-clock time.
//! - Tests only talk to loopback or to namespace addresses they created.
//!
//! Set `PEERIX_TEST_KEEP=1` to keep test directories for inspection, and
//! `PEERIX_BIN=/path/to/peerix` to test another build of the daemon.

// Each test file uses a different subset of the harness.
#![allow(dead_code)]

pub mod http;
pub mod lan;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

/// The logical store directory of every store the tests use.
pub const STORE_DIR: &str = "/nix/store";

/// Time between two checks of a bounded wait.
const POLL_STEP: Duration = Duration::from_millis(100);
/// Upper bound on every wait: 600 checks, about 60 s. Only a failing test
/// ever gets near it; slow machines under parallel tests stay well inside.
const POLL_LIMIT: u32 = 600;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process; combine with the pid for names.
pub fn unique_number() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A TCP port that was free a moment ago on 127.0.0.1 (and thus on 0.0.0.0
/// for any practical purpose). The port is released before returning, so a
/// daemon started right after can bind it.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// Poll `check` every 100 ms, at most `POLL_LIMIT` times, until it returns
/// `Ok`; `Err` carries the latest observation. Panics with `what`
/// and that observation if the bound runs out.
pub fn poll_until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::from("(never checked)");
    for _ in 0..POLL_LIMIT {
        match check() {
            Ok(value) => return value,
            Err(observed) => last = observed,
        }
        thread::sleep(POLL_STEP);
    }
    panic!("timed out waiting for {what}; last observation: {last}");
}

/// A per-test scratch directory under the system temp dir, removed on drop
/// (unless `PEERIX_TEST_KEEP` is set). Paths are kept short because Unix
/// socket paths live in it and are limited to 108 bytes.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(test_name: &str) -> TestDir {
        let short: String = test_name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let path = std::env::temp_dir().join("pxt").join(format!(
            "{}-{}-{short}",
            std::process::id(),
            unique_number()
        ));
        if path.exists() {
            fs::remove_dir_all(&path).expect("removing a stale test dir");
        }
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir { path }
    }

    /// A subdirectory, created.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let dir = self.path.join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PEERIX_TEST_KEEP").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
            return;
        }
        // Store files are read-only, but root removes them regardless.
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "warning: could not remove test dir {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The nix client configuration for offline use (see NIX-CLIENT.md).
const OFFLINE_NIX_CONF: &str = "experimental-features = nix-command\n\
substituters =\n\
build-users-group =\n\
sandbox = false\n";

/// A nix client environment: its own `NIX_CONF_DIR` with the offline config,
/// an empty `NIX_USER_CONF_FILES`, and a fresh `XDG_CACHE_HOME` so that nix's
/// narinfo cache never carries answers from one test to another.
#[derive(Clone, Debug)]
pub struct NixEnv {
    pub conf_dir: PathBuf,
    pub user_conf: PathBuf,
    pub cache_dir: PathBuf,
    /// Run the programs inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// If set, `try_run` kills a program that runs longer and panics, so a
    /// stalled download fails the test (nix itself waits 300 s, then retries).
    pub time_limit: Option<Duration>,
}

impl NixEnv {
    pub fn new(dir: &Path) -> NixEnv {
        let conf_dir = dir.join("nix-conf");
        let cache_dir = dir.join("xdg-cache");
        fs::create_dir_all(&conf_dir).expect("creating NIX_CONF_DIR");
        fs::create_dir_all(&cache_dir).expect("creating XDG_CACHE_HOME");
        fs::write(conf_dir.join("nix.conf"), OFFLINE_NIX_CONF).expect("writing nix.conf");
        let user_conf = dir.join("nix-user.conf");
        fs::write(&user_conf, "").expect("writing empty user nix.conf");
        NixEnv {
            conf_dir,
            user_conf,
            cache_dir,
            netns: None,
            time_limit: None,
        }
    }

    /// Put this environment on a command (and drop inherited nix settings).
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("NIX_CONF_DIR", &self.conf_dir)
            .env("NIX_USER_CONF_FILES", &self.user_conf)
            .env("XDG_CACHE_HOME", &self.cache_dir)
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_DAEMON_SOCKET_PATH")
            .env_remove("NIX_PATH")
            .env_remove("NIX_SECRET_KEY_FILE")
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = netns_command(self.netns.as_deref(), program);
        self.apply(&mut cmd);
        cmd
    }

    /// Run a nix program; panic with its stderr if it fails.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        let output = self.try_run(program, args);
        if !output.status.success() {
            panic!(
                "expected `{}` to succeed, it exited with {}\nstdout:\n{}\nstderr:\n{}",
                describe(program, args),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        output
    }

    /// Run a nix program and return its output whatever the exit status.
    pub fn try_run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        let what = describe(program, args);
        match self.time_limit {
            None => cmd
                .output()
                .unwrap_or_else(|e| panic!("could not run `{what}`: {e}")),
            Some(limit) => output_within(cmd, limit, &what),
        }
    }

    /// Run and return trimmed stdout.
    pub fn stdout<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> String {
        String::from_utf8(self.run(program, args).stdout)
            .expect("nix printed non-UTF-8 on stdout")
            .trim()
            .to_string()
    }

    /// `nix path-info --json [--recursive] --store STORE PATHS...`, with the
    /// NarHash converted to the `sha256:<nix32>` form that narinfos use.
    pub fn path_infos(&self, store: &str, paths: &[&str], recursive: bool) -> Vec<PathInfo> {
        let mut args = vec!["path-info", "--json", "--store", store];
        if recursive {
            args.push("--recursive");
        }
        args.extend_from_slice(paths);
        let json = self.stdout("nix", &args);
        let values: Vec<serde_json::Value> = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("nix path-info --json printed invalid JSON ({e}): {json}"));
        let sri: Vec<String> = values
            .iter()
            .map(|v| {
                v["narHash"]
                    .as_str()
                    .expect("narHash in path-info")
                    .to_string()
            })
            .collect();
        let nix32 = self.to_nix32(&sri);
        values
            .iter()
            .zip(nix32)
            .map(|(v, nar_hash)| PathInfo::from_json(v, nar_hash))
            .collect()
    }

    /// Convert `sha256-<base64>` hashes to `sha256:<nix32>` using nix itself.
    pub fn to_nix32(&self, sri: &[String]) -> Vec<String> {
        let mut out = Vec::with_capacity(sri.len());
        for chunk in sri.chunks(200) {
            let mut args = vec!["hash", "to-base32"];
            args.extend(chunk.iter().map(String::as_str));
            let text = self.stdout("nix", &args);
            out.extend(text.lines().map(|h| format!("sha256:{h}")));
        }
        assert_eq!(
            out.len(),
            sri.len(),
            "nix hash to-base32 returned a different number of hashes"
        );
        out
    }

    /// The closure of `path` in `store`, as full store paths.
    pub fn closure(&self, store: &str, path: &str) -> Vec<String> {
        let text = self.stdout("nix-store", &["--store", store, "-qR", path]);
        text.lines().map(str::to_string).collect()
    }

    /// `nix copy --from URL --to DEST PATHS...` trusting only `trusted_keys`.
    /// Returns the output whatever the exit status.
    pub fn copy_from(
        &self,
        url: &str,
        dest: &str,
        trusted_keys: &[&str],
        paths: &[&str],
    ) -> Output {
        let keys = trusted_keys.join(" ");
        let mut args = vec![
            "copy",
            "--from",
            url,
            "--to",
            dest,
            "--option",
            "trusted-public-keys",
            keys.as_str(),
        ];
        args.extend_from_slice(paths);
        self.try_run("nix", &args)
    }

    /// `nix-store --store DEST -r PATH` with `URL` as the only substituter.
    pub fn substitute(&self, dest: &str, url: &str, trusted_keys: &[&str], path: &str) -> Output {
        let keys = trusted_keys.join(" ");
        self.try_run(
            "nix-store",
            &[
                "--store",
                dest,
                "-r",
                path,
                "--option",
                "substituters",
                url,
                "--option",
                "trusted-public-keys",
                keys.as_str(),
            ],
        )
    }

    /// `nix store verify -r --store STORE PATHS...`: contents intact and
    /// signed by one of `trusted_keys`.
    pub fn verify(&self, store: &str, trusted_keys: &[&str], paths: &[&str]) -> Output {
        let keys = trusted_keys.join(" ");
        let mut args = vec![
            "store",
            "verify",
            "-r",
            "--store",
            store,
            "--option",
            "trusted-public-keys",
            keys.as_str(),
        ];
        args.extend_from_slice(paths);
        self.try_run("nix", &args)
    }

    /// Generate a signing key pair with `nix-store --generate-binary-cache-key`.
    pub fn generate_key(&self, dir: &Path, name: &str) -> KeyPair {
        let secret_file = dir.join(format!("{name}.sk"));
        let public_file = dir.join(format!("{name}.pk"));
        self.run(
            "nix-store",
            &[
                OsStr::new("--generate-binary-cache-key"),
                OsStr::new(name),
                secret_file.as_os_str(),
                public_file.as_os_str(),
            ],
        );
        let public = fs::read_to_string(&public_file)
            .expect("reading generated public key")
            .trim()
            .to_string();
        KeyPair {
            name: name.to_string(),
            secret_file,
            public,
        }
    }
}

/// A command for `program`, inside network namespace `netns` if given
/// (`ip netns exec` execs the program, so the child's pid is the program's).
pub fn netns_command(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Read a child's pipe to the end on a thread of its own.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Run `cmd` to completion and collect its output, but kill it and panic if
/// it runs longer than `limit`.
fn output_within(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run `{what}`: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let steps = (limit.as_millis() / POLL_STEP.as_millis()).max(1);
    let mut status = None;
    for _ in 0..steps {
        if let Some(done) = child.try_wait().expect("waiting for a child") {
            status = Some(done);
            break;
        }
        thread::sleep(POLL_STEP);
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = stderr.join().unwrap_or_default();
        panic!(
            "`{what}` did not finish within {} s and was killed (a stalled download?); its stderr:\n{}",
            limit.as_secs(),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Run `cmd` to completion and collect its output; kill it and panic if it
/// runs longer than `limit`.
pub fn run_within(cmd: Command, limit: Duration, what: &str) -> Output {
    output_within(cmd, limit, what)
}

fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut text = program.to_string();
    for arg in args {
        text.push(' ');
        text.push_str(&arg.as_ref().to_string_lossy());
    }
    text
}

/// A Nix signing key pair made by `nix-store --generate-binary-cache-key`.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub name: String,
    pub secret_file: PathBuf,
    /// `name:base64`, as it goes into `trusted-public-keys`.
    pub public: String,
}

/// One entry of `nix path-info --json`, with the NarHash in nix32 form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    /// `sha256:<52 nix32 chars>`
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full store paths, sorted.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub signatures: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    fn from_json(v: &serde_json::Value, nar_hash: String) -> PathInfo {
        let strings = |key: &str| -> Vec<String> {
            v[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().expect("string in path-info array").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut references = strings("references");
        references.sort();
        PathInfo {
            path: v["path"].as_str().expect("path in path-info").to_string(),
            nar_hash,
            nar_size: v["narSize"].as_u64().expect("narSize in path-info"),
            references,
            deriver: v["deriver"].as_str().map(str::to_string),
            signatures: strings("signatures"),
            ca: v["ca"].as_str().map(str::to_string),
        }
    }

    /// The 32-character hash part of the store path.
    pub fn hash_part(&self) -> &str {
        hash_part(&self.path)
    }
}

/// The hash part of a full store path or base name.
pub fn hash_part(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    &base[..32]
}

/// The base name of a full store path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// Store paths of the realistic closure (tests/fixtures/realistic.nix), built
/// in `/nix/store`.
#[derive(Clone, Debug)]
pub struct RealisticFixture {
    /// Top of the closure; its closure holds every path below.
    pub app: String,
    pub lib: String,
    /// Holds `blob.bin`, 50 MiB.
    pub big: String,
    /// A store path that is a single executable file.
    pub script: String,
    /// A store path that is a symlink.
    pub link: String,
    /// The busybox builder, added with `builtins.path` (content-addressed).
    pub busybox: String,
}

/// Store paths of the many-paths fixture (tests/fixtures/many.nix).
#[derive(Clone, Debug)]
pub struct ManyFixture {
    /// Its closure holds all items.
    pub top: String,
    /// Item 0: no references.
    pub first: String,
    /// Item 1: references item 0.
    pub second: String,
    /// Item 2: references item 1 (its closure is items 0, 1 and 2).
    pub third: String,
    pub count: usize,
}

/// Number of items in the many-paths fixture.
pub const MANY_COUNT: usize = 320;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// `nix-build tests/fixtures/<file> -A <attrs>...` into `/nix/store` (sandbox
/// off), then `post` with the build environment; returns what `post` returns.
/// Nix locks outputs, so concurrent builds of the same derivation from
/// several tests or processes wait for each other instead of breaking.
///
/// The busybox builder dir (`bin/busybox`, `bin/sh -> busybox`) is made from
/// /bin/busybox in a scratch dir that is removed afterwards; its content is
/// fixed, so its store path is the same in every run.
fn build_fixture<T>(file: &str, attrs: &[&str], post: impl FnOnce(&NixEnv, Vec<String>) -> T) -> T {
    let dir = TestDir::new(&format!("fixture{file}"));
    let env = NixEnv::new(&dir.path);
    let bin = dir.subdir("busybox/bin");
    fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copying /bin/busybox (install busybox-static)");
    fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o755))
        .expect("chmod busybox");
    std::os::unix::fs::symlink("busybox", bin.join("sh")).expect("symlinking bin/sh");
    let mut args: Vec<String> = vec![
        fixtures_dir().join(file).display().to_string(),
        "--no-out-link".into(),
        "--max-jobs".into(),
        "8".into(),
        "--arg".into(),
        "busyboxDir".into(),
        dir.join("busybox").display().to_string(),
    ];
    for attr in attrs {
        args.push("-A".into());
        args.push(attr.to_string());
    }
    let text = env.stdout("nix-build", &args);
    let paths: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(
        paths.len(),
        attrs.len(),
        "nix-build {file} printed {paths:?} for attributes {attrs:?}"
    );
    post(&env, paths)
}

/// The realistic closure, built once per process.
pub fn realistic_fixture() -> &'static RealisticFixture {
    static FIXTURE: OnceLock<RealisticFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        build_fixture(
            "realistic.nix",
            &["app", "lib", "big", "script", "link"],
            |env, p| {
                // busybox is a source path, not a derivation: find it in lib's closure.
                let busybox = env
                    .closure("auto", &p[1])
                    .into_iter()
                    .find(|path| path.ends_with("-busybox"))
                    .expect("the busybox store path in the closure of the lib fixture");
                RealisticFixture {
                    app: p[0].clone(),
                    lib: p[1].clone(),
                    big: p[2].clone(),
                    script: p[3].clone(),
                    link: p[4].clone(),
                    busybox,
                }
            },
        )
    })
}

/// The many-paths fixture, built once per process.
pub fn many_fixture() -> &'static ManyFixture {
    static FIXTURE: OnceLock<ManyFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        build_fixture(
            "many.nix",
            &["top", "items.0", "items.1", "items.2"],
            |_, p| ManyFixture {
                top: p[0].clone(),
                first: p[1].clone(),
                second: p[2].clone(),
                third: p[3].clone(),
                count: MANY_COUNT,
            },
        )
    })
}

// ---------------------------------------------------------------------------
// Hosts: a chroot store plus its own nix-daemon
// ---------------------------------------------------------------------------

/// A simulated host: a chroot store (`<dir>/store`, files under
/// `<dir>/store/nix/store`) and, once started, its own `nix-daemon --store`
/// listening on a private socket. The daemon is killed on drop.
pub struct Host {
    pub name: String,
    /// The chroot store root: pass as `--store` to nix and `--store-root` to peerix.
    pub root: PathBuf,
    /// The daemon's socket (`NIX_DAEMON_SOCKET_PATH`).
    pub socket: PathBuf,
    pub nix: NixEnv,
    daemon_log: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    /// Create the host's directories and an (empty) store; no daemon yet.
    pub fn new(dir: &TestDir, name: &str) -> Host {
        let home = dir.subdir(name);
        let root = home.join("store");
        fs::create_dir_all(&root).expect("creating chroot store root");
        let nix = NixEnv::new(&home);
        Host {
            name: name.to_string(),
            socket: home.join("d.sock"),
            daemon_log: home.join("nix-daemon.log"),
            root,
            nix,
            daemon: None,
        }
    }

    /// A host whose store holds the closures of `paths` and whose daemon runs.
    pub fn with_paths(dir: &TestDir, name: &str, paths: &[&str]) -> Host {
        let mut host = Host::new(dir, name);
        host.add_closure(paths);
        host.start_daemon();
        host
    }

    /// The `--store` argument for nix commands that open the store directly.
    pub fn store(&self) -> String {
        self.root.display().to_string()
    }

    /// The `--store` argument for nix commands that go through the daemon.
    pub fn daemon_store(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Where the files of a store path physically are.
    pub fn physical(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }

    /// Copy the closures of `paths` from `/nix/store` into this store,
    /// without signatures (like local builds).
    pub fn add_closure(&self, paths: &[&str]) {
        let store = self.store();
        let mut args = vec!["copy", "--no-check-sigs", "--to", store.as_str()];
        args.extend_from_slice(paths);
        self.nix.run("nix", &args);
    }

    /// Adds `file` to this store (`nix-store --add`, straight to the store,
    /// so its daemon need not run) and returns its store path.
    pub fn add_file(&self, file: &Path) -> String {
        let store = self.store();
        self.nix.stdout(
            "nix-store",
            &[
                "--store",
                store.as_str(),
                "--add",
                file.to_str().expect("a UTF-8 path"),
            ],
        )
    }

    /// Sign paths (and their closures when `recursive`) in this store.
    pub fn sign(&self, key: &KeyPair, paths: &[&str], recursive: bool) {
        let store = self.store();
        let key_file = key.secret_file.display().to_string();
        let mut args = vec![
            "store",
            "sign",
            "--store",
            store.as_str(),
            "-k",
            key_file.as_str(),
        ];
        if recursive {
            args.push("-r");
        }
        args.extend_from_slice(paths);
        self.nix.run("nix", &args);
    }

    /// `nix path-info --json` for paths in this store.
    pub fn path_infos(&self, paths: &[&str], recursive: bool) -> Vec<PathInfo> {
        self.nix.path_infos(&self.store(), paths, recursive)
    }

    /// `nix-store --dump` of the physical path: the reference NAR bytes.
    pub fn dump(&self, store_path: &str) -> Vec<u8> {
        let physical = self.physical(store_path);
        self.nix
            .run("nix-store", &[OsStr::new("--dump"), physical.as_os_str()])
            .stdout
    }

    /// Whether `path` is valid in this store.
    pub fn is_valid(&self, path: &str) -> bool {
        let store = self.store();
        self.nix
            .try_run(
                "nix-store",
                &["--store", store.as_str(), "--check-validity", path],
            )
            .status
            .success()
    }

    /// Start `nix-daemon --store <root>` on this host's socket and wait until
    /// it answers `nix store ping`.
    pub fn start_daemon(&mut self) {
        assert!(
            self.daemon.is_none(),
            "nix-daemon of host {} is already running",
            self.name
        );
        let _ = fs::remove_file(&self.socket);
        let log = fs::File::create(&self.daemon_log).expect("creating nix-daemon log");
        let child = self
            .nix
            .command("nix-daemon")
            .arg("--store")
            .arg(&self.root)
            .env("NIX_DAEMON_SOCKET_PATH", &self.socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning nix-daemon (install nix-bin)");
        self.daemon = Some(child);
        let daemon_store = self.daemon_store();
        poll_until(
            &format!(
                "nix-daemon of host {} on {}",
                self.name,
                self.socket.display()
            ),
            || {
                if let Some(status) = self
                    .daemon
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "nix-daemon of host {} exited early with {status}:\n{}",
                        self.name,
                        self.daemon_log()
                    );
                }
                if !self.socket.exists() {
                    return Err("socket does not exist yet".into());
                }
                let out = self
                    .nix
                    .try_run("nix", &["store", "ping", "--store", daemon_store.as_str()]);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            },
        );
    }

    /// Stop the daemon (if running) and remove its socket.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(&self.daemon_log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if thread::panicking() && self.daemon.is_some() {
            eprintln!(
                "--- nix-daemon log of host {} ---\n{}",
                self.name,
                self.daemon_log()
            );
        }
        self.stop_daemon();
    }
}

// ---------------------------------------------------------------------------
// peerix
// ---------------------------------------------------------------------------

/// The peerix binary under test: the one cargo built for this test run, or
/// `PEERIX_BIN` if set (e.g. a release build, or another build to compare).
pub fn peerix_binary() -> PathBuf {
    std::env::var_os("PEERIX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_peerix")))
}

/// How long to wait after spawning peerix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Until `/health` answers 200 with `scans >= 1`.
    Scanned,
    /// Until `/health` answers at all (any status).
    Listening,
}

/// A running `peerix` process, killed on drop. Its stderr goes to a file in
/// the test dir and is printed when the test fails.
pub struct Peerix {
    pub port: u16,
    /// Where clients reach it: loopback, in its network namespace.
    pub addr: SocketAddr,
    pub stderr_path: PathBuf,
    /// The network namespace it runs in; `None` is this machine's own.
    pub netns: Option<String>,
    child: Child,
}

/// Where a peerix runs: its network namespace (`None`: this machine's),
/// and the address and port it binds.
struct Place<'a> {
    netns: Option<&'a str>,
    bind: &'a str,
    port: u16,
}

impl Peerix {
    /// The usual setup: peerix on 127.0.0.1 over `host`, plus `extra` flags;
    /// waits for the first completed scan.
    pub fn start(dir: &TestDir, host: &Host, extra: &[&str]) -> Peerix {
        Peerix::spawn(dir, host, "127.0.0.1", extra, Readiness::Scanned)
    }

    /// Spawn peerix with `--bind bind --port <free> --daemon-socket
    /// <host socket> --store-root <host root> --state-dir <fresh> --no-lan`
    /// plus `extra`, then wait as `readiness` says. In this machine's own
    /// network namespace LAN mode would broadcast on its real interfaces, so
    /// it is always off here; LAN tests use [`Peerix::spawn_in_netns`].
    pub fn spawn(
        dir: &TestDir,
        host: &Host,
        bind: &str,
        extra: &[&str],
        readiness: Readiness,
    ) -> Peerix {
        let place = Place {
            netns: None,
            bind,
            port: free_port(),
        };
        Peerix::launch(dir, host, place, extra, &[], readiness)
    }

    /// [`Peerix::spawn`] with `env` set for the daemon (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_with_env(
        dir: &TestDir,
        host: &Host,
        extra: &[&str],
        env: &[(&str, &OsStr)],
        readiness: Readiness,
    ) -> Peerix {
        let place = Place {
            netns: None,
            bind: "127.0.0.1",
            port: free_port(),
        };
        Peerix::launch(dir, host, place, extra, env, readiness)
    }

    /// Spawn peerix inside network namespace `netns` (`ip netns exec`) on
    /// `0.0.0.0:port` there, with LAN mode as `extra` says.
    pub fn spawn_in_netns(
        dir: &TestDir,
        host: &Host,
        netns: &str,
        port: u16,
        extra: &[&str],
        readiness: Readiness,
    ) -> Peerix {
        let place = Place {
            netns: Some(netns),
            bind: "0.0.0.0",
            port,
        };
        Peerix::launch(dir, host, place, extra, &[], readiness)
    }

    fn launch(
        dir: &TestDir,
        host: &Host,
        place: Place<'_>,
        extra: &[&str],
        env: &[(&str, &OsStr)],
        readiness: Readiness,
    ) -> Peerix {
        let Place { netns, bind, port } = place;
        let n = unique_number();
        let state_dir = dir.subdir(&format!("peerix-state-{n}"));
        let stderr_path = dir.join(&format!("peerix-{n}.stderr"));
        let stderr = fs::File::create(&stderr_path).expect("creating peerix stderr file");
        let mut cmd = netns_command(netns, peerix_binary());
        host.nix.apply(&mut cmd);
        cmd.arg("--bind")
            .arg(bind)
            .arg("--port")
            .arg(port.to_string())
            .arg("--daemon-socket")
            .arg(&host.socket)
            .arg("--store-root")
            .arg(&host.root)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--verbose")
            .args(netns.is_none().then_some("--no-lan"))
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("cloning stderr handle"))
            .stderr(stderr);
        let child = cmd.spawn().expect("spawning the peerix binary");
        let mut peerix = Peerix {
            port,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            stderr_path,
            netns: netns.map(str::to_string),
            child,
        };
        match readiness {
            Readiness::Scanned => {
                peerix.wait_health("peerix to finish its first scan", |h| {
                    h["scans"].as_u64().unwrap_or(0) >= 1
                });
            }
            Readiness::Listening => {
                peerix.wait_health("peerix to answer /health", |_| true);
            }
        }
        peerix
    }

    /// `/health` as JSON, or why not.
    pub fn health(&self) -> Result<serde_json::Value, String> {
        let addr = self.addr;
        let get = move || http::get(addr, "/health");
        let response = match &self.netns {
            Some(ns) => lan::in_netns(ns, get),
            None => get(),
        }
        .map_err(|e| format!("GET /health: {e}"))?;
        serde_json::from_slice(&response.body).map_err(|e| {
            format!(
                "/health answered {} with non-JSON body ({e}): {}",
                response.status,
                response.text()
            )
        })
    }

    /// Poll `/health` until `ready` holds; panics if peerix exits or the
    /// bounded wait runs out.
    pub fn wait_health(
        &mut self,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        poll_until(what, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "peerix exited early with {status}; its output:\n{}",
                    self.stderr()
                );
            }
            let health = self.health()?;
            if ready(&health) {
                Ok(health)
            } else {
                Err(health.to_string())
            }
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL of the peer-facing cache, usable as a substituter.
    pub fn local_url(&self) -> String {
        format!("{}/local", self.url())
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics if peerix has exited or its output mentions a panic.
    pub fn assert_alive_without_panic(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "expected peerix to keep running, it exited with {status}; its output:\n{}",
                self.stderr()
            );
        }
        let stderr = self.stderr();
        assert!(
            !stderr.contains("panicked"),
            "expected no panic in peerix output, found one:\n{stderr}"
        );
    }

    /// Sends SIGHUP, which asks peerix to rescan the store.
    pub fn send_sighup(&self) {
        self.send_signal("HUP");
    }

    /// `kill -<signal>` to peerix.
    pub fn send_signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} peerix failed: {status}");
    }

    /// Exit status if peerix has stopped.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id of peerix itself (`ip netns exec` execs it, so this
    /// holds in a namespace too): for `/proc/<pid>/...` and `prlimit --pid`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peerix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- peerix output ({}) ---\n{}",
                self.stderr_path.display(),
                self.stderr()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// narinfo text as a test-side reference reader
// ---------------------------------------------------------------------------

/// The fields of a narinfo as plain text, read without peerix's parser: each
/// line is `Key: value`; `Sig` may repeat. Used to check what was served.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NarInfoText {
    pub fields: BTreeMap<String, String>,
    pub sigs: Vec<String>,
}

impl NarInfoText {
    pub fn read(text: &str) -> NarInfoText {
        let mut info = NarInfoText::default();
        for line in text.lines() {
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .unwrap_or_else(|| {
                    panic!("narinfo line {line:?} is not `Key: value`; whole narinfo:\n{text}")
                });
            if key == "Sig" {
                info.sigs.push(value.to_string());
            } else if let Some(old) = info.fields.insert(key.to_string(), value.to_string()) {
                panic!("narinfo repeats key {key} ({old:?}, then {value:?}):\n{text}");
            }
        }
        info
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A field that must be there.
    pub fn field(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("expected narinfo field {key}, fields are {:?}", self.fields))
    }

    /// Panics unless StorePath, NarHash and NarSize are those of `info`;
    /// `what` names the narinfo in the message.
    pub fn assert_describes(&self, info: &PathInfo, what: &str) {
        assert_eq!(self.field("StorePath"), info.path, "{what}: StorePath");
        assert_eq!(self.field("NarHash"), info.nar_hash, "{what}: NarHash");
        assert_eq!(
            self.field("NarSize"),
            info.nar_size.to_string(),
            "{what}: NarSize"
        );
    }

    /// `References` as sorted base names.
    pub fn references(&self) -> Vec<String> {
        let mut refs: Vec<String> = self
            .get("References")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        refs.sort();
        refs
    }
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// A network namespace joined to the host by a veth pair, in a test-unique
/// subnet `10.77.<k>.0/24`: the host end has `10.77.<k>.1`, the namespace end
/// `10.77.<k>.2`. Deleted on drop (deleting the namespace removes its veth
/// end, which removes the pair; the host end is also deleted explicitly).
pub struct NetNs {
    pub name: String,
    pub host_veth: String,
    pub ns_veth: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running `ip` (install iproute2)")
}

/// Runs `ip` with `args`; panics with its stderr if it fails.
pub fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "expected `ip {}` to succeed, it failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new() -> NetNs {
        let pid = std::process::id();
        // Interface names are limited to 15 bytes; keep them short and unique.
        let tag = format!("{:x}{:x}", pid % 0xfffff, unique_number());
        let name = format!("pxt-{tag}");
        let host_veth = format!("pxh{tag}");
        let ns_veth = format!("pxn{tag}");
        assert!(host_veth.len() <= 15, "veth name {host_veth} too long");
        let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr", "show"]).stdout).into_owned();
        let start = (pid as usize)
            .wrapping_mul(7)
            .wrapping_add(unique_number() as usize * 13);
        let subnet = (0..250)
            .map(|i| (start + i) % 250 + 1)
            .find(|k| !used.contains(&format!(" 10.77.{k}.")))
            .expect("no free 10.77.<k>.0/24 subnet for a test namespace");
        let host_ip = Ipv4Addr::new(10, 77, subnet as u8, 1);
        let ns_ip = Ipv4Addr::new(10, 77, subnet as u8, 2);
        ip_ok(&["netns", "add", &name]);
        // From here on, Drop cleans up even if a later step fails.
        let netns = NetNs {
            name,
            host_veth,
            ns_veth,
            host_ip,
            ns_ip,
        };
        ip_ok(&[
            "link",
            "add",
            &netns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &netns.ns_veth,
        ]);
        ip_ok(&["link", "set", &netns.ns_veth, "netns", &netns.name]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &netns.host_veth,
        ]);
        ip_ok(&["link", "set", &netns.host_veth, "up"]);
        ip_ok(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &netns.ns_veth,
        ]);
        ip_ok(&["-n", &netns.name, "link", "set", &netns.ns_veth, "up"]);
        ip_ok(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {program} in netns {}: {e}", self.name))
    }

    /// HTTP status code of a GET from inside the namespace, using curl.
    /// Returns `None` if curl could not get an answer at all.
    pub fn curl_status(&self, url: &str) -> Option<u16> {
        let out = self.exec(
            "curl",
            &[
                "--silent",
                "--noproxy",
                "*",
                "--max-time",
                "30",
                "--output",
                "/dev/null",
                "--write-out",
                "%{http_code}",
                url,
            ],
        );
        let code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u16>()
            .ok()?;
        if code == 0 { None } else { Some(code) }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_veth]);
        let out = ip(&["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "warning: could not delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Panic unless a command succeeded; the message names `what` and shows stderr.
pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "expected {what} to succeed, it exited with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Panic unless a command failed; the message names `what` and shows output.
pub fn assert_failure(what: &str, output: &Output) {
    assert!(
        !output.status.success(),
        "expected {what} to fail, it succeeded\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Write `text` to a file, creating parents.
pub fn write_file(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("creating parent dir");
    }
    let mut file =
        fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("writing file");
}

//! The `peerix` daemon: parse the configuration, start the scanner thread and
//! the HTTP worker pool, and serve until killed.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use peerix::config::{self, Command, Config};
use peerix::fetch::client::PeerClient;
use peerix::fetch::read_ahead::{self, ReadAhead};
use peerix::fetch::resolver::Resolver;
use peerix::fetch::transfer::{MemoryBudget, transfer_budget};
use peerix::http::{Lanes, PublicPages, Server, ServerContext};
use peerix::identity::Identity;
use peerix::lan::Lan;
use peerix::lan::summaries::Summaries;
use peerix::lan::summary::Publisher;
use peerix::nix::keys::{PublicKey, SecretKey};
use peerix::notify;
use peerix::peers::{Discovery, PeerTable};
use peerix::state::State;
use peerix::stats::{NodeInfo, Stats, StoreView};
use peerix::store::daemon::DaemonPool;
use peerix::store::policy::{FilterMode, SharePolicy};
use peerix::store::scanner::ShareDelta;
use peerix::store::upstream::Upstream;
use peerix::store::{LocalStore, scanner};
use peerix::tracker::client::{SharedSet, TrackerClient};

/// nix-daemon connections open at most. Each one is a forked nix-daemon
/// process, so not one per worker: lookups take about 100 µs, and most are
/// answered from the path-info cache.
const MAX_DAEMON_CONNECTIONS: usize = 8;

/// Memory for peer NARs held whole while they are verified, all transfers
/// together: two of the largest the default `--verify-before-send` holds.
/// Without one budget, 16 transfers at once could hold 64 MiB.
const HELD_NARS_MIN_BUDGET: u64 = 8 * 1024 * 1024;

fn main() -> ExitCode {
    let command = config::parse_args(std::env::args_os().skip(1), &|name| std::env::var_os(name));
    let config = match command {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{}", *config::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("peerix {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("peerix: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.verbose);
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The LAN side of this host: the UDP thread, the peers' store summaries,
/// and this host's own summary when it answers peers.
type LanSide = (Arc<Lan>, Arc<Summaries>, Option<Arc<Publisher>>);

/// Starts LAN discovery if it is on: the UDP side, and the directory of
/// the peers' store summaries. Failing to start it is not fatal: this host's
/// own cache still works, which is what its nix needs most.
fn start_lan(
    config: &Config,
    store: &Arc<LocalStore>,
    peers: &Arc<PeerTable>,
    stats: &Arc<Stats>,
) -> Option<LanSide> {
    if !config.lan.enabled {
        log::info!("LAN discovery is off");
        return None;
    }
    if config.port == 0 {
        log::warn!("LAN discovery needs a fixed --port (peers ask on that UDP port); it is off");
        return None;
    }
    // Peers fetch what we announce from /local/ over HTTP: with HTTP on
    // loopback only, announcing would send them to a closed door.
    let answer_peers = !config.bind.is_loopback();
    if !answer_peers {
        log::info!(
            "HTTP is bound to {}: asking peers, not answering them",
            config.bind
        );
    }
    let index_store = Arc::clone(store);
    let shares =
        Box::new(move |hash: &_| answer_peers && index_store.index().get_shared(hash).is_some());
    let publisher = answer_peers.then(|| {
        let (versioned, listed) = (Arc::clone(store), Arc::clone(store));
        Arc::new(Publisher::new(
            Box::new(move || versioned.index_version()),
            Box::new(move |each| listed.index().for_each_shared(each)),
        ))
    });
    let summaries =
        match Summaries::start(Arc::clone(peers), config.peer_timeout, Arc::clone(stats)) {
            Ok(summaries) => summaries,
            Err(e) => {
                log::error!("LAN discovery could not start: {e}; serving this host's store only");
                return None;
            }
        };
    match Lan::start(
        &config.lan,
        config.port,
        config.port,
        shares,
        publisher.clone(),
        Some(Arc::clone(&summaries)),
        Arc::clone(stats),
    ) {
        Ok(lan) => {
            log::info!(
                "LAN discovery on UDP port {} (broadcast {}, {} extra peer(s), timeout {:?})",
                lan.port(),
                if config.lan.broadcast { "on" } else { "off" },
                config.lan.extra_peers.len(),
                config.lan.timeout
            );
            Some((lan, summaries, publisher))
        }
        Err(e) => {
            log::error!("LAN discovery could not start: {e}; serving this host's store only");
            None
        }
    }
}

/// Starts the tracker client: this node's identity from the state
/// directory (an unreadable key is an error: a new identity is never made
/// over an old one), and the announcing thread when this host answers
/// peers.
fn start_tracker(
    config: &Config,
    url: &str,
    store: &Arc<LocalStore>,
    deltas: crossbeam_channel::Receiver<ShareDelta>,
) -> Result<Arc<TrackerClient>, String> {
    let identity = Identity::load_or_create(&config.state_dir)?;
    let answer_peers = !config.bind.is_loopback();
    let listed = Arc::clone(store);
    let shared: SharedSet = Box::new(move |each| listed.index().for_each_shared(each));
    let client = TrackerClient::start(
        url,
        identity,
        config.port,
        config.peer_timeout,
        answer_peers.then_some((shared, deltas)),
    )
    .map_err(|e| format!("cannot start the tracker client: {e}"))?;
    log::info!(
        "tracker {url}: node {}{}",
        client.node_id(),
        if answer_peers {
            ""
        } else {
            " (HTTP on loopback: looking paths up, announcing none)"
        }
    );
    Ok(client)
}

fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .init();
}

fn run(config: &Config) -> Result<(), String> {
    // systemd's soft limit of 1024 would cap connections at a few hundred.
    let open_files = peerix::http::raise_open_files_limit();
    log::debug!("open files limit: {open_files}");
    let trusted_keys = config
        .trusted_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("trusted key `{k}`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let signing_key = match &config.private_key_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read private key {}: {e}", file.display()))?;
            let key = SecretKey::parse(&text)
                .map_err(|e| format!("private key {}: {e}", file.display()))?;
            log::info!("signing this host's narinfos as {}", key.name());
            Some(key)
        }
        None => None,
    };
    let upstream = (config.filter_mode == FilterMode::Nixpkgs).then(|| {
        let upstream = Upstream::open(
            &config.upstream_cache,
            !config.no_verify,
            config.filter_concurrency,
            config.peer_timeout,
            &config.state_dir,
        );
        log::info!(
            "sharing the paths the upstream cache {} has{}, asking it {} at a time",
            upstream.url(),
            if config.no_verify {
                " (its NarHash unchecked: --no-verify)"
            } else {
                " with this host's NarHash"
            },
            config.filter_concurrency
        );
        Arc::new(upstream)
    });
    let policy = SharePolicy::new(
        config.filter_mode,
        trusted_keys.clone(),
        &config.filter_patterns,
        upstream,
    );
    let daemon = DaemonPool::new(
        config.daemon_socket.clone(),
        config.workers.min(MAX_DAEMON_CONNECTIONS),
    );
    let store = Arc::new(LocalStore::new(
        daemon,
        config.store_root.clone(),
        policy,
        signing_key,
    ));

    if let Err(e) = store.daemon().check() {
        log::warn!(
            "nix-daemon not reachable ({e}): serving no local paths yet; retrying in the background"
        );
    }
    let wakeup = scanner::Wakeup::on_sighup().map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    // The scanner's share deltas go to the tracker, the one that needs them.
    // Unbounded: one delta a scan at most, and a dropped one would leave a
    // gap in what the tracker knows.
    let (delta_sender, delta_receiver) = match config.tracker {
        Some(_) => {
            let (sender, receiver) = crossbeam_channel::unbounded();
            (Some(sender), Some(receiver))
        }
        None => (None, None),
    };
    let scan_store = Arc::clone(&store);
    let interval = config.scan_interval;
    std::thread::Builder::new()
        .name("scanner".into())
        .spawn(move || scanner::run(scan_store, interval, wakeup, delta_sender))
        .map_err(|e| format!("cannot start the scanner thread: {e}"))?;

    // Every source of peers joins the one resolver, with one peer table;
    // HTTP reaches them all.
    let stats = Arc::new(Stats::new());
    let peers = Arc::new(PeerTable::new());
    // The saved counters and peer table (bans included) are read back
    // before any peer is asked or any request counted.
    let state = State::open(&config.state_dir, Arc::clone(&stats), Arc::clone(&peers));
    let tracker = match (&config.tracker, delta_receiver) {
        (Some(url), Some(deltas)) => Some(start_tracker(config, url, &store, deltas)?),
        _ => None,
    };
    let lan_side = start_lan(config, &store, &peers, &stats);
    let mut sources: Vec<Arc<dyn Discovery>> = Vec::new();
    if let Some(tracker) = &tracker {
        sources.push(Arc::clone(tracker) as Arc<dyn Discovery>);
    }
    if let Some((lan, summaries, _)) = &lan_side {
        sources.push(Arc::clone(summaries) as Arc<dyn Discovery>);
        sources.push(Arc::clone(lan) as Arc<dyn Discovery>);
    }
    let resolver = (!sources.is_empty()).then(|| {
        let transport = Arc::new(PeerClient::new(config.peer_timeout));
        Arc::new(Resolver::new(
            sources,
            transport,
            peers,
            trusted_keys,
            config.peer_timeout,
        ))
    });
    let (lan, summaries, publisher) = match lan_side {
        Some((lan, summaries, publisher)) => (Some(lan), Some(summaries), publisher),
        None => (None, None, None),
    };
    let store_for_readiness = Arc::clone(&store);
    let node = NodeInfo {
        version: env!("CARGO_PKG_VERSION"),
        mode: match (lan.is_some(), tracker.is_some()) {
            (true, true) => "lan+tracker",
            (true, false) => "lan",
            (false, true) => "tracker",
            (false, false) => "local",
        },
        id: tracker.as_ref().map(|t| t.node_id().to_string()),
        peer_id: config.peer_id.clone().unwrap_or_else(host_name),
        bind: config.bind,
        port: config.port,
        lan_port: lan.as_ref().map(|lan| lan.port()),
        daemon_socket: config.daemon_socket.clone(),
        scan_interval: config.scan_interval,
        lan_wanted: config.lan.enabled,
    };
    // The scanner wakes on SIGHUP: the control endpoint sends one.
    let rescan = || signal_hook::low_level::raise(signal_hook::consts::SIGHUP);
    let context = ServerContext {
        store,
        priority: config.priority,
        stats: Arc::clone(&stats),
        node,
        public: PublicPages {
            metrics: config.metrics_public,
            dashboard: config.dashboard_public,
        },
        rescan: Some(Box::new(rescan)),
        bind: config.bind,
        resolver,
        lan,
        summaries,
        publisher,
        tracker,
        verify_before_send: config.verify_before_send,
        held_nars: MemoryBudget::new(config.verify_before_send.max(HELD_NARS_MIN_BUDGET)),
        read_ahead: ReadAhead::new(
            read_ahead::MAX_NAR,
            read_ahead::BUDGET,
            transfer_budget(read_ahead::MAX_NAR, config.peer_timeout),
        ),
    };
    let server = Server::start(
        SocketAddr::new(config.bind, config.port),
        Lanes::for_workers(config.workers),
        context,
    )
    .map_err(|e| e.to_string())?;
    log::info!(
        "peerix {} serving http://{} (store root {}, nix-daemon {})",
        env!("CARGO_PKG_VERSION"),
        server.local_addr,
        config.store_root.display(),
        config.daemon_socket.display()
    );
    announce_readiness(&store_for_readiness);

    // SIGTERM (systemd's stop) and SIGINT: stop taking requests, let the
    // running ones finish within --shutdown-timeout, and exit 0.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    // The state is written from here too: no thread of its own.
    let tick = config.state_interval.min(Duration::from_millis(100));
    let (mut watched, mut saved) = (Instant::now(), Instant::now());
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        // About once a second: when a scan completes, and whether the
        // daemon comes or goes, for the index age and the activity log.
        if watched.elapsed() >= Duration::from_secs(1) {
            watched = Instant::now();
            watch_store(&stats, &store_for_readiness);
        }
        if saved.elapsed() >= config.state_interval {
            saved = Instant::now();
            state.save();
        }
    }
    log::info!(
        "stopping: letting running requests finish (at most {:?})",
        config.shutdown_timeout
    );
    // Refused before systemd hears STOPPING, so that nothing asked after it
    // is still taken.
    server.refuse_new_requests();
    notify::notify("STOPPING=1\nSTATUS=finishing running requests");
    let left = server.drain(config.shutdown_timeout);
    if state.save() {
        log::info!("state written to {}", config.state_dir.display());
    }
    if left > 0 {
        log::warn!("stopped with {left} request(s) still running");
    } else {
        log::info!("stopped");
    }
    Ok(())
}

/// The kernel's host name, the default `--peer-id`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "peerix".to_string())
}

fn watch_store(stats: &Stats, store: &LocalStore) {
    let index = store.index();
    stats.watch_store(&StoreView {
        daemon_reachable: store.daemon_reachable(),
        scans: store.completed_scans(),
        indexed: index.len(),
        shared: index.shared_len(),
        ..StoreView::default()
    });
}

/// Tells systemd the service is ready once the first scan is done (so
/// peers are told what is here from the start), on a thread of its own:
/// with no nix-daemon yet, that may take a while, and requests are served
/// meanwhile.
fn announce_readiness(store: &Arc<LocalStore>) {
    let store = Arc::clone(store);
    let spawned = std::thread::Builder::new()
        .name("ready".into())
        .spawn(move || {
            while store.completed_scans() == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            notify::notify(&format!(
                "READY=1\nSTATUS=serving {} paths, {} shared",
                store.index().len(),
                store.index().shared_len()
            ));
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the readiness thread: {e}; telling systemd now");
        notify::notify("READY=1");
    }
}

//! `peerix-tracker`: the registry of which peerix node holds which store
//! path. Parses the configuration and serves until killed (see
//! `peerix::tracker::server`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use peerix::tracker::config::{self, Command};
use peerix::tracker::server;

fn main() -> ExitCode {
    let config = match config::parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("peerix-tracker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("peerix-tracker: {e}");
            return ExitCode::from(2);
        }
    };
    let default = if config.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .init();
    match server::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

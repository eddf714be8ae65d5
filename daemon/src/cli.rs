//! The command line: `serve` runs the daemon; `pull`, `chat`, `status`, `tools`, `token` and `doctor`
//! are small tools around it; `rpc-worker` lends this board's devices to a daemon on another.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigSource, DEFAULT_CONFIG_PATH, Settings};

mod client;
mod connect;
mod token;
mod doctor;
mod rpc_worker;

#[derive(Parser)]
#[command(name = "phi3d", version, about = "Keeps a Phi-3 family model warm and serves it over gRPC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon
    Serve {
        /// Config file [default: /etc/phi3d/phi3d.toml, if present]
        #[arg(long, env = "PHI3D_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Download a catalogue model into the model directory
    Pull {
        /// Catalogue name, e.g. phi-3-mini-4k-instruct
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        /// List the catalogue instead
        #[arg(long)]
        list: bool,
        /// Directory holding downloaded models
        #[arg(long, env = "PHI3D_MODEL_DIR")]
        model_dir: Option<PathBuf>,
        /// Refuse to download (only checks that the model is present)
        #[arg(long, env = "PHI3D_OFFLINE", num_args = 0..=1, default_missing_value = "true")]
        offline: Option<bool>,
    },
    /// Chat with a running daemon; interactive when no prompt is given
    Chat(client::ChatArgs),
    /// Show what a running daemon is doing
    Status(client::StatusArgs),
    /// List the tools a running daemon's plugins offer, with their sandbox protections
    Tools(client::StatusArgs),
    /// Manage the bearer tokens clients authenticate with
    Token(token::TokenArgs),
    /// Serve this board's devices to a daemon on another board (llama.cpp's RPC server; its
    /// protocol is unauthenticated: loopback or a private link only)
    RpcWorker(rpc_worker::RpcWorkerArgs),
    /// Check what this device offers and whether the configured set-up fits it
    Doctor {
        /// Config file [default: /etc/phi3d/phi3d.toml, if present]
        #[arg(long, env = "PHI3D_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, settings } => serve(config, settings),
        Command::Pull { name, list, model_dir, offline } => pull(name, list, model_dir, offline),
        Command::Chat(args) => runtime().and_then(|runtime| runtime.block_on(client::chat(args))),
        Command::Status(args) => runtime().and_then(|runtime| runtime.block_on(client::status(args))),
        Command::Tools(args) => runtime().and_then(|runtime| runtime.block_on(client::tools(args))),
        Command::Token(args) => token::run(args),
        Command::RpcWorker(args) => rpc_worker::run(args),
        Command::Doctor { config, settings } => doctor::run(config_source(config, settings)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The file `--config` names (or the default one) with the environment and flags over it.
fn config_source(config_path: Option<PathBuf>, overrides: Settings) -> ConfigSource {
    let explicit = config_path.is_some();
    let path = config_path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    ConfigSource { path, explicit, overrides }
}

fn serve(config_path: Option<PathBuf>, flags: Settings) -> anyhow::Result<()> {
    let source = config_source(config_path, flags);
    let config = source.load()?;
    crate::logging::init(&config.log);
    // A build that picks its CPU kernels at run time stops here, naming the folder, when
    // their libraries are missing.
    crate::engine::backend::load().map_err(anyhow::Error::msg)?;
    crate::sandbox::harden_daemon();
    // The daemon's own async work is small (a few messages per generated token); one worker
    // thread does it, so that fewer threads compete with llama.cpp's for the cores (whose
    // threads meet at a barrier many times per token and all wait for the slowest).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let served = runtime.block_on(crate::server::serve(config, source, crate::server::shutdown_signal()));
    // A worker thread left behind (stuck in llama.cpp) keeps its join on the blocking pool:
    // the process ends without waiting for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

fn pull(name: Option<String>, list: bool, model_dir: Option<PathBuf>, offline: Option<bool>) -> anyhow::Result<()> {
    if list {
        for entry in crate::model::catalogue::entries() {
            println!("{:<28} {:>7} ctx  {}  ({}/{})", entry.name, entry.context_length, entry.description, entry.repo, entry.file);
        }
        return Ok(());
    }
    let name = name.expect("clap requires a name unless --list");
    let settings = Settings { model: Some(name.clone()), model_dir, offline, ..Settings::default() };
    let config = Config::from_settings(settings)?;
    crate::logging::init(&config.log);
    let entry = match crate::model::ModelRef::parse(&name).map_err(anyhow::Error::msg)? {
        crate::model::ModelRef::Catalogue(entry) => entry,
        crate::model::ModelRef::File(_) => anyhow::bail!("pull takes a catalogue name, not a path (see `phi3d pull --list`)"),
    };
    let path = runtime()?
        .block_on(crate::model::fetch(entry, &config.model_dir, config.offline))
        .map_err(anyhow::Error::msg)?;
    println!("{}", path.display());
    Ok(())
}

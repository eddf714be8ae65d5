//! `phi3d token create | revoke | list`: the bearer tokens in the daemon's token file. The
//! running daemon notices changes to the file by itself.

use std::path::PathBuf;

use crate::auth::tokens::TokenFile;
use crate::config::{Config, DEFAULT_CONFIG_PATH, Settings};

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    action: Action,
    /// The token file [default: token_file from the config file, else /etc/phi3d/tokens.toml]
    #[arg(long, env = "PHI3D_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The daemon's config file, for its token_file
    #[arg(long, env = "PHI3D_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Create a token and print it (the only time it is shown)
    Create { name: String },
    /// Revoke a token: requests with it are refused from now on
    Revoke { name: String },
    /// List the tokens by name
    List,
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let path = match args.token_file {
        Some(path) => path,
        None => {
            let explicit = args.config.is_some();
            let config_path = args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            Config::from_settings(Settings::from_file(&config_path, explicit)?)?.token_file
        }
    };
    let mut file = TokenFile::load(&path).map_err(anyhow::Error::msg)?;
    match args.action {
        Action::Create { name } => {
            let token = file.create(&name).map_err(anyhow::Error::msg)?;
            file.save(&path).map_err(anyhow::Error::msg)?;
            println!("{token}");
            eprintln!(
                "token `{name}` created in {}; keep it now, phi3d stores only its digest. \
                 Clients send it as `authorization: Bearer <token>` (phi3d chat --token, or PHI3D_TOKEN).",
                path.display()
            );
        }
        Action::Revoke { name } => {
            file.revoke(&name).map_err(anyhow::Error::msg)?;
            file.save(&path).map_err(anyhow::Error::msg)?;
            eprintln!("token `{name}` revoked; requests with it are refused from now on");
        }
        Action::List => {
            if file.tokens.is_empty() {
                eprintln!("no tokens in {}", path.display());
            }
            for entry in &file.tokens {
                match &entry.revoked {
                    Some(when) => println!("{:<24} created {}  revoked {when}", entry.name, entry.created),
                    None => println!("{:<24} created {}", entry.name, entry.created),
                }
            }
        }
    }
    Ok(())
}

//! phi3d: keeps a Phi-3 family model warm and serves it over gRPC.
//!
//! See ARCHITECTURE.md at the repository root for the code map.

pub mod auth;
pub mod cli;
pub mod config;
pub mod drain;
pub mod engine;
pub mod http;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod offload;
pub mod plugins;
pub mod reload;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod systemd;
pub mod toml_lines;
pub mod tools;

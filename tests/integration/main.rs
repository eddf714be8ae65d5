//! Integration tests: each starts the real `phi3d` binary on a free loopback port with a
//! generated model and talks to it over gRPC, as a client would.

mod balancer;
mod cancel;
mod chat;
mod cli;
mod common;
mod config;
mod deploy;
mod doctor;
mod download;
mod errors;
mod hostile_requests;
mod http_bridges;
mod hostile_connections;
mod lifecycle;
mod lookup;
mod neighbours;
mod tokenizer;
mod plugins;
mod prompt_cache;
mod prompt_reuse;
mod security;
mod reload;
mod rpc;
mod shutdown;
mod slots;
mod structured;
mod systemd;
mod tools;

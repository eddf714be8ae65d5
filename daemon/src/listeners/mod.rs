//! Where phi3d listens: the sockets systemd passed (socket activation), or else the TCP
//! address and the Unix socket the config names; and the rule that a listener reachable from
//! the network needs authentication.
//!
//! TLS, when configured, covers every TCP listener (gRPC and the HTTP bridges alike); the
//! Unix socket is guarded by its file mode and group instead (TLS to a local peer adds nothing
//! a file permission does not). The network rule is checked for each listener on its own,
//! with what that listener itself requires ([`Door`]). `connections` holds what one TCP
//! connection may take (caps and deadlines).

pub mod activation;
pub mod connections;
pub mod tls;
pub mod unix;

use std::net::SocketAddr;

use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;

/// The bound listening sockets.
pub struct Listeners {
    pub tcp: Vec<TcpListener>,
    pub unix: Vec<UnixListener>,
    /// The HTTP bridges' listener (`http_listen`), bound by phi3d in every case.
    pub http: Option<TcpListener>,
    /// The socket file phi3d created, removed when this is dropped (never one systemd passed).
    pub socket_file: Option<unix::SocketFile>,
    pub activated: bool,
}

impl Listeners {
    /// Takes the sockets systemd passed, or binds the configured ones.
    pub async fn open(config: &Config) -> anyhow::Result<Listeners> {
        let http = match config.http_listen {
            None => None,
            Some(address) => Some(TcpListener::bind(address).await.map_err(|err| {
                anyhow::anyhow!("http_listen: cannot bind {address}: {err}; choose another address with --http-listen")
            })?),
        };
        if let Some(passed) = activation::passed_listeners()? {
            tracing::info!(
                tcp = passed.tcp.len(),
                unix = passed.unix.len(),
                "using the sockets systemd passed; listen and unix_socket are not bound"
            );
            return Ok(Listeners { tcp: passed.tcp, unix: passed.unix, http, socket_file: None, activated: true });
        }
        let tcp = TcpListener::bind(config.listen).await.map_err(|err| {
            anyhow::anyhow!("listen: cannot bind {}: {err}; choose another address with --listen", config.listen)
        })?;
        let mut listeners = Listeners { tcp: vec![tcp], unix: Vec::new(), http, socket_file: None, activated: false };
        if let Some(path) = &config.unix_socket {
            let (listener, file) = unix::bind(path, config.unix_socket_mode, config.unix_socket_group.as_deref())?;
            listeners.unix.push(listener);
            listeners.socket_file = Some(file);
        }
        Ok(listeners)
    }

    /// The TCP addresses (gRPC and HTTP), for the log and the network check.
    pub fn tcp_addresses(&self) -> Vec<SocketAddr> {
        self.tcp.iter().chain(&self.http).filter_map(|listener| listener.local_addr().ok()).collect()
    }

    /// Refuses a TCP listener that other machines can reach when its callers need not
    /// authenticate: `grpc` is what the gRPC TCP listeners require, `http` what the HTTP
    /// bridges' listener requires, each judged on its own.
    pub fn check_exposure(&self, grpc: Door, http: Door, allow_unauthenticated_network: bool) -> anyhow::Result<()> {
        let doors = self.tcp.iter().map(|listener| (listener, grpc)).chain(self.http.iter().map(|listener| (listener, http)));
        let exposed: Vec<String> = doors
            .filter_map(|(listener, door)| listener.local_addr().ok().map(|address| (address, door)))
            .filter(|(address, door)| !address.ip().to_canonical().is_loopback() && !door.authenticates())
            .map(|(address, _)| address.to_string())
            .collect();
        if exposed.is_empty() {
            return Ok(());
        }
        if allow_unauthenticated_network {
            tracing::warn!(
                listeners = exposed.join(", "),
                "anyone on the network can use this phi3d: no authentication is configured \
                 (allow_unauthenticated_network = true)"
            );
            return Ok(());
        }
        anyhow::bail!(
            "{} can be reached from the network, but no authentication is configured: create a token with \
             `phi3d token create NAME`, or set tls_client_ca to require client certificates; or listen on \
             127.0.0.1; or set allow_unauthenticated_network = true to serve anyone who can reach it",
            exposed.join(", ")
        )
    }
}

/// What one listener requires of its callers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Door {
    /// Bearer tokens (the token file exists).
    pub tokens: bool,
    /// Client certificates, checked in this listener's own TLS handshake.
    pub client_certificates: bool,
}

impl Door {
    fn authenticates(&self) -> bool {
        self.tokens || self.client_certificates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn listening_on(address: &str) -> Listeners {
        let tcp = TcpListener::bind(address).await.unwrap();
        Listeners { tcp: vec![tcp], unix: Vec::new(), http: None, socket_file: None, activated: false }
    }

    #[tokio::test]
    async fn only_a_network_listener_needs_authentication() {
        let open = Door::default();
        let tokens = Door { tokens: true, client_certificates: false };
        let certificates = Door { tokens: false, client_certificates: true };
        let loopback = listening_on("127.0.0.1:0").await;
        assert!(loopback.check_exposure(open, open, false).is_ok());
        let network = listening_on("0.0.0.0:0").await;
        let err = network.check_exposure(open, open, false).unwrap_err().to_string();
        assert!(err.contains("no authentication is configured") && err.contains("phi3d token create"), "{err}");
        assert!(network.check_exposure(tokens, open, false).is_ok());
        assert!(network.check_exposure(certificates, open, false).is_ok());
        assert!(network.check_exposure(open, open, true).is_ok(), "the explicit override");
    }

    #[tokio::test]
    async fn each_listener_is_judged_by_its_own_door() {
        let certificates = Door { tokens: false, client_certificates: true };
        let mut listeners = listening_on("127.0.0.1:0").await;
        listeners.http = Some(TcpListener::bind("0.0.0.0:0").await.unwrap());
        // Client certificates on gRPC say nothing about an HTTP listener without them.
        let err = listeners.check_exposure(certificates, Door::default(), false).unwrap_err().to_string();
        assert!(err.contains("0.0.0.0:"), "{err}");
        assert!(listeners.check_exposure(Door::default(), certificates, false).is_ok());
    }
}

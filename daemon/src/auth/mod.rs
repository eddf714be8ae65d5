//! Who is calling: bearer tokens checked on every RPC but health, and the identity of the
//! caller (its token's name, or where it connects from) that limits and `Cancel` go by.
//!
//! The check is a tonic interceptor wrapped around each service except health, so a new RPC
//! cannot forget it. A client certificate is checked earlier, by rustls during the TLS
//! handshake (`listeners::tls`): a connection without a valid one never reaches this.

pub mod tokens;

use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Status};

use tokens::TokenStore;

/// The caller a request is accounted to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// Holder of the named token.
    Token(String),
    /// A TCP peer, by address (its port changes with every connection).
    Address(IpAddr),
    /// A local process on the Unix socket, by user id.
    LocalUser(u32),
    /// A transport that says nothing about its peer.
    Unknown,
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Token(name) => write!(f, "token `{name}`"),
            Client::Address(address) => write!(f, "{address}"),
            Client::LocalUser(uid) => write!(f, "local uid {uid}"),
            Client::Unknown => write!(f, "an unidentified client"),
        }
    }
}

impl Client {
    /// The caller as recorded by [`Authenticator`]; requests that skipped it (unit tests of the
    /// services) are `Unknown`.
    pub fn of<T>(request: &Request<T>) -> Client {
        request.extensions().get::<Client>().cloned().unwrap_or(Client::Unknown)
    }

    fn peer<T>(request: &Request<T>) -> Client {
        if let Some(address) = request.remote_addr() {
            return Client::Address(address.ip().to_canonical());
        }
        match request.extensions().get::<tonic::transport::server::UdsConnectInfo>() {
            Some(info) => info.peer_cred.map_or(Client::Unknown, |cred| Client::LocalUser(cred.uid())),
            None => Client::Unknown,
        }
    }
}

/// The interceptor: when tokens are in use, a valid bearer token is required and names the
/// caller; otherwise callers are told apart by their peer.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<TokenStore>,
}

impl Authenticator {
    pub fn new(tokens: Arc<TokenStore>) -> Self {
        Authenticator { tokens }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let checked = match bearer_token(&request) {
            Ok(token) => self.tokens.check(token).map_err(|rejection| Status::unauthenticated(rejection.to_string())),
            // A header nobody asked for is nobody's business.
            Err(malformed) => if self.tokens.required() { Err(malformed) } else { Ok(None) },
        };
        let client = match checked {
            Ok(Some(name)) => Client::Token(name),
            Ok(None) => Client::peer(&request),
            Err(status) => {
                tracing::warn!(peer = %Client::peer(&request), reason = status.message(), "request refused");
                return Err(status);
            }
        };
        request.extensions_mut().insert(client);
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` header, `None` when there is none.
fn bearer_token<T>(request: &Request<T>) -> Result<Option<&str>, Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let malformed = || Status::unauthenticated("the authorization header must be `Bearer <token>`");
    let value = value.to_str().map_err(|_| malformed())?;
    bearer(value).map(Some).ok_or_else(malformed)
}

/// The token of an `authorization` header's value `Bearer <token>` (the scheme in any case),
/// for gRPC and the HTTP bridges alike.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_header(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request.metadata_mut().insert("authorization", value.parse().unwrap());
        request
    }

    #[test]
    fn tokens_are_required_and_name_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut file = tokens::TokenFile::default();
        let token = file.create("kitchen").unwrap();
        file.save(&path).unwrap();
        let mut auth = Authenticator::new(Arc::new(TokenStore::open(path).unwrap()));

        let request = auth.call(with_header(&format!("Bearer {token}"))).unwrap();
        assert_eq!(Client::of(&request), Client::Token("kitchen".into()));
        let request = auth.call(with_header(&format!("bearer  {token}"))).unwrap();
        assert_eq!(Client::of(&request), Client::Token("kitchen".into()));

        let missing = auth.call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("--token"), "{}", missing.message());
        let basic = auth.call(with_header("Basic abc")).unwrap_err();
        assert!(basic.message().contains("Bearer <token>"), "{}", basic.message());
        let wrong = auth.call(with_header("Bearer phi3d_0000")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn without_tokens_anyone_passes_as_their_peer() {
        let dir = tempfile::tempdir().unwrap();
        let mut auth = Authenticator::new(Arc::new(TokenStore::open(dir.path().join("none.toml")).unwrap()));
        let request = auth.call(Request::new(())).unwrap();
        assert_eq!(Client::of(&request), Client::Unknown);
    }
}

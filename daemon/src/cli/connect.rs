//! How the CLI's client commands reach a daemon: the address (TCP, TLS or a Unix socket),
//! the bearer token, and the certificates for TLS and mutual TLS.

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// A channel to the daemon that sends the token with every call.
pub type Connection = InterceptedService<Channel, Bearer>;

#[derive(clap::Args)]
pub struct ServerArgs {
    /// The daemon's address: http://HOST:PORT, https://HOST:PORT (TLS) or unix:/PATH
    #[arg(long, env = "PHI3D_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Bearer token, when the daemon requires one (`phi3d token create NAME`)
    #[arg(long, env = "PHI3D_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the daemon's TLS certificate
    #[arg(long, env = "PHI3D_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), when the daemon requires one (mutual TLS)
    #[arg(long, env = "PHI3D_TLS_CLIENT_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, env = "PHI3D_TLS_CLIENT_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the daemon's certificate must carry (default: the address's host)
    #[arg(long)]
    tls_domain: Option<String>,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ServerArgs {
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let addr = &self.addr;
        let bearer = match &self.token {
            None => Bearer(None),
            Some(token) => Bearer(Some(
                format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--token: a token is printable ASCII (phi3d_ and 64 hex digits)"))?,
            )),
        };
        let unreachable = |err: tonic::transport::Error| {
            // The transport error's own text is only "transport error"; its cause says what.
            let cause = std::error::Error::source(&err).map_or_else(|| err.to_string(), |cause| cause.to_string());
            anyhow::anyhow!("cannot reach phi3d at {addr}: {cause}; is `phi3d serve` running?")
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // The URI is not used for a Unix socket, but the endpoint needs one.
            let channel = Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(unreachable)?;
            return Ok(InterceptedService::new(channel, bearer));
        }
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|err| anyhow::anyhow!("address `{addr}`: {err}; use e.g. {DEFAULT_ADDR} or unix:/run/phi3d/phi3d.sock"))?;
        if addr.starts_with("https:") {
            endpoint = endpoint.tls_config(self.tls()?)?;
        } else if self.tls_ca.is_some() || self.tls_cert.is_some() {
            anyhow::bail!("TLS options were given but the address `{addr}` is not https://");
        }
        Ok(InterceptedService::new(endpoint.connect().await.map_err(unreachable)?, bearer))
    }

    fn tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|err| anyhow::anyhow!("{flag}: cannot read {}: {err}", path.display()))
        };
        let ca = self.tls_ca.as_ref().ok_or_else(|| {
            anyhow::anyhow!("an https:// address needs --tls-ca (PHI3D_TLS_CA): the CA certificate that signed the daemon's")
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?));
        }
        if let Some(domain) = &self.tls_domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

//! The Home Assistant side: configuration from the environment, the domain allow-list, and a
//! REST client whose every failure is a sentence a model can act on or pass to the user.

use std::{collections::BTreeSet, error::Error, io, net::ToSocketAddrs, time::Duration};

use reqwest::{
    Client, Method, StatusCode, Url,
    dns::{Addrs, Name, Resolve, Resolving},
};
use serde_json::Value;

/// Domains the model may touch when `HA_ALLOWED_DOMAINS` is unset: devices a household
/// expects a voice assistant to switch, and nothing like locks, alarms or automations.
const DEFAULT_ALLOWED_DOMAINS: &str = "light,switch,climate,cover,fan,media_player,scene";

/// Whole-request limit, kept under the manifest's 10 s per-call wall clock so the model gets
/// this plugin's explanation instead of the host killing the call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const MISSING_URL: &str = "HA_URL is not set: the user must set it in the plugin manifest's \
     [env] section, e.g. HA_URL = \"http://homeassistant.local:8123\"";
const MISSING_TOKEN: &str = "HA_TOKEN is not set: the user must create a long-lived access token \
     in Home Assistant (profile page, Security tab) and set HA_TOKEN in the plugin manifest's \
     [env] section";
const REJECTED_TOKEN: &str = "the Home Assistant token was rejected (HTTP 401): the user must \
     set HA_TOKEN in the plugin manifest to a valid long-lived access token";

/// How much of an error body to quote; Home Assistant's are short, a proxy's HTML page is not.
const QUOTED_BODY_CHARS: usize = 300;

/// Resolves host names with the system resolver on the calling thread.
///
/// reqwest's default resolver runs `getaddrinfo` on a blocking-pool thread, and the sandbox's
/// process limit counts threads. Calls are served one at a time, so blocking the only thread
/// during a lookup costs nothing; the system resolver (not a DNS-only one) is kept so that
/// `/etc/hosts` and mDNS names such as `homeassistant.local` work.
struct InlineResolver;

impl Resolve for InlineResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let found = (name.as_str(), 0)
            .to_socket_addrs()
            .map(|addrs| Box::new(addrs) as Addrs)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("could not look up {}: {e}", name.as_str()),
                )
                .into()
            });
        Box::pin(std::future::ready(found))
    }
}

/// One Home Assistant instance, as the manifest's environment describes it.
pub struct HomeAssistant {
    /// `HA_URL` without a trailing slash, or why it is unusable: the plugin still starts, so
    /// that the model can list the tools and relay the configuration problem.
    base_url: Result<String, String>,
    token: String,
    allowed: BTreeSet<String>,
    http: Client,
}

impl HomeAssistant {
    /// Why the plugin cannot reach Home Assistant as configured (`HA_URL` or `HA_TOKEN`
    /// missing or unusable), or `None` when it is configured.
    pub fn configuration_problem(&self) -> Option<String> {
        match &self.base_url {
            Err(problem) => Some(problem.clone()),
            Ok(_) if self.token.is_empty() => Some(MISSING_TOKEN.to_owned()),
            Ok(_) => None,
        }
    }

    pub fn from_env() -> Result<Self, reqwest::Error> {
        let env = |key: &str| std::env::var(key).unwrap_or_default().trim().to_owned();
        let url = env("HA_URL");
        let base_url = match Url::parse(&url) {
            _ if url.is_empty() => Err(MISSING_URL.to_owned()),
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {
                Ok(url.trim_end_matches('/').to_owned())
            }
            _ => Err(format!("HA_URL '{url}' is not an http:// or https:// URL")),
        };
        let domains = env("HA_ALLOWED_DOMAINS");
        let domains = if domains.is_empty() {
            DEFAULT_ALLOWED_DOMAINS
        } else {
            &domains
        };
        let allowed = domains
            .split(',')
            .map(|d| d.trim().to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        let http = Client::builder()
            .dns_resolver(InlineResolver)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(Self {
            base_url,
            token: env("HA_TOKEN"),
            allowed,
            http,
        })
    }

    pub fn allowed_domains(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }

    /// Refuses a domain outside the allow-list before anything is sent to Home Assistant.
    pub fn check_domain(&self, domain: &str) -> Result<(), String> {
        if self.allowed.contains(domain) {
            return Ok(());
        }
        Err(format!(
            "the domain '{domain}' is not allowed for this assistant; allowed domains: {}",
            self.allowed_domains().collect::<Vec<_>>().join(", ")
        ))
    }

    /// GETs `path` (below `/api/`) and parses the JSON reply; `not_found` is the whole error
    /// message for a 404, which only the caller can word.
    pub async fn get(&self, path: &str, not_found: &str) -> Result<Value, String> {
        self.send(Method::GET, path, None, not_found).await
    }

    pub async fn post(&self, path: &str, body: Value, not_found: &str) -> Result<Value, String> {
        self.send(Method::POST, path, Some(body), not_found).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        not_found: &str,
    ) -> Result<Value, String> {
        let base = self.base_url.as_deref().map_err(Clone::clone)?;
        if self.token.is_empty() {
            return Err(MISSING_TOKEN.into());
        }
        let mut request = self
            .http
            .request(method, format!("{base}/api/{path}"))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(base, &e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(status_error(status, &body, not_found));
        }
        response
            .json()
            .await
            .map_err(|e| format!("Home Assistant sent a reply that is not the expected JSON: {e}"))
    }
}

fn transport_error(base: &str, error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return format!(
            "Home Assistant at {base} did not answer within {} seconds",
            REQUEST_TIMEOUT.as_secs()
        );
    }
    // reqwest's own message is generic ("error sending request"); the innermost cause says what
    // actually happened, and an io::Error somewhere in the chain says whether it was a refusal.
    let chain: Vec<&(dyn Error + 'static)> =
        std::iter::successors(Some(error as &(dyn Error + 'static)), |e| (*e).source()).collect();
    let cause = chain.last().copied().unwrap_or(error);
    let refused = chain
        .iter()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::ConnectionRefused);
    if refused {
        format!(
            "connection refused by Home Assistant at {base}: is it running, and is HA_URL right?"
        )
    } else if error.is_connect() {
        format!("could not connect to Home Assistant at {base}: {cause}")
    } else {
        format!("the request to Home Assistant at {base} failed: {cause}")
    }
}

fn status_error(status: StatusCode, body: &str, not_found: &str) -> String {
    match status {
        StatusCode::UNAUTHORIZED => REJECTED_TOKEN.into(),
        StatusCode::NOT_FOUND => not_found.into(),
        _ => {
            // Home Assistant explains itself as {"message": "..."}; anything else is quoted raw.
            let message = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| body.trim().chars().take(QUOTED_BODY_CHARS).collect());
            let reason = status.canonical_reason().unwrap_or("error");
            if message.is_empty() {
                format!("Home Assistant answered HTTP {} {reason}", status.as_u16())
            } else {
                format!(
                    "Home Assistant answered HTTP {} {reason}: {message}",
                    status.as_u16()
                )
            }
        }
    }
}

/// Checks an entity id's shape (`domain.object_id`, lower-case letters, digits and `_`) and
/// returns its domain. The shape check also keeps the id from adding URL path segments.
pub fn entity_domain(entity_id: &str) -> Result<&str, String> {
    match entity_id.split_once('.') {
        Some((domain, object)) if is_slug(domain) && is_slug(object) => Ok(domain),
        _ => Err(format!(
            "'{entity_id}' is not an entity id; entity ids look like 'light.kitchen' (call list_entities to see them)"
        )),
    }
}

/// Home Assistant's slug alphabet for domains, services and object ids.
pub fn is_slug(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

//! What a web page in a browser may make phi3d do: nothing, unless its origin is allowed.
//!
//! Browsers send a cross-site POST with `Content-Type: text/plain` (or a form type) without
//! asking first, and a page can reach a loopback listener under its own host name through DNS
//! rebinding. So, before any handler (and before the token check, whose refusals a page could
//! use as an oracle), on every route:
//! - a request whose `Origin` is not a loopback origin (`http(s)://localhost`, `127.0.0.1`,
//!   `[::1]`, any port) or one `http_allowed_origins` matches is refused with 403;
//! - on a listener bound to loopback, a `Host` other than localhost, a loopback address or one
//!   of `http_allowed_hosts` (any port) is refused with 403 (DNS rebinding);
//! - a request from a browser (it carries `Origin` or `Sec-Fetch-*`) whose body is not declared
//!   JSON is refused with 415: only non-browser clients get `curl -d`'s leniency (every POST
//!   body read as JSON, as Ollama does); a cross-site request without `Origin` that is not a
//!   GET is refused with 403;
//! - an allowed origin gets CORS answers (preflight and `Access-Control-Allow-Origin`), so that
//!   a page it serves can send JSON.
//!
//! Requests without `Origin` or `Sec-Fetch-*` (curl, Home Assistant, the Python libraries)
//! pass as before.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Api, ApiError};

/// The browser rules of one listener.
#[derive(Clone)]
pub struct Browsers {
    origins: Arc<[String]>,
    hosts: Arc<[String]>,
    /// Whether the listener is bound to a loopback address (then `Host` is checked).
    loopback_listener: bool,
}

impl Browsers {
    pub fn new(origins: &[String], hosts: &[String], loopback_listener: bool) -> Browsers {
        let lower = |items: &[String]| -> Arc<[String]> {
            items.iter().map(|item| item.trim().trim_end_matches('/').to_ascii_lowercase()).collect()
        };
        Browsers { origins: lower(origins), hosts: lower(hosts), loopback_listener }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        loopback_origin(&origin) || self.origins.iter().any(|pattern| pattern == "*" || matches(pattern, &origin))
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let Some(name) = host_of(&host) else { return false };
        let name = name.trim_end_matches('.');
        name == "localhost" || is_loopback_ip(name) || self.hosts.iter().any(|allowed| allowed.trim_end_matches('.') == name)
    }
}

/// The middleware: see the module comment.
pub async fn guard(State(rules): State<Browsers>, request: Request, next: Next) -> Response {
    let api = Api::of(request.uri().path());
    let headers = request.headers();
    if rules.loopback_listener {
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|authority| authority.to_string()));
        // A request without a host (HTTP/1.0) is no browser's.
        if let Some(host) = host.filter(|host| !rules.host_allowed(host)) {
            tracing::info!(host, path = request.uri().path(), "HTTP request refused: Host not allowed on a loopback listener");
            return refuse(
                api,
                StatusCode::FORBIDDEN,
                format!(
                    "Host `{host}` is not allowed on this loopback listener (a web page may be reaching phi3d \
                     through DNS rebinding); add it to http_allowed_hosts if you meant it"
                ),
            );
        }
    }
    let origin = match headers.get(header::ORIGIN).map(|value| value.to_str()) {
        None => None,
        Some(Ok(origin)) => Some(origin.to_owned()),
        Some(Err(_)) => return refuse(api, StatusCode::FORBIDDEN, "the Origin header is not readable text".to_owned()),
    };
    if let Some(origin) = origin.as_deref().filter(|origin| !rules.origin_allowed(origin)) {
        tracing::info!(origin, path = request.uri().path(), "HTTP request refused: Origin not allowed");
        return refuse(
            api,
            StatusCode::FORBIDDEN,
            format!("Origin `{origin}` is not allowed; add it to http_allowed_origins to let pages from it use phi3d"),
        );
    }
    let fetch_site = headers.get("sec-fetch-site").and_then(|value| value.to_str().ok()).map(str::to_ascii_lowercase);
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if origin.is_none() && fetch_site.as_deref() == Some("cross-site") && !safe {
        return refuse(api, StatusCode::FORBIDDEN, "a cross-site request from a browser must carry its Origin".to_owned());
    }
    if let Some(origin) = &origin
        && request.method() == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight(origin, headers);
    }
    let from_browser = origin.is_some() || fetch_site.is_some() || headers.contains_key("sec-fetch-mode");
    if from_browser && !safe && !declared_json(headers) {
        let declared = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("none");
        return refuse(
            api,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a request from a browser must send its body as application/json, not `{declared}`"),
        );
    }
    let mut response = next.run(request).await;
    if let Some(origin) = origin.and_then(|origin| HeaderValue::from_str(&origin).ok()) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

fn refuse(api: Api, status: StatusCode, message: String) -> Response {
    ApiError::new(api, status, message).into_response()
}

/// The answer to an allowed origin's CORS preflight.
fn preflight(origin: &str, headers: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let out = response.headers_mut();
    if let Ok(origin) = HeaderValue::from_str(origin) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
    let requested = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        requested.unwrap_or_else(|| HeaderValue::from_static("authorization, content-type")),
    );
    out.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    out.insert(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// Whether the body is declared JSON: `application/json` or `application/*+json`.
fn declared_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `http(s)://localhost`, `127.x.x.x` or `[::1]`, with any port.
fn loopback_origin(origin: &str) -> bool {
    let Some(authority) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
        return false;
    };
    host_of(authority).is_some_and(|host| host == "localhost" || is_loopback_ip(host))
}

/// The host of `host[:port]` or `[v6][:port]`; `None` when the port is not a number.
fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|port| port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit())) || host.is_empty() {
        return None;
    }
    Some(host)
}

fn is_loopback_ip(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `pattern` against `text`, where `*` stands for one host label or one port: letters, digits
/// and `-`, at least one. Never a dot: `http://192.168.1.*` must not let in
/// `http://192.168.1.evil.example`.
fn matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else { return false };
            let run = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(rest.len());
            (1..=run).any(|taken| matches(tail, &rest[taken..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_origins_and_patterns() {
        let rules = Browsers::new(&["https://ha.example:8123".into(), "http://192.168.1.*".into(), "http://10.0.0.*:*".into()], &[], true);
        for allowed in ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080", "HTTP://LOCALHOST", "https://ha.example:8123", "http://192.168.1.20", "http://10.0.0.7:8080"] {
            assert!(rules.origin_allowed(allowed), "{allowed}");
        }
        for refused in [
            "http://evil.example", "null", "http://localhost.evil.example", "http://127.0.0.1.evil.example", "https://ha.example:8124", "file://",
            "http://192.168.1.evil.com", "http://192.168.1.5.evil.com", "http://192.168.1.", "http://192.168.1.5%2eevil.com", "http://192.168.1.20:80",
        ] {
            assert!(!rules.origin_allowed(refused), "{refused}");
        }
        assert!(Browsers::new(&["*".into()], &[], true).origin_allowed("http://evil.example"));
    }

    #[test]
    fn loopback_hosts() {
        let rules = Browsers::new(&[], &["phi3d.lan".into()], true);
        for allowed in ["localhost", "localhost:11434", "127.0.0.1:11434", "[::1]:11434", "[::1]", "PHI3D.lan:80", "localhost."] {
            assert!(rules.host_allowed(allowed), "{allowed}");
        }
        for refused in ["rebind.attacker.example", "rebind.attacker.example:11434", "localhost:x", "192.168.1.2", ""] {
            assert!(!rules.host_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn patterns_and_entries() {
        assert!(matches("http://*.example", "http://a.example") && !matches("http://*.example", "http://a.b.example"));
        assert!(!matches("http://*.example", "http://example") && !matches("http://*.example", "http://.example"));
        assert!(matches("a*b*c", "axbyc") && !matches("a*b*c", "abc"));
    }
}

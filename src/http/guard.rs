//! The guard in front of operator routes (`/admin/*`, `/stats`, `/metrics`).
//!
//! With `--admin-token`, a request needs the token. Without it, only loopback clients get in,
//! and since a web page can make a browser on that machine send requests too, three more checks
//! keep pages out: the `Host` must be a loopback name, the listen address or a name given in
//! `--allowed-hosts` (DNS rebinding points a foreign name at 127.0.0.1); an `Origin`, when sent,
//! must be the request's own host; and writes must be `Content-Type: application/json`, which
//! no page can send to another origin without a CORS preflight that semcache never grants.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, ORIGIN};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::{auth, ApiError, AppState};

/// The host names operator routes answer to when no admin token is set.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    listen: IpAddr,
    names: Vec<String>,
}

impl AllowedHosts {
    pub fn new(listen: SocketAddr, names: &[String]) -> Self {
        Self {
            listen: listen.ip(),
            names: names
                .iter()
                .map(|name| name.trim().to_ascii_lowercase())
                .filter(|name| !name.is_empty())
                .collect(),
        }
    }

    /// Whether `authority` (`host` or `host:port`, as in a `Host` header) names this server.
    fn allows(&self, authority: &str) -> bool {
        let host = host_of(authority).to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return ip.is_loopback() || (ip == self.listen && !ip.is_unspecified());
        }
        self.names.iter().any(|name| host_of(name) == host)
    }
}

/// The host of `host[:port]`, `[v6]:port` included.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Lets a request through when it carries the admin token or, with no token configured, when it
/// comes from the loopback interface under a host name of this server. A proxy client's API key
/// never opens these routes. What passes is marked `Cache-Control: no-store`: it holds every
/// tenant's prompts and figures.
pub async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    match &state.admin_token {
        Some(token) => {
            let given = auth::bearer(headers).ok().flatten().unwrap_or_default();
            if !same_secret(given, token.as_bytes()) {
                return Err(ApiError::Unauthorized);
            }
        }
        None if !peer.ip().is_loopback() => return Err(ApiError::Forbidden),
        None => {
            // Browsers always send a Host; a request without one comes from no web page.
            if let Some(host) = authority(&request) {
                if !state.allowed_hosts.allows(host) {
                    return Err(ApiError::CrossSite(format!(
                        "Host {host:?} is not a name of this server; without --admin-token, operator routes answer to loopback names, the listen address and --allowed-hosts only"
                    )));
                }
            }
        }
    }
    same_origin(headers, authority(&request))?;
    let writes = matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH);
    if writes && !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType(
            "Operator routes take `Content-Type: application/json` on POST, PUT and PATCH.",
        ));
    }
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The host the request was sent to: the `Host` header, or the URI's authority (HTTP/2).
fn authority(request: &Request) -> Option<&str> {
    match request.headers().get(HOST) {
        Some(host) => host.to_str().ok(),
        None => request.uri().authority().map(|authority| authority.as_str()),
    }
}

/// A browser names the page that made a request in `Origin`; it must be this server's own.
fn same_origin(headers: &HeaderMap, host: Option<&str>) -> Result<(), ApiError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(ApiError::CrossSite(format!(
            "Origin {origin:?} is not this server: operator routes refuse requests made by other web pages"
        ))),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Compares two secrets in time independent of where they differ: both are hashed first, so
/// the comparison runs over equal-length digests.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let given = Sha256::digest(given);
    let expected = Sha256::digest(expected);
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"admin-token-0123456789", b"admin-token-0123456789"));
        assert!(!same_secret(b"admin-token-0123456788", b"admin-token-0123456789"));
        assert!(!same_secret(b"", b"admin-token-0123456789"));
    }

    #[test]
    fn hosts_of_this_server_only() {
        let hosts = AllowedHosts::new("0.0.0.0:8080".parse().unwrap(), &["Cache.Internal".to_owned()]);
        for good in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:9",
            "[::1]:8080",
            "app.localhost",
            "cache.internal:8080",
        ] {
            assert!(hosts.allows(good), "{good}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "cache.internal.evil",
            "0.0.0.0:8080",
            "",
        ] {
            assert!(!hosts.allows(bad), "{bad}");
        }
    }

    #[test]
    fn origins_must_be_the_host() {
        let with = |origin: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(ORIGIN, HeaderValue::from_str(origin).unwrap());
            headers
        };
        assert!(same_origin(&HeaderMap::new(), Some("127.0.0.1:8080")).is_ok());
        assert!(same_origin(&with("http://127.0.0.1:8080"), Some("127.0.0.1:8080")).is_ok());
        assert!(same_origin(&with("http://evil.example"), Some("127.0.0.1:8080")).is_err());
        assert!(same_origin(&with("null"), Some("127.0.0.1:8080")).is_err());
        assert!(same_origin(&with("http://127.0.0.1:8081"), Some("127.0.0.1:8080")).is_err());
    }
}

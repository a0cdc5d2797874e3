//! The OpenAI-compatible upstream: chat completions and plain forwarding of other calls.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL including the version path, without a trailing slash.
    pub base_url: String,
    /// Replaces the client's Authorization header when set.
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("could not reach the upstream: {0}")]
    Transport(String),
}

impl From<reqwest::Error> for Error {
    fn from(err: reqwest::Error) -> Self {
        if err.is_timeout() {
            Error::Timeout
        } else {
            // The reqwest error names the URL, which holds no secret: keys travel in headers.
            Error::Transport(err.to_string())
        }
    }
}

/// Request headers passed on to the upstream besides Authorization.
const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-stainless-retry-count",
];

/// Response headers passed back to the client.
pub const FORWARDED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "retry-after",
    "x-request-id",
    "openai-processing-ms",
    "openai-organization",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

/// An upstream answer as the rest of semcache sees it: reqwest stays inside this module.
pub struct UpstreamReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as it arrives.
    pub body: BoxStream<'static, Result<Bytes, Error>>,
}

impl UpstreamReply {
    fn from_reqwest(response: reqwest::Response) -> Self {
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes_stream().map_err(Error::from).boxed(),
        }
    }

    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, Error> {
        let mut body = Vec::new();
        let mut stream = self.body;
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(body))
    }
}

pub struct Upstream {
    client: reqwest::Client,
    config: Config,
}

impl Upstream {
    pub fn new(config: Config) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|err| Error::Transport(err.to_string()))?;
        Ok(Self { client, config })
    }

    /// Sends a request to `{base_url}{path_and_query}` and returns the response as soon as its
    /// headers arrive, whatever its status. The body is left to the caller to stream.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamReply, Error> {
        let url = format!("{}{path_and_query}", self.config.base_url);
        let mut headers = HeaderMap::new();
        for name in FORWARDED_REQUEST_HEADERS {
            if let Some(value) = client_headers.get(*name) {
                headers.insert(HeaderName::from_static(name), value.clone());
            }
        }
        match &self.config.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    Error::Transport("the upstream API key is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
            None => {
                if let Some(value) = client_headers.get(AUTHORIZATION) {
                    let mut value = value.clone();
                    value.set_sensitive(true);
                    headers.insert(AUTHORIZATION, value);
                }
            }
        }
        let response = self
            .client
            .request(method, url)
            .headers(headers)
            .body(body)
            .send()
            .await?;
        Ok(UpstreamReply::from_reqwest(response))
    }

    /// Posts a JSON body to `path` (a cached surface's, such as `/chat/completions`).
    pub async fn post_json(
        &self,
        path: &str,
        client_headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamReply, Error> {
        let mut headers = client_headers.clone();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.send(Method::POST, path, &headers, body).await
    }
}

//! The one JSON body extractor: whatever does not parse is refused in OpenAI's error shape,
//! never in axum's plain text.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;
use crate::openai::Invalid;

/// A JSON object body, parsed into `T`. An empty body is `null`, so `JsonBody<Option<T>>`
/// takes one and a plain `JsonBody<T>` refuses it.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|_| ApiError::BodyUnreadable)?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a JSON object (or an empty body, as `null`) into `T`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |message: String| ApiError::InvalidRequest(Invalid { message, param: None });
    let value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice::<Value>(bytes)
            .map_err(|err| invalid(format!("The request body is not valid JSON: {err}")))?
    };
    match value {
        value @ (Value::Object(_) | Value::Null) => serde_json::from_value(value).map_err(|err| {
            if err.to_string().contains("invalid type: null") {
                invalid("The request body must be a JSON object.".to_owned())
            } else {
                invalid(format!("Invalid request body: {err}"))
            }
        }),
        _ => Err(invalid("The request body must be a JSON object.".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        threshold: Option<f32>,
    }

    #[test]
    fn objects_parse_and_the_rest_is_an_openai_error() {
        assert_eq!(
            parse::<Patch>(b"{\"threshold\": 0.9}").unwrap(),
            Patch { threshold: Some(0.9) }
        );
        assert_eq!(parse::<Option<Patch>>(b"  ").unwrap(), None);
        for bad in [&b""[..], b"[1]", b"{threshold", b"{\"other\": 1}", b"3"] {
            let err = parse::<Patch>(bad).unwrap_err();
            assert!(
                matches!(err, ApiError::InvalidRequest(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

//! The one reading of a request's `Authorization` header, for tenants and the admin guard alike.

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;

use super::ApiError;
use crate::cache::TenantId;
use crate::config::Scope;

/// The bearer key a request carries: `None` without an `Authorization` header.
///
/// A key is whatever bytes follow `Bearer ` (the scheme in any case), UTF-8 or not: it is only
/// ever hashed or compared, never read as text. A header that cannot hold a key (another
/// scheme, no key, a key with white space or control bytes inside, several `Authorization`
/// headers) is refused with 401 rather than treated as no key, so that no malformed header can
/// land in another client's partition.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&[u8]>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadApiKey("Send one Authorization header, not several."));
    }
    let value = value.as_bytes().trim_ascii();
    let (scheme, key) = value
        .iter()
        .position(|byte| *byte == b' ')
        .map_or((value, &b""[..]), |space| {
            (&value[..space], value[space..].trim_ascii())
        });
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(ApiError::BadApiKey(
            "The Authorization header must be `Bearer <API key>`.",
        ));
    }
    if key.is_empty() {
        return Err(ApiError::BadApiKey(
            "The Authorization header has no API key after `Bearer`.",
        ));
    }
    if key
        .iter()
        .any(|byte| byte.is_ascii_whitespace() || byte.is_ascii_control())
    {
        return Err(ApiError::BadApiKey(
            "The API key in the Authorization header holds white space or control characters.",
        ));
    }
    Ok(Some(key))
}

/// The tenant a request belongs to: its bearer key, hashed; clients without a key share the
/// anonymous partition, and under `--scope shared` everyone shares one.
pub fn tenant_of(scope: Scope, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    // Checked in either scope: a malformed header is an error whatever the scope.
    let key = bearer(headers)?;
    Ok(match scope {
        Scope::Shared => TenantId::shared(),
        Scope::Tenant => key.map_or_else(TenantId::anonymous, TenantId::from_api_key),
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    #[test]
    fn keys_are_the_bytes_after_the_scheme() {
        assert_eq!(bearer(&with(&[])).unwrap(), None);
        assert_eq!(bearer(&with(&[b"Bearer sk-1"])).unwrap(), Some(&b"sk-1"[..]));
        assert_eq!(bearer(&with(&[b"bearer   sk-1 "])).unwrap(), Some(&b"sk-1"[..]));
        let utf8 = "Bearer sk-tenant1-\u{fc}-secret".as_bytes();
        assert_eq!(bearer(&with(&[utf8])).unwrap(), Some(&utf8[7..]));
        assert_eq!(
            bearer(&with(&[b"Bearer sk-\xff"])).unwrap(),
            Some(&b"sk-\xff"[..])
        );
    }

    #[test]
    fn headers_that_hold_no_key_are_refused() {
        for bad in [
            &b"Bearer"[..],
            b"Bearer   ",
            b"Basic dXNlcjpwYXNz",
            b"sk-no-scheme",
            b"Bearer a b",
        ] {
            assert!(
                bearer(&with(&[bad])).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(bearer(&with(&[b"Bearer sk-1", b"Bearer sk-2"])).is_err());
    }

    #[test]
    fn every_key_has_its_own_tenant() {
        let tenant = |value: &[u8]| tenant_of(Scope::Tenant, &with(&[value])).unwrap();
        let tenants = [
            tenant("Bearer sk-tenant1-\u{fc}-secret".as_bytes()),
            tenant("Bearer sk-tenant2-\u{f6}-other".as_bytes()),
            tenant(b"Bearer sk-\xff"),
            tenant_of(Scope::Tenant, &with(&[])).unwrap(),
            TenantId::shared(),
        ];
        for (i, a) in tenants.iter().enumerate() {
            for b in &tenants[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            tenant_of(Scope::Shared, &with(&[b"Bearer sk-1"])).unwrap(),
            TenantId::shared()
        );
        assert!(tenant_of(Scope::Shared, &with(&[b"Bearer"])).is_err());
    }
}

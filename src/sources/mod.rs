//! Sources: verify a request's raw bytes, then decode its body into an [`Event`].
//!
//! Each source kind is one file behind the [`Source`] trait. The server calls `verify` before
//! anything parses the body, and `decode` after; `check` and `simulate` call only `decode`, so
//! a rule test exercises the same decoder as production.

pub mod coder;
pub mod port;
#[cfg(feature = "kafka")]
pub mod port_kafka;
pub mod schedule;
pub mod slack;

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::event::Event;

/// A request as a source sees it: its headers, the raw body, and the last path segment after
/// `/hooks/<source>/` when there is one (Coder's URL token).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub headers: Headers<'a>,
    pub body: &'a [u8],
    pub path_token: Option<String>,
    /// The bytes the signature was made over, when they differ from `body` (what
    /// [`Source::verify`] returned). Deduplication hashes these: the raw bytes can be changed
    /// without breaking such a signature (whitespace, for Port's minified form), so hashing
    /// them would let one captured request be replayed as new.
    pub signed: Option<Vec<u8>>,
}

impl Request<'_> {
    /// The bytes that verified: [`Request::signed`] when set, else the body as sent.
    pub fn signed_body(&self) -> &[u8] {
        self.signed.as_deref().unwrap_or(self.body)
    }

    /// A header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}

/// A request's headers: borrowed from the HTTP request as they arrived (the server, which
/// never copies them), or a map with lower-cased
/// names (`check`, `simulate` and tests, which read them from files).
#[derive(Debug, Clone)]
pub enum Headers<'a> {
    Http(&'a axum::http::HeaderMap),
    Map(BTreeMap<String, String>),
}

impl Default for Headers<'_> {
    fn default() -> Self {
        Headers::Map(BTreeMap::new())
    }
}

impl From<BTreeMap<String, String>> for Headers<'_> {
    /// The names must be lower case.
    fn from(m: BTreeMap<String, String>) -> Self {
        Headers::Map(m)
    }
}

impl Headers<'_> {
    /// The first value of a header by (case-insensitive) name; `None` when absent or not
    /// visible ASCII.
    pub fn get(&self, name: &str) -> Option<&str> {
        match self {
            // `HeaderMap` lower-cases the name it is asked for.
            Headers::Http(h) => h.get(name).and_then(|v| v.to_str().ok()),
            Headers::Map(m) => m.get(&name.to_ascii_lowercase()).map(String::as_str),
        }
    }
}

/// Why a request was refused. Each maps to one HTTP status; the text is safe to return to the
/// caller (it never contains a secret or the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 401: bad, missing or expired signature or token.
    Unauthorized(String),
    /// 400: not JSON, or (Coder) a required field missing.
    BadRequest(String),
    /// 415: wrong content type.
    UnsupportedMediaType(String),
    /// 422: JSON of a shape this source does not know.
    Unprocessable(String),
}

impl Rejection {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Unauthorized(_) => 401,
            Rejection::BadRequest(_) => 400,
            Rejection::UnsupportedMediaType(_) => 415,
            Rejection::Unprocessable(_) => 422,
        }
    }
    /// The reason.
    pub fn reason(&self) -> &str {
        match self {
            Rejection::Unauthorized(r)
            | Rejection::BadRequest(r)
            | Rejection::UnsupportedMediaType(r)
            | Rejection::Unprocessable(r) => r,
        }
    }
}

/// What decoding produced.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// An event to route.
    Event(Box<Event>),
    /// A request to acknowledge without routing (Slack's `ssl_check`).
    Ack,
}

/// A source kind.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// `port`, `coder`, `slack`: the prefix of the event types it produces.
    fn kind(&self) -> &'static str;
    /// Content types accepted (the part before `;`), checked before `verify`.
    fn content_types(&self) -> &'static [&'static str] {
        &["application/json"]
    }
    /// Checks the signature or token over the raw request, at time `now` (unix seconds). On
    /// success, the bytes the signature covers when they are not the body as sent (see
    /// [`Request::signed`]); `None` when they are.
    fn verify(&self, req: &Request, now: i64) -> Result<Option<Vec<u8>>, Rejection>;
    /// Whether the source takes a token as the last path segment (`/hooks/<name>/<token>`).
    /// For the others such a request is refused (404) instead of the segment being ignored.
    fn takes_path_token(&self) -> bool {
        false
    }
    /// Decodes a verified body. `name` is the configured source name.
    fn decode(&self, name: &str, req: &Request) -> Result<Decoded, Rejection>;
}

/// HMAC-SHA256 of the concatenated parts.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two secrets of any length (compares their SHA-256 digests, so the
/// time taken does not depend on where they differ or on their lengths).
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.ct_eq(&y).into()
}

/// Checks a timestamp (unix seconds, or milliseconds when above 10^11) against `now`.
pub(crate) fn fresh(ts_text: &str, now: i64, tolerance: i64) -> Result<(), Rejection> {
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| Rejection::Unauthorized("timestamp header is not an integer".into()))?;
    let secs = if ts > 100_000_000_000 { ts / 1000 } else { ts };
    // In i128: no timestamp a caller can send overflows the difference (i64::MIN would).
    let skew = i128::from(now) - i128::from(secs);
    if skew.abs() > i128::from(tolerance) {
        return Err(Rejection::Unauthorized(format!(
            "timestamp is {skew}s from now, outside the {tolerance}s tolerance (replay, or a skewed clock)"
        )));
    }
    Ok(())
}

/// Parses a JSON body, or says why it is not JSON.
pub(crate) fn parse_json(body: &[u8]) -> Result<serde_json::Value, Rejection> {
    serde_json::from_slice(body)
        .map_err(|e| Rejection::BadRequest(format!("body is not valid JSON: {e}")))
}

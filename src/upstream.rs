//! What an upstream answered, and whether to try again.
//!
//! Every destination and the Port API client read answers and classify failures the same way,
//! after Alertmanager's rule: only what can succeed later is retried (timeouts, connection
//! errors, 408, 429, 5xx), everything else is permanent with the upstream's reason. Answers are
//! read up to a limit (the rest is not read), `Retry-After` is honoured but capped, and no
//! reason quotes a URL (webhook URLs are secrets).

use std::time::Duration;

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryError {
    /// Will not succeed by retrying (bad payload, channel gone, bad token).
    Permanent(String),
    /// May succeed later; `retry_after` is the upstream's request, if any.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl DeliveryError {
    /// The reason text.
    pub fn reason(&self) -> &str {
        match self {
            DeliveryError::Permanent(r) | DeliveryError::Transient { reason: r, .. } => r,
        }
    }
}

/// An HTTP answer, read whole: status, headers, body text.
pub struct Answer {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    /// The body was longer than the limit it was read with; `body` holds its start.
    pub truncated: bool,
}

/// How much of an answer is read from Slack or a webhook: their answers are a few bytes
/// (`ok`, a small JSON object); anything longer is not an answer we can use.
pub const ANSWER_LIMIT: usize = 64 * 1024;

/// Reads a response, keeping at most `limit` bytes of its body (the rest is not read: the
/// connection is dropped). The request's timeout bounds the read. A body that cannot be read
/// whole (it broke off, or never ended before the timeout) is a transient failure, never an
/// empty success: a `200` whose body we did not see is not known to be delivered.
pub async fn read_answer(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Answer, DeliveryError> {
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let mut body: Vec<u8> = Vec::new();
    let mut truncated = false;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(body.len());
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(DeliveryError::Transient {
                    reason: format!(
                        "HTTP {}, but reading the answer failed: {}",
                        status.as_u16(),
                        transport_reason(&e)
                    ),
                    retry_after: None,
                });
            }
        }
    }
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        truncated,
    })
}

/// The longest wait a `Retry-After` may ask for; longer requests are capped to it.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// Parses a `Retry-After` header: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). Anything
/// else (NaN, infinity, garbage) is ignored; negative delays and dates in the past mean "now";
/// long ones are capped at an hour.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(v, std::time::SystemTime::now())
}

/// [`retry_after`] on the header's text, at `now`.
pub fn parse_retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(Duration::from_secs(n).min(RETRY_AFTER_MAX));
    }
    // Not the standard's form, but seen in the field ("1.5", "-1").
    if let Ok(f) = v.parse::<f64>() {
        if !f.is_finite() {
            return None;
        }
        return Some(Duration::from_secs_f64(
            f.clamp(0.0, RETRY_AFTER_MAX.as_secs_f64()),
        ));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(RETRY_AFTER_MAX),
    )
}

/// Classifies an HTTP answer by status (then body): 2xx ok, 429/5xx transient, else permanent.
pub fn classify_status(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Result<(), DeliveryError> {
    let body = crate::render::blockkit::truncate_chars(body.trim(), 300);
    if status.is_success() {
        return Ok(());
    }
    let reason = if body.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {body}", status.as_u16())
    };
    if status.as_u16() == 429 {
        return Err(DeliveryError::Transient {
            reason,
            retry_after: Some(retry_after(headers).unwrap_or(Duration::from_secs(1))),
        });
    }
    if status.is_redirection() {
        // The `Location` is left out: it can be as secret as the URL that answered.
        return Err(DeliveryError::Permanent(format!(
            "HTTP {}: the destination answered with a redirect, which switchyard does not follow \
             (a POST would arrive as a GET without the message); configure the URL it redirects to",
            status.as_u16()
        )));
    }
    if status.is_server_error() || status.as_u16() == 408 {
        return Err(DeliveryError::Transient {
            reason,
            retry_after: retry_after(headers),
        });
    }
    Err(DeliveryError::Permanent(reason))
}

/// Classifies a transport error (timeouts and connection failures are transient). The URL is
/// left out of the text: webhook URLs are secrets.
pub fn classify_transport(e: &reqwest::Error) -> DeliveryError {
    DeliveryError::Transient {
        reason: transport_reason(e),
        retry_after: None,
    }
}

/// What went wrong with a request, without its URL.
pub(crate) fn transport_reason(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let detail = detail.split(" for url").next().unwrap_or("").to_string();
    if detail.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {detail}")
    }
}

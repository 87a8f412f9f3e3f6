//! Destinations: where a rendered message goes. One file per kind behind [`Destination`].
//!
//! A destination makes one attempt and classifies the result; retrying, pacing and dead
//! letters are the delivery stage's job ([`crate::deliver`]). The classification follows
//! Alertmanager's rule: only what can succeed later is retried (timeouts, connection errors,
//! 429, 5xx); everything else is permanent and goes to dead letters at once with the upstream's
//! reason.

pub mod port;
mod slack;
mod slack_webhook;
mod stdout;
mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{DestinationConfig, DestinationKind};
use crate::outbox::{Job, NewJob};
use crate::render::Templates;

pub use port::report_run_id;
pub use slack::SlackBot;

/// A boxed future (destinations are trait objects).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// A destination kind.
pub trait Destination: Send + Sync {
    /// Makes one delivery attempt. On success it may return follow-up jobs (a Port expansion
    /// returns the messages it rendered); they are committed with this job's completion.
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>>;
    /// A key for per-target pacing (Slack paces per channel); `None` paces the destination only.
    fn pace_key(&self, _job: &Job) -> Option<String> {
        None
    }
}

/// A destination's URL (a secret) with its parse, done once when the destination is built, not
/// per message. When it does not parse, requests are built from the text and fail the way they
/// always did.
pub(super) struct Endpoint {
    url: crate::config::secret::Secret,
    parsed: Option<reqwest::Url>,
}

impl Endpoint {
    fn new(url: &crate::config::secret::Secret) -> Endpoint {
        Endpoint {
            parsed: reqwest::Url::parse(url.expose()).ok(),
            url: url.clone(),
        }
    }

    /// A request with a JSON body to come, with the destination's timeout.
    pub(super) fn json_request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let req = match &self.parsed {
            Some(u) => client.request(method, u.clone()),
            None => client.request(method, self.url.expose()),
        };
        req.timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
    }
}

/// Builds the destination for a configuration.
pub fn build(
    cfg: &DestinationConfig,
    client: &reqwest::Client,
    templates: Arc<TemplatesHandle>,
) -> Arc<dyn Destination> {
    match &cfg.kind {
        DestinationKind::Stdout => Arc::new(stdout::Stdout {
            name: cfg.name.clone(),
        }),
        DestinationKind::SlackWebhook { url } => Arc::new(slack_webhook::SlackWebhook {
            endpoint: Endpoint::new(url),
            client: client.clone(),
            timeout: cfg.timeout,
        }),
        DestinationKind::Webhook {
            url,
            method,
            headers,
            ..
        } => Arc::new(webhook::Webhook {
            endpoint: Endpoint::new(url),
            method: method.clone(),
            headers: headers.clone(),
            client: client.clone(),
            timeout: cfg.timeout,
            templates,
        }),
        DestinationKind::Slack { token, api_url } => Arc::new(SlackBot::new(
            token.clone(),
            api_url.clone(),
            client.clone(),
            cfg.timeout,
        )),
        DestinationKind::Port {
            client_id,
            client_secret,
            base_url,
        } => Arc::new(port::PortApi::new(
            client_id.clone(),
            client_secret.clone(),
            base_url,
            cfg.timeout,
            client,
            templates,
        )),
        #[cfg(feature = "kafka")]
        DestinationKind::Kafka { conn, topic, .. } => {
            Arc::new(crate::kafka::KafkaDest::new(conn, topic, cfg.timeout))
        }
        #[cfg(not(feature = "kafka"))]
        DestinationKind::Kafka { .. } => Arc::new(Unavailable(
            "this build has no Kafka support (cargo feature `kafka`)",
        )),
    }
}

/// A destination this build cannot deliver to; its messages become dead letters with the reason.
#[cfg(not(feature = "kafka"))]
struct Unavailable(&'static str);

#[cfg(not(feature = "kafka"))]
impl Destination for Unavailable {
    fn deliver<'a>(&'a self, _job: &'a Job) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>> {
        Box::pin(async move { Err(DeliveryError::Permanent(self.0.to_string())) })
    }
}

/// The templates of the ruleset a destination was built from (for webhook header templates).
pub struct TemplatesHandle(pub Arc<crate::routing::Ruleset>);

impl TemplatesHandle {
    /// The templates.
    pub fn templates(&self) -> &Templates {
        &self.0.templates
    }
}

/// An HTTP answer, read whole: status, headers, body text.
pub struct Answer {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

/// Reads a response whole (a body that cannot be read counts as empty).
pub async fn read_answer(resp: reqwest::Response) -> Answer {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

/// Parses a `Retry-After` header (seconds; HTTP dates are rare from Slack and treated as 1 s).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    Some(Duration::from_secs_f64(
        v.trim().parse::<f64>().unwrap_or(1.0).clamp(0.0, 3600.0),
    ))
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
    DeliveryError::Transient {
        reason: if detail.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {detail}")
        },
        retry_after: None,
    }
}

/// The message as it is sent: limits enforced (texts cut with an ellipsis), `thread_ts` added.
/// Borrowed (no copy) when there is nothing to change, which is nearly always.
pub fn prepare_message(job: &Job) -> std::borrow::Cow<'_, serde_json::Value> {
    use crate::render::blockkit;
    if job.target.thread_ts.is_none() && blockkit::fits(&job.message) {
        return std::borrow::Cow::Borrowed(&job.message);
    }
    let mut m = job.message.clone();
    blockkit::enforce(&mut m);
    if let (Some(ts), Some(obj)) = (&job.target.thread_ts, m.as_object_mut()) {
        obj.insert("thread_ts".into(), serde_json::Value::String(ts.clone()));
        if job.target.reply_broadcast {
            obj.insert("reply_broadcast".into(), serde_json::Value::Bool(true));
        }
    }
    std::borrow::Cow::Owned(m)
}

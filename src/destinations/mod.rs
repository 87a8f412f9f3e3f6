//! Destinations: where a rendered message goes. One file per kind behind [`Destination`].
//!
//! A destination makes one attempt and classifies the result; retrying, pacing and dead
//! letters are the delivery stage's job ([`crate::deliver`]). The classification follows
//! Alertmanager's rule: only what can succeed later is retried (timeouts, connection errors,
//! 429, 5xx); everything else is permanent and goes to dead letters at once with the upstream's
//! reason.

#[cfg(feature = "kafka")]
mod kafka;
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
use crate::outbox::{Job, KeyEffect, KeyState, NewJob};
use crate::routing::Router;

pub use slack::SlackBot;

pub use crate::upstream::{
    classify_status, classify_transport, parse_retry_after, read_answer, retry_after, Answer,
    DeliveryError, ANSWER_LIMIT,
};

/// A boxed future (destinations are trait objects).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A destination kind.
pub trait Destination: Send + Sync {
    /// Makes one delivery attempt. On success it may return follow-up jobs (a Port expansion
    /// returns the messages it rendered); they are committed with this job's completion.
    ///
    /// `rules` is the router in force at the attempt: what a destination renders with
    /// (webhook header templates, a Port expansion's sends), so a reload reaches destinations
    /// without rebuilding them.
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>>;
    /// Delivers a keyed message ([`crate::job::Identity`]): `current` is the message its key
    /// names now, if any. Returns what became of the key's message (`None`: unchanged). Only a
    /// destination that can edit and thread its messages implements it (the Slack bot);
    /// routing gives a key to no other kind.
    fn deliver_keyed<'a>(
        &'a self,
        _job: &'a Job,
        _current: Option<&'a KeyState>,
    ) -> BoxFut<'a, Result<Option<KeyEffect>, DeliveryError>> {
        Box::pin(async {
            Err(DeliveryError::Permanent(
                "this destination cannot update or thread messages; a keyed send needs a `slack` bot destination".into(),
            ))
        })
    }
    /// The user id of the person with `email`, for destinations that know people (the Slack
    /// bot: `users.lookupByEmail`, cached); `Err` says why not.
    fn user_id_of<'a>(&'a self, _email: &'a str) -> BoxFut<'a, Result<String, String>> {
        Box::pin(async { Err("this destination does not look people up".to_string()) })
    }
    /// The email of the user with this id, for destinations that know people (the Slack bot:
    /// `users.info`, cached).
    fn email_of<'a>(&'a self, _user: &'a str) -> BoxFut<'a, Result<String, DeliveryError>> {
        Box::pin(async {
            Err(DeliveryError::Permanent(
                "this destination does not look people up".to_string(),
            ))
        })
    }
    /// True when this destination sends `job`'s stored text ([`Job::body`]) as it is and
    /// never reads its message as a tree. Asked once, when the job is submitted and its tree is
    /// still there; such a job then waits and goes out without the tree ([`Job::as_stored`]):
    /// a backlog holds bytes, and nothing is parsed twice.
    fn sends_stored(&self, _job: &Job) -> bool {
        false
    }
    /// True when the destination's rate limit holds per target ([`Destination::pace_key`])
    /// rather than for the destination as a whole (the Slack Web API: 1 message/s per channel).
    fn paced_per_target(&self) -> bool {
        false
    }
    /// The target a job is paced under, for destinations [paced per target]; `None` paces it
    /// with the destination.
    ///
    /// [paced per target]: Destination::paced_per_target
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
pub fn build(cfg: &DestinationConfig, client: &reqwest::Client) -> Arc<dyn Destination> {
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
            // Validated when the rules load; anything else would have been refused there.
            method: reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::POST),
            headers: headers.clone(),
            client: client.clone(),
            timeout: cfg.timeout,
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
        } => Arc::new(port::Port::new(crate::port_api::PortApi::new(
            client_id.clone(),
            client_secret.clone(),
            base_url,
            cfg.timeout,
            client,
        ))),
        #[cfg(feature = "kafka")]
        DestinationKind::Kafka { conn, topic, .. } => {
            Arc::new(kafka::KafkaDest::new(conn, topic, cfg.timeout))
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
    fn deliver<'a>(
        &'a self,
        _job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>> {
        Box::pin(async move { Err(DeliveryError::Permanent(self.0.to_string())) })
    }
}

/// The message a job carries. A Port operation routed to a destination that takes messages
/// (only possible through a hand-edited outbox) is a permanent failure, not a guess.
pub fn message_of(job: &Job) -> Result<&serde_json::Value, DeliveryError> {
    job.message().ok_or_else(|| {
        DeliveryError::Permanent(format!(
            "a `{}` job is a Port operation; only a `port` destination carries it out",
            job.payload.kind()
        ))
    })
}

/// The message as it is sent: limits enforced (texts cut with an ellipsis), `thread_ts` added.
/// Borrowed (no copy) when there is nothing to change, which is nearly always.
pub fn prepare_message(
    job: &Job,
) -> Result<std::borrow::Cow<'_, serde_json::Value>, DeliveryError> {
    use crate::render::blockkit;
    let message = message_of(job)?;
    if job.target.thread_ts.is_none() && blockkit::fits(message) {
        return Ok(std::borrow::Cow::Borrowed(message));
    }
    let mut m = message.clone();
    blockkit::enforce(&mut m);
    if let (Some(ts), Some(obj)) = (&job.target.thread_ts, m.as_object_mut()) {
        obj.insert("thread_ts".into(), serde_json::Value::String(ts.clone()));
        if job.target.reply_broadcast {
            obj.insert("reply_broadcast".into(), serde_json::Value::Bool(true));
        }
    }
    Ok(std::borrow::Cow::Owned(m))
}

#[cfg(test)]
mod tests {
    use super::parse_retry_after;
    use std::time::{Duration, SystemTime};

    #[test]
    fn retry_after_takes_seconds_and_dates_and_ignores_the_rest() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 GMT
        let s = |v: &str| parse_retry_after(v, now);
        assert_eq!(s("120"), Some(Duration::from_secs(120)));
        assert_eq!(s(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(s("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(s("-5"), Some(Duration::ZERO));
        assert_eq!(s("99999999999999999999"), Some(Duration::from_secs(3600)));
        assert_eq!(s("1e999"), None, "infinity");
        assert_eq!(s("NaN"), None);
        assert_eq!(s("inf"), None);
        assert_eq!(s("soon"), None);
        assert_eq!(s(""), None);
        // The three HTTP-date forms of RFC 9110.
        assert_eq!(
            s("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            s("Wednesday, 21-Oct-15 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(s("Wed Oct 21 07:28:10 2015"), Some(Duration::from_secs(10)));
        assert_eq!(
            s("Tue, 20 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(
            s("Fri, 21 Oct 2016 07:28:00 GMT"),
            Some(Duration::from_secs(3600)),
            "capped"
        );
    }

    #[test]
    fn a_webhook_answer_is_ok_only_when_slack_says_so() {
        use super::slack_webhook::webhook_answer;
        use super::DeliveryError;
        assert!(webhook_answer("ok", false).is_ok());
        assert!(webhook_answer("", false).is_ok());
        assert!(webhook_answer(r#"{"ok":true}"#, false).is_ok());
        assert!(matches!(
            webhook_answer("ok", true),
            Err(DeliveryError::Transient { .. })
        ));
        assert!(matches!(
            webhook_answer("<html>proxy</html>", false),
            Err(DeliveryError::Transient { .. })
        ));
        assert!(matches!(
            webhook_answer(r#"{"ok":false,"error":"invalid_blocks"}"#, false),
            Err(DeliveryError::Permanent(r)) if r.contains("invalid_blocks")
        ));
        assert!(matches!(
            webhook_answer("channel_not_found", false),
            Err(DeliveryError::Permanent(_))
        ));
    }
}

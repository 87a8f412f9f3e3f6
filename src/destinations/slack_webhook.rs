//! `slack_webhook`: a Slack incoming webhook (protocols.md §4.1). Success is 200 with `ok`;
//! failures are classified by status, then body (`invalid_blocks`, `channel_not_found`, ...).
//! A 2xx counts as delivered only when its body is Slack's `ok`: a proxy's HTML page or a
//! Web-API-style `{"ok":false,…}` behind a 200 means Slack did not take the message.

use std::borrow::Cow;
use std::time::Duration;

use super::{
    classify_status, classify_transport, prepare_message, BoxFut, DeliveryError, Destination,
    Endpoint,
};
use crate::outbox::Job;
use crate::routing::Router;

pub(super) struct SlackWebhook {
    pub endpoint: Endpoint,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

impl Destination for SlackWebhook {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            let req = self
                .endpoint
                .json_request(&self.client, reqwest::Method::POST, self.timeout);
            if job.as_stored {
                return self.post(req.body(job.body())).await;
            }
            let req = match prepare_message(job)? {
                // Unchanged: the text written when the job was stored, not a new serialisation.
                Cow::Borrowed(_) => req.body(job.body()),
                Cow::Owned(m) => req.body(m.to_string()),
            };
            self.post(req).await
        })
    }

    /// A message without a thread that fits Slack's limits goes out as its stored text.
    fn sends_stored(&self, job: &Job) -> bool {
        job.target.thread_ts.is_none()
            && job.target.identity.is_none()
            && job.message().is_some_and(crate::render::blockkit::fits)
    }
}

impl SlackWebhook {
    /// Sends one prepared request and classifies Slack's answer.
    async fn post(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Vec<crate::outbox::NewJob>, DeliveryError> {
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let a = super::read_answer(resp, super::ANSWER_LIMIT).await?;
        classify_status(a.status, &a.headers, &a.body)?;
        webhook_answer(&a.body, a.truncated).map(|()| Vec::new())
    }
}

/// Classifies the body of a 2xx answer from an incoming webhook. Slack answers `ok`; an error
/// code Slack uses (also inside `{"ok":false,"error":…}`) is classified as the Web API's; any
/// other body (an HTML page from a proxy or captive portal, a cut-off answer) is transient,
/// with an excerpt, so the message is retried until `max_age` and never silently counted.
pub(super) fn webhook_answer(body: &str, truncated: bool) -> Result<(), DeliveryError> {
    let text = body.trim();
    if !truncated && (text == "ok" || text.is_empty() && body.is_empty()) {
        // An empty 200 is what some Slack-compatible receivers (Mattermost, test doubles) send.
        return Ok(());
    }
    let code = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| match v.get("ok") {
            Some(serde_json::Value::Bool(true)) => Some(String::new()),
            _ => v["error"].as_str().map(str::to_string),
        })
        .unwrap_or_else(|| text.to_string());
    if code.is_empty() {
        return Ok(());
    }
    if super::slack::PERMANENT.contains(&code.as_str()) || code.starts_with("restricted_action") {
        return Err(DeliveryError::Permanent(format!(
            "HTTP 200 with Slack's error `{code}`"
        )));
    }
    Err(DeliveryError::Transient {
        reason: format!(
            "HTTP 200 but not Slack's `ok`: {}",
            crate::render::blockkit::truncate_chars(text, 200)
        ),
        retry_after: None,
    })
}

#[cfg(test)]
mod stored_tests {
    use super::*;
    use crate::job::{NewJob, Payload, Target};
    use serde_json::json;

    fn job(message: serde_json::Value, thread_ts: Option<&str>) -> Job {
        NewJob {
            destination: "d".into(),
            rule: "r".into(),
            event_id: "e".into(),
            target: Target {
                thread_ts: thread_ts.map(str::to_string),
                ..Target::default()
            },
            payload: Payload::Message(message.clone()),
            secret: false,
            throttle: None,
            error: None,
        }
        .stored(1, message.to_string(), 0)
    }

    /// Only a message that goes out exactly as stored skips its tree: one that needs cutting to
    /// Slack's limits, or a thread reply (which gains `thread_ts`), keeps it.
    #[test]
    fn sent_as_stored_only_when_nothing_changes_on_the_way() {
        let dest = SlackWebhook {
            endpoint: Endpoint::new(&crate::config::secret::Secret::new(
                "http://127.0.0.1:9/hook",
            )),
            client: reqwest::Client::new(),
            timeout: Duration::from_secs(1),
        };
        let fits = json!({"text": "hi", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*x*"}}]});
        assert!(dest.sends_stored(&job(fits.clone(), None)));
        assert!(!dest.sends_stored(&job(fits, Some("1700000000.000100"))));
        let long = json!({"text": "hi", "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "H".repeat(200)}}]});
        assert!(!dest.sends_stored(&job(long, None)));
    }
}

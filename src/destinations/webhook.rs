//! `webhook`: any HTTP endpoint. The body is the rendered message (or the destination's own
//! template, rendered at routing time); header values are templates rendered per delivery over
//! `{rule, event_id, destination, message}`. Same classification by status as Slack.

use std::time::Duration;

use handlebars::Context;
use serde_json::json;

use super::{classify_status, classify_transport, BoxFut, DeliveryError, Destination, Endpoint};
use crate::outbox::Job;
use crate::routing::Router;

pub(super) struct Webhook {
    pub endpoint: Endpoint,
    pub method: reqwest::Method,
    pub headers: Vec<(String, String)>,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

impl Destination for Webhook {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            super::message_of(job)?;
            let mut req = self
                .endpoint
                .json_request(&self.client, self.method.clone(), self.timeout)
                .body(job.body());
            if !self.headers.is_empty() {
                let ctx = Context::from(
                    json!({"rule": job.rule, "event_id": job.event_id, "message": super::message_of(job)?}),
                );
                for (name, tpl) in &self.headers {
                    let value = rules.templates.render_plain(tpl, &ctx).map_err(|e| {
                        DeliveryError::Permanent(format!("header `{name}`: {}", e.message))
                    })?;
                    req = req.header(name.as_str(), value.trim());
                }
            }
            let resp = req.send().await.map_err(|e| classify_transport(&e))?;
            let a = super::read_answer(resp, super::ANSWER_LIMIT).await?;
            classify_status(a.status, &a.headers, &a.body).map(|()| Vec::new())
        })
    }

    /// The body is the stored text; only header templates read the message.
    fn sends_stored(&self, job: &Job) -> bool {
        self.headers.is_empty() && job.message().is_some()
    }
}

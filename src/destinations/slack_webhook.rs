//! `slack_webhook`: a Slack incoming webhook (protocols.md §4.1). Success is 200 with `ok`;
//! failures are classified by status, then body (`invalid_blocks`, `channel_not_found`, ...).

use std::borrow::Cow;
use std::time::Duration;

use super::{
    classify_status, classify_transport, prepare_message, BoxFut, DeliveryError, Destination,
};
use crate::config::secret::Secret;
use crate::outbox::Job;

pub(super) struct SlackWebhook {
    pub url: Secret,
    pub parsed: Option<reqwest::Url>,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

impl Destination for SlackWebhook {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            let req = match &self.parsed {
                Some(u) => self.client.post(u.clone()),
                None => self.client.post(self.url.expose()),
            };
            let req = req
                .timeout(self.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            let req = match prepare_message(job) {
                // Unchanged: the text written when the job was stored, not a new serialisation.
                Cow::Borrowed(_) => req.body(job.body()),
                Cow::Owned(m) => req.body(m.to_string()),
            };
            let resp = req.send().await.map_err(|e| classify_transport(&e))?;
            let a = super::read_answer(resp).await;
            classify_status(a.status, &a.headers, &a.body).map(|()| Vec::new())
        })
    }
}

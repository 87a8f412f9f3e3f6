//! `slack_webhook`: a Slack incoming webhook (protocols.md §4.1). Success is 200 with `ok`;
//! failures are classified by status, then body (`invalid_blocks`, `channel_not_found`, ...).

use std::borrow::Cow;
use std::time::Duration;

use super::{
    classify_status, classify_transport, prepare_message, BoxFut, DeliveryError, Destination,
    Endpoint,
};
use crate::outbox::Job;

pub(super) struct SlackWebhook {
    pub endpoint: Endpoint,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

impl Destination for SlackWebhook {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            let req = self
                .endpoint
                .json_request(&self.client, reqwest::Method::POST, self.timeout);
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

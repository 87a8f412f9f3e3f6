//! `stdout`: one JSON line per message. The quick-start destination: no credentials needed.

use std::io::Write;

use serde_json::json;

use super::{BoxFut, DeliveryError, Destination};
use crate::outbox::Job;
use crate::routing::Router;

pub(super) struct Stdout {
    pub name: String,
}

impl Destination for Stdout {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<crate::outbox::NewJob>, DeliveryError>> {
        Box::pin(async move {
            let line = json!({
                "destination": self.name,
                "rule": job.rule,
                "event_id": job.event_id,
                "target": job.target,
                "message": if job.secret { json!("[secret]") } else { job.payload.to_json() },
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").map_err(|e| DeliveryError::Transient {
                reason: format!("writing to stdout failed: {e}"),
                retry_after: None,
            })?;
            out.flush().map_err(|e| DeliveryError::Transient {
                reason: format!("flushing stdout failed: {e}"),
                retry_after: None,
            })?;
            Ok(Vec::new())
        })
    }
}

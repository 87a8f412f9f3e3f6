//! `port`: Port's REST API (protocols.md §2). It reports action runs (PATCH status, post log
//! lines) and answers rules' `with:` queries (entity search, following `next` page by page).
//! The API client and its token cache are [`crate::port_api`].
//!
//! Jobs for this destination are operations, not messages: `{"op": "expand", ...}` runs a
//! rule's queries, renders its messages and returns them as follow-up jobs (committed with this
//! job's completion), posting a progress log line on the run; `{"op": "report", ...}` writes
//! the final run status and a log line.

use serde_json::{json, Map, Value};

use super::{BoxFut, DeliveryError, Destination};
use crate::event::Event;
use crate::job::{Expand, Job, NewJob, Payload, RunReport};
use crate::port_api::PortApi;
use crate::routing::{DispatchError, Router};

/// The `port` destination: its operations on Port's API.
pub struct Port {
    api: PortApi,
}

impl Port {
    /// A destination over `api`.
    pub fn new(api: PortApi) -> Port {
        Port { api }
    }

    async fn expand(
        &self,
        job: &Job,
        op: &Expand,
        rs: &Router,
    ) -> Result<Vec<NewJob>, DeliveryError> {
        let rule_id = op.rule.as_str();
        let data = op.event.clone();
        let rule = rs.rules.iter().find(|r| r.id == rule_id).ok_or_else(|| {
            DeliveryError::Permanent(format!("rule `{rule_id}` is no longer in the rules"))
        })?;
        let ctx = handlebars::Context::from(data.clone());
        let mut results = Map::new();
        for q in &rule.queries {
            let templates = &rs.templates;
            let rules: Vec<Value> = q
                .rules
                .iter()
                .map(|r| render_strings(r, &|s| templates.render_inline(s, &ctx)))
                .collect::<Result<_, _>>()
                .map_err(|e| DeliveryError::Permanent(format!("query `{}`: {e}", q.name)))?;
            let found = self.api.search(q, &rules).await?;
            results.insert(q.name.clone(), Value::Array(found));
        }
        let ev = Event {
            event_type: data["type"].as_str().unwrap_or("").to_string(),
            id: job.event_id.clone(),
            source: data["source"].as_str().unwrap_or("").to_string(),
            data: data.clone(),
            secret: job.secret,
        };
        let dispatches = crate::routing::expand(rs, &ev, rule_id, results)
            .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
        let mut jobs = Vec::new();
        let mut lines = Vec::new();
        for d in dispatches {
            let where_to = d
                .target
                .channel
                .clone()
                .or(d.target.user_email.clone())
                .map(|t| format!(" {t}"))
                .unwrap_or_default();
            lines.push(format!("{} → {}{where_to}", d.rule, d.to));
            let error = match &d.message {
                Ok(_) => None,
                Err(DispatchError::Render(e)) | Err(DispatchError::Refused(e)) => Some(e.clone()),
            };
            jobs.push(NewJob {
                destination: d.destination.clone(),
                rule: d.rule.clone(),
                event_id: d.event_id.clone(),
                target: d.target.clone(),
                payload: d.message.clone().unwrap_or(Payload::Message(Value::Null)),
                secret: d.secret,
                throttle: None,
                error,
            });
        }
        if let Some(run) = crate::runs::run_id(&data) {
            let msg = if lines.is_empty() {
                format!("rule {rule_id}: nothing to send")
            } else {
                format!("sending {} message(s): {}", lines.len(), lines.join(", "))
            };
            // Progress lines are informative; a failure to post one does not fail the work.
            if let Err(e) = self.api.log(&run, &msg).await {
                tracing::warn!(run = %run, reason = e.reason(), "could not post a progress log line");
            }
        }
        Ok(jobs)
    }

    /// Writes a closed run's status, summary, label and link, and its log line. The rule's
    /// `report:` templates render over the event with `report` (the tally) added.
    async fn report(&self, r: &RunReport, rs: &Router) -> Result<Vec<NewJob>, DeliveryError> {
        let run_id = r.run_id.as_str();
        let wording = crate::runs::report_of(&r.tally);
        let status = wording.status;
        let mut context = r.spec.context.clone();
        if let Value::Object(m) = &mut context {
            m.insert("report".into(), json!(r.tally));
        }
        let ctx = handlebars::Context::from(context);
        let templates = &rs.templates;
        let mut patch = json!({"status": status});
        let fields = if status == "SUCCESS" {
            &r.spec.success
        } else {
            &r.spec.failure
        };
        for (key, tpl) in [
            ("statusLabel", &fields.status_label),
            ("summary", &fields.summary),
            ("link", &fields.link),
        ] {
            if let Some(t) = tpl {
                match templates.render_plain(t, &ctx) {
                    Ok(v) if !v.trim().is_empty() => patch[key] = json!(v.trim()),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(run = %run_id, field = key, reason = %e.message, "report field did not render")
                    }
                }
            }
        }
        if patch.get("summary").is_none() {
            patch["summary"] = json!(wording.default_summary);
        }
        self.api.log(run_id, &wording.log).await?;
        self.api.patch_run(run_id, &patch).await?;
        tracing::info!(run = %run_id, status, "reported the action run to Port");
        Ok(Vec::new())
    }
}

/// Renders every string leaf of a JSON value as a template.
fn render_strings(v: &Value, f: &dyn Fn(&str) -> Result<String, String>) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) if s.contains("{{") => Value::String(f(s)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_strings(x, f))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_strings(x, f)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

impl Destination for Port {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>> {
        Box::pin(async move {
            match &job.payload {
                Payload::Expand(op) => self.expand(job, op, rules).await,
                Payload::Report(r) => self.report(r, rules).await,
                Payload::Message(_) | Payload::Group(_) => Err(DeliveryError::Permanent(
                    "a `port` destination reports runs and answers `with:` queries; it does not take messages".into(),
                )),
            }
        })
    }
}

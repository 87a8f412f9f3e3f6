//! `port`: Port's REST API (protocols.md §2). It reports action runs (PATCH status, post log
//! lines) and answers rules' `with:` queries (entity search, following `next` page by page).
//! The API client and its token cache are [`crate::port_api`].
//!
//! Jobs for this destination are operations, not messages: `{"op": "expand", ...}` runs a
//! rule's queries, renders its messages and returns them as follow-up jobs (committed with this
//! job's completion), posting a progress log line on the run; `{"op": "report", ...}` writes
//! the final run status and a log line (a Workflow node run, `wfnr_…`, is completed on the
//! Workflows endpoints instead); `{"op": "act", ...}` runs a self-service action or changes an
//! entity for a rule, and `{"op": "watch", ...}` follows a started run (see [`crate::acts`]).

use serde_json::{json, Map, Value};

use super::{BoxFut, DeliveryError, Destination};
use crate::acts;
use crate::event::Event;
use crate::job::{
    Expand, Job, NewJob, Payload, PortAct, PortOp, RunAction, RunAs, RunReport, RunWatch,
};
use crate::port_api::PortApi;
use crate::routing::{DispatchError, Router};

/// The `port` destination: its operations on Port's API.
pub struct Port {
    api: PortApi,
    /// Port's web app, for run links (`api.…` → `app.…` of the API's base URL).
    app_url: String,
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Port {
    /// A destination over `api`.
    pub fn new(api: PortApi) -> Port {
        let base = api.base_url().to_string();
        let app_url = match base.split_once("://api.") {
            Some((scheme, rest)) => format!("{scheme}://app.{rest}"),
            None => base,
        };
        Port { api, app_url }
    }

    /// A rule's operation on Port: an entity change, or an action run (see [`crate::acts`]).
    async fn act(&self, job: &Job, a: &PortAct) -> Result<Vec<NewJob>, DeliveryError> {
        match &a.op {
            PortOp::Entity(c) => {
                self.api.change_entity(c).await?;
                tracing::info!(rule = %job.rule, blueprint = %c.blueprint, entity = %c.identifier, "changed a Port entity");
                Ok(Vec::new())
            }
            PortOp::Run(r) => self.run(job, a, r).await,
        }
    }

    async fn run(
        &self,
        job: &Job,
        a: &PortAct,
        r: &RunAction,
    ) -> Result<Vec<NewJob>, DeliveryError> {
        let click = a.click.as_ref();
        let notify = a.notify.as_deref();
        let mut out = Vec::new();
        if !acts::allowed(&r.allow, click) {
            let who = click.map(|c| c.user.as_str()).unwrap_or("(no click)");
            tracing::info!(rule = %job.rule, user = %who, action = %r.action, "not on the step's allow list; the action was not run");
            metrics::counter!("switchyard_port_actions_total", "outcome" => "not_allowed")
                .increment(1);
            if let (Some(n), Some(url)) = (notify, click.and_then(|c| c.response_url.as_deref())) {
                out.push(acts::ephemeral(job, n, url, acts::not_allowed(&r.action)));
            }
            return Ok(out);
        }
        let run_as = match &r.run_as {
            RunAs::Engine => None,
            RunAs::Email(e) => Some(e.clone()),
            RunAs::Clicker => match click.and_then(|c| c.email.clone()) {
                Some(e) => Some(e),
                None => {
                    let reason = "Slack did not give the clicker's email (the bot needs the `users:read.email` scope), so Port cannot check their permissions".to_string();
                    return self.refused(job, a, r, &reason);
                }
            },
        };
        match self
            .api
            .run_action(
                &r.action,
                r.entity.as_deref(),
                &r.properties,
                run_as.as_deref(),
            )
            .await
        {
            Ok(run) => {
                let run_id = run["id"].as_str().unwrap_or_default().to_string();
                tracing::info!(rule = %job.rule, action = %r.action, run = %run_id, "started a Port action run");
                metrics::counter!("switchyard_port_actions_total", "outcome" => "started")
                    .increment(1);
                let (Some(n), Some(c)) = (notify, click) else {
                    return Ok(out);
                };
                let link = acts::run_link(&run, &self.app_url);
                if let Some(url) = &c.response_url {
                    out.push(acts::ephemeral(
                        job,
                        n,
                        url,
                        acts::accepted(&r.action, &run_id),
                    ));
                }
                out.push(acts::thread_note(
                    job,
                    n,
                    &c.channel,
                    &c.message_ts,
                    Some((&run_id, false)),
                    acts::started(&r.action, r.entity.as_deref(), &run_id, link.as_deref(), c),
                ));
                if let Some(follow) = r.follow {
                    let now = now_ms();
                    let deadline =
                        now.saturating_add((follow.timeout_secs as i64).saturating_mul(1000));
                    let w = RunWatch {
                        run_id,
                        action: r.action.clone(),
                        entity: r.entity.clone(),
                        notify: n.to_string(),
                        channel: c.channel.clone(),
                        thread_ts: c.message_ts.clone(),
                        follow,
                        started_at: now,
                        deadline,
                        told: Some(acts::told(&run)),
                    };
                    out.push(self.next_watch(job, w, now));
                }
                Ok(out)
            }
            Err(DeliveryError::Permanent(reason)) if notify.is_some() && click.is_some() => {
                self.refused(job, a, r, &reason)
            }
            Err(e) => Err(e),
        }
    }

    /// Port refused (or could not be asked): the thread says why, and the act is kept as a
    /// dead letter with the reason.
    fn refused(
        &self,
        job: &Job,
        a: &PortAct,
        r: &RunAction,
        reason: &str,
    ) -> Result<Vec<NewJob>, DeliveryError> {
        let (Some(n), Some(c)) = (a.notify.as_deref(), a.click.as_ref()) else {
            return Err(DeliveryError::Permanent(reason.to_string()));
        };
        tracing::warn!(rule = %job.rule, action = %r.action, reason, "Port did not start the action; told the thread");
        metrics::counter!("switchyard_port_actions_total", "outcome" => "refused").increment(1);
        Ok(vec![
            acts::thread_note(
                job,
                n,
                &c.channel,
                &c.message_ts,
                None,
                acts::refused(&r.action, c, reason),
            ),
            NewJob {
                error: Some(reason.to_string()),
                ..NewJob::follow_up(
                    job,
                    &job.destination,
                    Default::default(),
                    Payload::Act(Box::new(a.clone())),
                )
            },
        ])
    }

    /// The next read of a followed run: after the poll interval, or at the deadline.
    fn next_watch(&self, job: &Job, w: RunWatch, now: i64) -> NewJob {
        let at = match w.follow.poll_secs {
            Some(p) => now
                .saturating_add((p as i64).saturating_mul(1000))
                .min(w.deadline),
            None => w.deadline,
        };
        let target = crate::job::Target {
            hold_until: Some(at),
            ..Default::default()
        };
        NewJob::follow_up(job, &job.destination, target, Payload::Watch(Box::new(w)))
    }

    /// Reads a followed run and tells the thread what changed; the end (or the timeout) closes
    /// the run's key, anything else schedules the next read.
    async fn watch(&self, job: &Job, w: &RunWatch) -> Result<Vec<NewJob>, DeliveryError> {
        let run = self.api.get_run(&w.run_id).await?;
        let status = run["status"].as_str().unwrap_or("");
        let link = acts::run_link(&run, &self.app_url);
        let note = |msg: Value, close: bool| {
            acts::thread_note(
                job,
                &w.notify,
                &w.channel,
                &w.thread_ts,
                Some((&w.run_id, close)),
                msg,
            )
        };
        let polling = w.follow.poll_secs.is_some();
        if !acts::is_running(status) {
            tracing::info!(run = %w.run_id, status, "a followed Port run ended");
            // Without polling, rules on `port/run.updated` told the thread already.
            return Ok(if polling {
                vec![note(acts::progress(w, &run, link.as_deref()), true)]
            } else {
                Vec::new()
            });
        }
        let now = now_ms();
        if now >= w.deadline {
            tracing::warn!(run = %w.run_id, status, "a followed Port run did not finish in time");
            return Ok(vec![note(acts::timed_out(w, &run, link.as_deref()), true)]);
        }
        let mut out = Vec::new();
        let told = acts::told(&run);
        let mut next = w.clone();
        if polling && w.told.as_deref() != Some(told.as_str()) {
            out.push(note(acts::progress(w, &run, link.as_deref()), false));
            next.told = Some(told);
        }
        out.push(self.next_watch(job, next, now));
        Ok(out)
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
                .map(|r| templates.render_strings(r, &ctx))
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
        if run_id.starts_with("wfnr_") {
            // A Workflow node run: its own endpoints, and the report as the node's output.
            let output = json!({
                "summary": patch["summary"], "statusLabel": patch.get("statusLabel"),
                "link": patch.get("link"), "delivered": r.tally.delivered, "failed": r.tally.failed,
            });
            self.api
                .complete_node_run(run_id, status == "SUCCESS", &output, &wording.log)
                .await?;
            tracing::info!(node_run = %run_id, status, "reported the Workflow node run to Port");
            return Ok(Vec::new());
        }
        self.api.log(run_id, &wording.log).await?;
        self.api.patch_run(run_id, &patch).await?;
        tracing::info!(run = %run_id, status, "reported the action run to Port");
        Ok(Vec::new())
    }
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
                Payload::Act(a) => self.act(job, a).await,
                Payload::Watch(w) => self.watch(job, w).await,
                Payload::Message(_) | Payload::Group(_) => Err(DeliveryError::Permanent(
                    "a `port` destination runs actions, changes entities, reports runs and answers `with:` queries; it does not take messages".into(),
                )),
            }
        })
    }
}

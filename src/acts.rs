//! Rules acting on Port, and Port's answer coming back to Slack: the wording and the jobs of
//! the round trip, kept free of I/O so `check`, tests and the `port` destination share them.
//!
//! The round trip (protocols.md §7.1–7.2):
//!
//! 1. A click on a Slack button matches a rule whose step has `run:`; routing renders it into a
//!    [`PortAct`] carrying the click (user, channel, message `ts`, `response_url`).
//! 2. Delivery resolves the clicker's email (`users.info`, through the `notify` Slack bot),
//!    checks the step's `allow` list, and runs the action with `run_as=<email>`: Port applies
//!    that user's permissions, as for a click in Port's own UI.
//! 3. Port's answer becomes follow-up jobs, committed with the act's outcome: an ephemeral
//!    answer to the clicker, a note in the clicked message's thread that opens the message key
//!    `port-run:<run id>` on that message (so rules on `port/run.updated` with that key reply
//!    in the same thread), and a [`RunWatch`] that reads the run until it ends or times out.
//! 4. Each watch reads the run; a change of status or label is said in the thread, the end
//!    (`SUCCESS: 4 → 6 replicas`, with the link) closes the key, and past the timeout the
//!    thread is told the run has not finished.
//!
//! A refusal by Port (403, 404, 422) is said in the thread with Port's message, and the act is
//! kept as a dead letter too, so the failure is visible to operators as well as to the clicker.

use serde_json::{json, Value};

use crate::job::{ClickRef, Identity, Job, KeyAction, NewJob, Payload, RunWatch, Target};

/// The message key naming the clicked message of an action run.
pub fn run_key(run_id: &str) -> String {
    format!("port-run:{run_id}")
}

/// How long a run's key is remembered.
const RUN_KEY_TTL_SECS: u64 = 7 * 24 * 3600;

/// Whether a run in `status` is still going (Port's statuses that are not an end).
pub fn is_running(status: &str) -> bool {
    matches!(
        status,
        "IN_PROGRESS" | "WAITING_FOR_APPROVAL" | "PENDING" | "TRIGGERED" | "QUEUED" | ""
    )
}

/// Whether the clicker may start the action: on the `allow` list by user id or by email
/// (case-insensitive). An empty list allows everyone Port allows.
pub fn allowed(allow: &[String], click: Option<&ClickRef>) -> bool {
    if allow.is_empty() {
        return true;
    }
    let Some(c) = click else {
        return false;
    };
    allow.iter().any(|a| {
        a == &c.user
            || c.email
                .as_deref()
                .is_some_and(|e| a.contains('@') && a.eq_ignore_ascii_case(e))
    })
}

/// Whether checking the clicker needs their email (an `allow` entry is an email, or Port runs
/// the action as them).
pub fn needs_email(allow: &[String], run_as_clicker: bool) -> bool {
    run_as_clicker || allow.iter().any(|a| a.contains('@'))
}

/// The run's link: the one Port gives (a string or the first of a list), else Port's run page.
pub fn run_link(run: &Value, app_url: &str) -> Option<String> {
    let given = match &run["link"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    given.filter(|s| !s.is_empty()).or_else(|| {
        run["id"]
            .as_str()
            .map(|id| format!("{app_url}/organization/run?runId={id}"))
    })
}

/// `text` as a Slack mrkdwn section with `text` as the notification fallback.
fn message(text: String) -> Value {
    json!({"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]})
}

/// A run's name in notes: `` `scale_up` run <link|r_…> ``.
fn run_name(action: &str, run_id: &str, link: Option<&str>) -> String {
    match link {
        Some(l) => format!("`{action}` run <{l}|{run_id}>"),
        None => format!("`{action}` run {run_id}"),
    }
}

/// The thread note that a run started.
pub fn started(
    action: &str,
    entity: Option<&str>,
    run_id: &str,
    link: Option<&str>,
    click: &ClickRef,
) -> Value {
    let on = entity.map(|e| format!(" on *{e}*")).unwrap_or_default();
    message(format!(
        ":arrow_forward: {}{on} started by <@{}>",
        run_name(action, run_id, link),
        click.user
    ))
}

/// The thread note that Port refused to start a run, with Port's reason.
pub fn refused(action: &str, click: &ClickRef, reason: &str) -> Value {
    message(format!(
        ":no_entry: Port did not start `{action}` for <@{}>: {reason}",
        click.user
    ))
}

/// The ephemeral answer to a clicker who is not on the step's `allow` list.
pub fn not_allowed(action: &str) -> Value {
    json!({"response_type": "ephemeral", "replace_original": false,
           "text": format!(":no_entry: You are not allowed to run `{action}` from Slack.")})
}

/// The ephemeral answer to the clicker once Port accepted the run.
pub fn accepted(action: &str, run_id: &str) -> Value {
    json!({"response_type": "ephemeral", "replace_original": false,
           "text": format!("`{action}` run {run_id} started; its progress follows in the thread.")})
}

/// The status and label of a run as one line (`SUCCESS: 4 → 6 replicas`), with its summary.
fn status_line(run: &Value) -> String {
    let status = run["status"].as_str().unwrap_or("UNKNOWN");
    let label = run["statusLabel"].as_str().unwrap_or("").trim();
    let summary = run["summary"].as_str().unwrap_or("").trim();
    let mut line = status.to_string();
    if !label.is_empty() {
        line.push_str(&format!(": {label}"));
    }
    if !summary.is_empty() && summary != label {
        line.push_str(&format!(" — {summary}"));
    }
    line
}

/// What the thread was told of a run: its status and label.
pub fn told(run: &Value) -> String {
    format!(
        "{}|{}",
        run["status"].as_str().unwrap_or(""),
        run["statusLabel"].as_str().unwrap_or("")
    )
}

/// The thread note of a run's progress or end.
pub fn progress(w: &RunWatch, run: &Value, link: Option<&str>) -> Value {
    let status = run["status"].as_str().unwrap_or("");
    let icon = match status {
        "SUCCESS" => ":white_check_mark:",
        s if is_running(s) => ":hourglass_flowing_sand:",
        _ => ":x:",
    };
    message(format!(
        "{icon} {} · {}",
        status_line(run),
        run_name(&w.action, &w.run_id, link)
    ))
}

/// The thread note that a run did not finish in time.
pub fn timed_out(w: &RunWatch, run: &Value, link: Option<&str>) -> Value {
    let waited = humantime::format_duration(std::time::Duration::from_secs(w.follow.timeout_secs));
    message(format!(
        ":warning: {} has not finished after {waited} (last status {}); no longer following it here",
        run_name(&w.action, &w.run_id, link),
        status_line(run)
    ))
}

/// A note for the clicked message's thread, through the Slack bot `notify`, following up
/// `job`. With `key`, it is keyed `port-run:<id>`: the first note opens the key on the clicked
/// message, the last (`close`) closes it.
pub fn thread_note(
    job: &Job,
    notify: &str,
    channel: &str,
    thread_ts: &str,
    key: Option<(&str, bool)>,
    msg: Value,
) -> NewJob {
    let target = Target {
        channel: Some(channel.to_string()),
        thread_ts: Some(thread_ts.to_string()),
        identity: key.map(|(run_id, close)| Identity {
            key: run_key(run_id),
            action: if close {
                KeyAction::ReplyClose
            } else {
                KeyAction::Reply
            },
            ttl_secs: RUN_KEY_TTL_SECS,
        }),
        ..Default::default()
    };
    NewJob::follow_up(job, notify, target, Payload::Message(msg))
}

/// An answer to the clicker only, through the click's `response_url`, following up `job`.
pub fn ephemeral(job: &Job, notify: &str, response_url: &str, msg: Value) -> NewJob {
    let target = Target {
        response_url: Some(response_url.to_string()),
        ..Default::default()
    };
    NewJob::follow_up(job, notify, target, Payload::Message(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(user: &str, email: Option<&str>) -> ClickRef {
        ClickRef {
            user: user.into(),
            email: email.map(str::to_string),
            channel: "C1".into(),
            message_ts: "1.1".into(),
            response_url: None,
        }
    }

    #[test]
    fn allow_matches_ids_and_emails_without_case() {
        let allow = vec!["U1".to_string(), "Ana@Example.com".to_string()];
        assert!(allowed(&allow, Some(&click("U1", None))));
        assert!(allowed(&allow, Some(&click("U2", Some("ana@example.com")))));
        assert!(!allowed(
            &allow,
            Some(&click("U3", Some("bob@example.com")))
        ));
        assert!(!allowed(&allow, None));
        assert!(allowed(&[], None));
        // A user id never matches an email entry, nor the other way round.
        assert!(!allowed(&["U9".into()], Some(&click("U2", Some("U9")))));
    }

    #[test]
    fn the_end_of_a_run_reads_status_label_and_link() {
        let w = RunWatch {
            run_id: "r_1".into(),
            action: "scale_up".into(),
            entity: None,
            notify: "bot".into(),
            channel: "C1".into(),
            thread_ts: "1.1".into(),
            follow: crate::job::FollowSpec {
                poll_secs: Some(1),
                timeout_secs: 60,
            },
            started_at: 0,
            deadline: 60_000,
            told: None,
        };
        let run = json!({"id": "r_1", "status": "SUCCESS", "statusLabel": "4 → 6 replicas"});
        let link = run_link(&run, "https://app.port.io");
        assert_eq!(
            link.as_deref(),
            Some("https://app.port.io/organization/run?runId=r_1")
        );
        let m = progress(&w, &run, link.as_deref());
        assert_eq!(
            m["text"],
            ":white_check_mark: SUCCESS: 4 → 6 replicas · `scale_up` run <https://app.port.io/organization/run?runId=r_1|r_1>"
        );
        assert!(!is_running("SUCCESS") && !is_running("FAILURE") && is_running("IN_PROGRESS"));
        let given = json!({"id": "r_1", "link": ["https://ci/1", "https://ci/2"]});
        assert_eq!(run_link(&given, "x").as_deref(), Some("https://ci/1"));
    }
}

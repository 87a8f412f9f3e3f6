//! Digests: the matches of a grouped rule (`group:`) wait in their group in the outbox, and
//! this task sends one digest per group when it is due.
//!
//! A group is due `wait` after its oldest item, and, once a digest went out, no sooner than
//! `interval` after that digest (Alertmanager's `group_wait` and `group_interval`). The digest
//! renders the rule's send steps once over `items` (the grouped envelopes, at most `max`),
//! `count`, `group` and `rule`; its jobs replace the group's items in one transaction, so a
//! crash neither loses a digest nor sends it twice. A group whose rule a reload removed (or
//! made ungrouped) is not dropped silently: its items become one dead letter naming the reason.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::ingest::{job_of, Pipeline};
use crate::job::{NewJob, Payload, Target};
use crate::outbox::{now_ms, PendingGroup};

/// How often the groups are looked at: the lateness of a digest is at most this.
const TICK: Duration = Duration::from_millis(500);

/// With no grouped rule in force and no group pending, how often the outbox is looked at
/// anyway (an item committed by a request that began under the previous rules).
const IDLE_TICK: Duration = Duration::from_secs(30);

/// Runs until the process stops.
pub async fn run(p: Arc<Pipeline>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = true;
    let mut last_look = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        // Engines whose rules group nothing do not read the outbox twice a second for nothing.
        let grouped = p.rules().rules.iter().any(|r| r.group.is_some());
        if !grouped && !pending && last_look.elapsed() < IDLE_TICK {
            continue;
        }
        last_look = tokio::time::Instant::now();
        let groups = match p.pending_groups().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pending digest groups; trying again");
                continue;
            }
        };
        pending = !groups.is_empty();
        for g in groups {
            if let Err(e) = flush_if_due(&p, &g).await {
                tracing::warn!(rule = %g.rule, group = %g.group, error = %e, "digest not sent yet; trying again");
            }
        }
    }
}

/// When `g` is due under its rule's settings (`None`: its rule is gone or no longer grouped).
pub fn due_at(rule: Option<&crate::routing::Rule>, g: &PendingGroup) -> Option<i64> {
    Some(rule?.group.as_ref()?.due_at(g.first_at, g.last_flush))
}

async fn flush_if_due(p: &Pipeline, g: &PendingGroup) -> Result<(), String> {
    let rs = p.rules();
    let rule = rs.rules.iter().find(|r| r.id == g.rule);
    let due = due_at(rule, g);
    if due.is_some_and(|t| t > now_ms()) {
        return Ok(());
    }
    let items = p
        .group_items(&g.rule, &g.group)
        .await
        .map_err(|e| e.to_string())?;
    if items.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
    let event_id = format!("digest:{}:{}:{}", g.rule, g.group, ids[0]);
    let jobs: Vec<NewJob> = match (rule, due) {
        (Some(rule), Some(_)) => {
            let events = items.into_iter().map(|(_, v)| v).collect();
            crate::routing::digest(&rs, rule, &g.group, events, &event_id)
                .into_iter()
                .filter_map(job_of)
                .collect()
        }
        _ => {
            let n = items.len();
            let events: Vec<_> = items.into_iter().map(|(_, v)| v).collect();
            vec![NewJob {
                destination: crate::routing::group_destination(&g.rule),
                rule: g.rule.clone(),
                event_id: event_id.clone(),
                target: Target::default(),
                payload: Payload::Message(json!({"group": g.group, "items": events})),
                secret: false,
                throttle: None,
                error: Some(format!(
                    "rule `{}` is no longer a grouped rule in the rules in force; its {n} pending item(s) were not sent as a digest",
                    g.rule
                )),
            }]
        }
    };
    let n = p
        .commit_digest(g.rule.clone(), g.group.clone(), ids.clone(), jobs)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(rule = %g.rule, group = %g.group, items = ids.len(), jobs = n, "digest sent");
    metrics::counter!("switchyard_digests_total", "rule" => g.rule.clone()).increment(1);
    Ok(())
}

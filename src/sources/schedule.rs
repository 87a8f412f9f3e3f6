//! Schedules: `schedules: {weekly-readiness: {cron: "0 9 * * MON", timezone: Europe/Berlin}}`
//! emits `schedule/weekly-readiness` events that rules match like any other.
//!
//! The next tick of each schedule is computed from now (in its time zone) when the engine starts
//! and when a reload adds or changes the schedule; a tick missed while the engine was down is not
//! replayed. Each tick's event id is `schedule:<name>:<tick time>` and goes through the outbox's
//! dedup window, so a tick is never run twice, even across reloads or restarts in the same
//! second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Schedule;
use crate::ingest::{Accepted, Pipeline};

fn next_after(s: &Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    s.next_after(t)
}

/// Runs until the process stops.
pub async fn run(st: Arc<Pipeline>) {
    let mut next: HashMap<String, (Schedule, DateTime<Utc>)> = HashMap::new();
    loop {
        let rs = st.rules();
        let now = Utc::now();
        next.retain(|name, (s, _)| rs.schedules.get(name) == Some(s));
        for (name, s) in &rs.schedules {
            if !next.contains_key(name) {
                if let Some(t) = next_after(s, now) {
                    tracing::info!(schedule = %name, next = %t.with_timezone(&s.tz), "schedule armed");
                    next.insert(name.clone(), (s.clone(), t));
                }
            }
        }
        let due: Vec<(String, Schedule, DateTime<Utc>)> = next
            .iter()
            .filter(|(_, (_, t))| *t <= now)
            .map(|(n, (s, t))| (n.clone(), s.clone(), *t))
            .collect();
        for (name, s, tick) in due {
            fire(&st, &s, tick).await;
            match next_after(&s, tick.max(now)) {
                Some(t) => {
                    next.insert(name, (s, t));
                }
                None => {
                    next.remove(&name);
                }
            }
        }
        // Wake for the earliest tick, and at least once a second to notice reloads.
        let wait = next
            .values()
            .map(|(_, t)| (*t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
    }
}

async fn fire(st: &Pipeline, s: &Schedule, tick: DateTime<Utc>) {
    let local = tick.with_timezone(&s.tz);
    let mut ev = s.tick_event(tick);
    let rs = st.rules();
    let week = Duration::from_secs(7 * 24 * 3600);
    match st.accept(&rs, None, &mut ev, week).await {
        Ok(Accepted::Committed {
            dispatches: n,
            matched,
            ..
        }) => {
            tracing::info!(schedule = %s.name, tick = %local, dispatches = n, "schedule fired");
            metrics::counter!("switchyard_events_total", "source" => "schedule", "outcome" => if matched { "accepted" } else { "unmatched" }).increment(1);
        }
        Ok(Accepted::Duplicate) => {
            tracing::debug!(schedule = %s.name, tick = %local, "tick already handled")
        }
        Err(e) => {
            tracing::error!(schedule = %s.name, error = ?e, "could not queue the scheduled event")
        }
    }
}

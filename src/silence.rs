//! Silences: "say nothing about this for two hours".
//!
//! A silence names a rule (or every rule) and conditions on the event envelope, written in the
//! rule language (`$.entity.identifier == "payments-api"`), and holds from `starts_at` until
//! `ends_at` unless expired early. A dispatch that an active silence matches is not queued: it
//! is counted (`switchyard_silenced_total{rule}`, the silence's own count on `/status`) and
//! logged, and the event is otherwise handled as usual (its dedup key is kept, so Port's retry of
//! it stays quiet too).
//!
//! Silences are state the engine owns: stored in the outbox's database, created, listed and
//! expired with `switchyard silence` (against a running server's admin API, or the data
//! directory of a stopped one), and held in memory as a [`SilenceSet`] that the ingest stage
//! reads without a database round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::routing::condition::{self, Condition};

/// A silence as stored and as the admin API and CLI show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: i64,
    /// The rule it silences; `None` silences every rule.
    #[serde(default)]
    pub rule: Option<String>,
    /// Conditions on the envelope, all of which must hold (the rule language's lines).
    #[serde(default)]
    pub matchers: Vec<String>,
    /// Only sends of this message key (keyed messages; a "Snooze" button sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Unix ms.
    pub starts_at: i64,
    /// Unix ms (the earlier of its end and when it was expired).
    pub ends_at: i64,
    pub author: String,
    #[serde(default)]
    pub comment: String,
    /// Unix ms.
    pub created_at: i64,
}

impl Silence {
    /// Active at `now` (unix ms).
    pub fn active(&self, now: i64) -> bool {
        self.starts_at <= now && now < self.ends_at
    }
}

/// What a new silence says; the store gives it an id and a creation time.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewSilence {
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub matchers: Vec<String>,
    /// Only sends of this message key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Unix ms; default now.
    #[serde(default)]
    pub starts_at: Option<i64>,
    /// Unix ms; or give `duration`.
    #[serde(default)]
    pub ends_at: Option<i64>,
    /// `2h`, `30m`: the silence ends this long after it starts.
    #[serde(default)]
    pub duration: Option<String>,
    pub author: String,
    #[serde(default)]
    pub comment: String,
}

/// The longest a silence may last: a forgotten one should not hide alerts for good.
pub const MAX_SILENCE_MS: i64 = 90 * 24 * 3600 * 1000;

impl NewSilence {
    /// Checks it against the rules in force (`rule_exists`) and fills in its times; the error
    /// says what is wrong, for a 400 or a CLI diagnostic.
    pub fn validate(
        &self,
        now: i64,
        rule_exists: impl Fn(&str) -> bool,
    ) -> Result<(i64, i64), String> {
        if self.author.trim().is_empty() {
            return Err("a silence needs an `author` (who silenced it)".into());
        }
        if let Some(r) = &self.rule {
            if !rule_exists(r) {
                return Err(format!("no rule `{r}` in the rules in force"));
            }
        }
        if self.rule.is_none() && self.matchers.is_empty() && self.key.is_none() {
            return Err("a silence of every rule needs at least one matcher (`--match '$.entity.identifier == \"x\"'`); name a `rule` to silence all of it".into());
        }
        for m in &self.matchers {
            compile(m)?;
        }
        let starts = self.starts_at.unwrap_or(now);
        let ends = match (self.ends_at, &self.duration) {
            (Some(e), None) => e,
            (None, Some(d)) => {
                let d = crate::config::parse_duration(d)
                    .ok_or_else(|| format!("`{d}` is not a duration (e.g. `2h`)"))?;
                starts.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            }
            (Some(_), Some(_)) => return Err("give `ends_at` or `duration`, not both".into()),
            (None, None) => {
                return Err("a silence needs an end: `duration` (e.g. `2h`) or `ends_at`".into())
            }
        };
        if ends <= starts {
            return Err("a silence must end after it starts".into());
        }
        if ends <= now {
            return Err("that silence would already be over".into());
        }
        if ends - starts > MAX_SILENCE_MS {
            return Err("a silence lasts at most 90 days".into());
        }
        Ok((starts, ends))
    }
}

fn compile(line: &str) -> Result<Condition, String> {
    condition::compile(&Value::String(line.to_string()))
        .map_err(|e| format!("matcher `{line}`: {}", e.message))
}

/// A silence ready to match, with its count of suppressed sends since start.
struct Compiled {
    silence: Silence,
    conditions: Vec<Condition>,
    suppressed: AtomicU64,
}

/// The silences the engine holds in memory (expired ones are dropped when it is rebuilt).
#[derive(Default)]
pub struct SilenceSet {
    items: Vec<Compiled>,
}

impl SilenceSet {
    /// Compiles `silences`, carrying the counts of those `previous` already had.
    pub fn new(silences: Vec<Silence>, previous: Option<&SilenceSet>) -> SilenceSet {
        let items = silences
            .into_iter()
            .filter_map(|s| {
                let conditions = s
                    .matchers
                    .iter()
                    .map(|m| compile(m))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tracing::warn!(silence = s.id, "stored silence skipped: {e}"))
                    .ok()?;
                let count = previous
                    .and_then(|p| p.items.iter().find(|c| c.silence.id == s.id))
                    .map_or(0, |c| c.suppressed.load(Ordering::Relaxed));
                Some(Compiled {
                    silence: s,
                    conditions,
                    suppressed: AtomicU64::new(count),
                })
            })
            .collect();
        SilenceSet { items }
    }

    /// Whether no silence is held (the ingest stage then skips matching altogether).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The id of the first silence active at `now` that matches a send of `rule` for the event
    /// `data`, counting it.
    pub fn silenced(&self, rule: &str, key: Option<&str>, data: &Value, now: i64) -> Option<i64> {
        let hit = self.items.iter().find(|c| {
            c.silence.active(now)
                && c.silence.rule.as_deref().is_none_or(|r| r == rule)
                && c.silence.key.as_deref().is_none_or(|k| Some(k) == key)
                && c.conditions.iter().all(|k| k.eval(data))
        })?;
        hit.suppressed.fetch_add(1, Ordering::Relaxed);
        Some(hit.silence.id)
    }

    /// Whether an active silence of exactly `rule` and `key` exists (a second snooze click).
    pub fn has_key(&self, rule: &str, key: &str, now: i64) -> bool {
        self.items.iter().any(|c| {
            c.silence.active(now)
                && c.silence.rule.as_deref() == Some(rule)
                && c.silence.key.as_deref() == Some(key)
        })
    }

    /// The silences not yet over at `now`, with their counts, for `/status`.
    pub fn status(&self, now: i64) -> Vec<Value> {
        self.items
            .iter()
            .filter(|c| c.silence.ends_at > now)
            .map(|c| {
                let mut v = serde_json::to_value(&c.silence).unwrap_or_default();
                v["active"] = Value::Bool(c.silence.active(now));
                v["suppressed"] = Value::from(c.suppressed.load(Ordering::Relaxed));
                v
            })
            .collect()
    }
}

/// The engine's silences, swapped whole when one is added or expired.
pub type Silences = Arc<arc_swap::ArcSwap<SilenceSet>>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn silence(rule: Option<&str>, matchers: &[&str]) -> Silence {
        Silence {
            id: 1,
            rule: rule.map(str::to_string),
            matchers: matchers.iter().map(|m| m.to_string()).collect(),
            key: None,
            starts_at: 100,
            ends_at: 200,
            author: "ana".into(),
            comment: String::new(),
            created_at: 100,
        }
    }

    #[test]
    fn a_silence_matches_its_rule_and_conditions_within_its_time() {
        let set = SilenceSet::new(
            vec![silence(
                Some("degraded"),
                &["$.entity.identifier == \"payments-api\""],
            )],
            None,
        );
        let ev = json!({"entity": {"identifier": "payments-api"}});
        let other = json!({"entity": {"identifier": "orders-api"}});
        assert_eq!(set.silenced("degraded", None, &ev, 150), Some(1));
        assert_eq!(set.silenced("cpu-hot", None, &ev, 150), None);
        assert_eq!(set.silenced("degraded", None, &other, 150), None);
        assert_eq!(set.silenced("degraded", None, &ev, 99), None, "not yet");
        assert_eq!(set.silenced("degraded", None, &ev, 200), None, "over");
        assert_eq!(set.status(150)[0]["suppressed"], 1);
        // A rebuilt set keeps the counts.
        let again = SilenceSet::new(
            vec![silence(
                Some("degraded"),
                &["$.entity.identifier == \"payments-api\""],
            )],
            Some(&set),
        );
        assert_eq!(again.status(150)[0]["suppressed"], 1);
    }

    #[test]
    fn new_silences_are_checked() {
        let ok = |r: &str| r == "degraded";
        let base = NewSilence {
            rule: Some("degraded".into()),
            duration: Some("2h".into()),
            author: "ana".into(),
            ..Default::default()
        };
        assert_eq!(base.validate(0, ok), Ok((0, 7_200_000)));
        let e = |n: NewSilence| n.validate(0, ok).unwrap_err();
        assert!(e(NewSilence {
            rule: Some("nope".into()),
            ..base.clone()
        })
        .contains("no rule `nope`"));
        assert!(e(NewSilence {
            author: " ".into(),
            ..base.clone()
        })
        .contains("author"));
        assert!(e(NewSilence {
            rule: None,
            ..base.clone()
        })
        .contains("at least one matcher"));
        assert!(e(NewSilence {
            matchers: vec!["$.x ===".into()],
            ..base.clone()
        })
        .contains("matcher `$.x ===`"));
        assert!(e(NewSilence {
            duration: Some("soon".into()),
            ..base.clone()
        })
        .contains("not a duration"));
        assert!(e(NewSilence {
            duration: Some("100d".into()),
            ..base.clone()
        })
        .contains("90 days"));
        assert!(e(NewSilence {
            duration: None,
            ..base.clone()
        })
        .contains("needs an end"));
    }
}

//! The engine's own buttons on keyed messages: "Acknowledge" and "Snooze".
//!
//! A keyed send step with `buttons:` gets an actions block whose buttons carry `action_id`
//! `switchyard:ack` / `switchyard:snooze` and, as their value, the rule, destination and key of
//! the message. A click arrives through the signed `slack` source like any interaction; the
//! ingest stage hands those two to [`plan`] instead of the rules:
//!
//! - the clicker must be allowed by the step (`buttons.allow`: Slack user ids, or emails that the
//!   bot destination resolves with `users.lookupByEmail`, cached; anyone when empty), else
//!   nothing happens (logged, counted in `switchyard_button_clicks_total`);
//! - **acknowledge** updates the message: its buttons give way to "Acknowledged by @user";
//! - **snooze** creates a silence of that rule and key for the step's `snooze` time (author: the
//!   clicker), unless one is already active (a double click acts once), and updates the message
//!   to say until when.
//!
//! The update is an ordinary keyed job, committed with the click's dedup key (Slack's retry of a
//! click is recognised), and delivered in order after anything else of that key.

use serde_json::{json, Value};

use crate::config::Ruleset;
use crate::event::Event;
use crate::job::{Identity, KeyAction, NewJob, Payload, Target};
use crate::routing::BUTTON_PREFIX;
use crate::silence::NewSilence;

/// A click on one of the engine's buttons.
#[derive(Debug, Clone, PartialEq)]
pub struct Click {
    pub snooze: bool,
    pub rule: String,
    pub destination: String,
    pub key: String,
    pub user: String,
}

/// The engine's own click in `ev`, if it is one (`None`: route it like any interaction).
pub fn click(ev: &Event) -> Option<Click> {
    if ev.event_type != "slack/block_actions" {
        return None;
    }
    let action = ev.data["action"]["action_id"]
        .as_str()?
        .strip_prefix(BUTTON_PREFIX)?;
    let value: Value = serde_json::from_str(ev.data["action"]["value"].as_str()?).ok()?;
    Some(Click {
        snooze: action == "snooze",
        rule: value["r"].as_str()?.to_string(),
        destination: value["d"].as_str()?.to_string(),
        key: value["k"].as_str()?.to_string(),
        user: ev.data["user"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

/// What a click does: the silence to create (a snooze) and the message update, or why nothing.
pub enum Plan {
    Act {
        silence: Option<NewSilence>,
        update: Box<NewJob>,
    },
    Refused(String),
}

/// The keyed step of `rule` that carries the buttons, with them.
fn buttons_of<'a>(
    rs: &'a Ruleset,
    rule: &str,
) -> Option<(&'a crate::routing::Keyed, &'a crate::routing::Buttons)> {
    rs.rules.iter().find(|r| r.id == rule).and_then(|r| {
        r.sends.iter().find_map(|s| {
            let k = s.keyed.as_ref()?;
            Some((k, k.buttons.as_ref()?))
        })
    })
}

/// The `allow` list of the step whose buttons were clicked (empty: anyone).
pub fn allowed(rs: &Ruleset, c: &Click) -> Vec<String> {
    buttons_of(rs, &c.rule)
        .map(|(_, b)| b.allow.clone())
        .unwrap_or_default()
}

/// Plans a click against the rules in force at `now` (unix ms). `already_snoozed`: an active
/// silence of this rule and key exists. `clicker_allowed`: the clicker is on the step's `allow`
/// list, by user id or by an email that resolves to it (the caller resolves emails).
pub fn plan(
    rs: &Ruleset,
    ev: &Event,
    c: &Click,
    now: i64,
    already_snoozed: bool,
    clicker_allowed: bool,
) -> Plan {
    let Some((keyed, buttons)) = buttons_of(rs, &c.rule) else {
        return Plan::Refused(format!(
            "rule `{}` has no buttons in the rules in force",
            c.rule
        ));
    };
    if !buttons.allow.is_empty() && !clicker_allowed {
        return Plan::Refused(format!("user {} may not use these buttons", c.user));
    }
    if !rs.destinations.contains_key(&c.destination) {
        return Plan::Refused(format!("destination `{}` is gone", c.destination));
    }
    let who = format!("<@{}>", c.user);
    let (silence, note) = match (c.snooze, buttons.snooze) {
        (true, Some(d)) => {
            let until = now.saturating_add(d.as_millis() as i64);
            let until_text = chrono::DateTime::from_timestamp_millis(until)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_default();
            let silence = (!already_snoozed).then(|| NewSilence {
                rule: Some(c.rule.clone()),
                matchers: Vec::new(),
                key: Some(c.key.clone()),
                starts_at: Some(now),
                ends_at: Some(until),
                duration: None,
                author: format!("slack:{}", c.user),
                comment: "snoozed from Slack".into(),
            });
            (
                silence,
                format!(":zzz: Snoozed by {who} until {until_text}"),
            )
        }
        (true, None) => return Plan::Refused("this message has no snooze button".into()),
        (false, _) => (None, format!(":white_check_mark: Acknowledged by {who}")),
    };
    // The message as Slack shows it, with its buttons replaced by the note.
    let original = &ev.data["body"]["message"];
    let mut blocks: Vec<Value> = original["blocks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| {
            b["type"] != "actions"
                || !b["block_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(BUTTON_PREFIX))
        })
        .collect();
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": note}]}));
    let message = json!({"text": original["text"], "blocks": blocks});
    let update = NewJob {
        destination: c.destination.clone(),
        rule: c.rule.clone(),
        event_id: ev.id.clone(),
        target: Target {
            channel: ev.data["channel"]["id"].as_str().map(str::to_string),
            identity: Some(Identity {
                key: c.key.clone(),
                action: KeyAction::Update,
                ttl_secs: keyed.ttl.as_secs(),
            }),
            ..Default::default()
        },
        payload: Payload::Message(message),
        secret: false,
        throttle: None,
        error: None,
    };
    Plan::Act {
        silence,
        update: Box::new(update),
    }
}

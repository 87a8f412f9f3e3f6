//! Time windows: when a rule or a destination may send.
//!
//! `window: {timezone: Europe/Berlin, active: ["mon-fri 09:00-18:00"], outside: hold}` sends
//! only on weekdays from 9 to 18 in Berlin; `muted: ["sat-sun", "22:00-06:00"]` is the other way
//! round. A span is `[days] [HH:MM-HH:MM]`: days as `mon`, `mon-fri`, `sat-sun` or
//! `mon,wed,fri`; a time range may cross midnight (`22:00-06:00` runs into the next day); either
//! part may be left out (all day; every day). Outside its window a send is held until the window
//! opens (`outside: hold`, the default; the message is queued with a not-before time and survives
//! restarts) or dropped (`outside: drop`, counted in `switchyard_muted_total`).
//!
//! Windows are applied when an event is accepted, never inside routing: routing stays a pure
//! function of (rules, event), and `check`/`simulate` show what a rule sends, not when.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// A window as written in a rules file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// An IANA time zone (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Send only within these spans, e.g. `mon-fri 09:00-18:00`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// Send except within these spans, e.g. `sat-sun`, `22:00-06:00`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub muted: Vec<String>,
    /// Outside the window: `hold` the send until it opens (default), or `drop` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside: Option<Outside>,
}

/// What happens to a send outside its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outside {
    Hold,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    /// Monday = 0.
    days: [bool; 7],
    /// Minutes after midnight; `to <= from` crosses midnight (`from == to`: the whole day).
    from: u32,
    to: u32,
}

/// A compiled window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    tz: Tz,
    spans: Vec<Span>,
    /// True: sending is allowed within the spans; false: not within them.
    active: bool,
    pub outside: Outside,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, String> {
    DAYS.iter()
        .position(|d| s.eq_ignore_ascii_case(d))
        .ok_or_else(|| format!("`{s}` is not a day (mon, tue, wed, thu, fri, sat, sun)"))
}

fn minutes(s: &str) -> Result<u32, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not a time (HH:MM)"))?;
    let (h, m): (u32, u32) = (
        h.parse()
            .map_err(|_| format!("`{s}` is not a time (HH:MM)"))?,
        m.parse()
            .map_err(|_| format!("`{s}` is not a time (HH:MM)"))?,
    );
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(format!("`{s}` is not a time of day"));
    }
    Ok(h * 60 + m)
}

fn span(text: &str) -> Result<Span, String> {
    let mut days = [true; 7];
    let (mut from, mut to) = (0, 0);
    let mut seen_days = false;
    let mut seen_time = false;
    for part in text.split_whitespace() {
        if part.contains(':') {
            if seen_time {
                return Err(format!("`{text}` has two time ranges"));
            }
            let (a, b) = part
                .split_once('-')
                .ok_or_else(|| format!("`{part}` is not a time range (HH:MM-HH:MM)"))?;
            from = minutes(a)?;
            to = minutes(b)? % (24 * 60);
            seen_time = true;
        } else {
            if seen_days {
                return Err(format!("`{text}` has two day lists"));
            }
            days = [false; 7];
            for item in part.split(',') {
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        let mut d = a;
                        loop {
                            days[d] = true;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => days[day(item)?] = true,
                }
            }
            seen_days = true;
        }
    }
    if !seen_days && !seen_time {
        return Err("an empty span; write e.g. `mon-fri 09:00-18:00`".into());
    }
    Ok(Span { days, from, to })
}

impl Window {
    /// Compiles a window; the error says what is wrong (for a `file:line:col` diagnostic).
    pub fn compile(spec: &WindowSpec) -> Result<Window, String> {
        let tz: Tz = match &spec.timezone {
            None => Tz::UTC,
            Some(t) => t
                .parse()
                .map_err(|_| format!("`{t}` is not a time zone (e.g. `Europe/Berlin`)"))?,
        };
        let (active, list) = match (spec.active.is_empty(), spec.muted.is_empty()) {
            (false, true) => (true, &spec.active),
            (true, false) => (false, &spec.muted),
            (false, false) => return Err("give `active` or `muted`, not both".into()),
            (true, true) => {
                return Err("a window needs `active` or `muted` spans, e.g. `active: [\"mon-fri 09:00-18:00\"]`".into())
            }
        };
        let spans = list.iter().map(|s| span(s)).collect::<Result<_, _>>()?;
        Ok(Window {
            tz,
            spans,
            active,
            outside: spec.outside.unwrap_or(Outside::Hold),
        })
    }

    fn within(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.tz);
        let wd = local.weekday().num_days_from_monday() as usize;
        let yesterday = (wd + 6) % 7;
        let m = local.hour() * 60 + local.minute();
        self.spans.iter().any(|s| {
            if s.from == s.to {
                s.days[wd]
            } else if s.from < s.to {
                s.days[wd] && m >= s.from && m < s.to
            } else {
                (s.days[wd] && m >= s.from) || (s.days[yesterday] && m < s.to)
            }
        })
    }

    /// Whether sending is allowed at `t`.
    pub fn open_at(&self, t: DateTime<Utc>) -> bool {
        self.within(t) == self.active
    }

    /// The first minute at or after `t` when the window is open (within 8 days; `None` for a
    /// window that never opens, e.g. muted all week).
    pub fn next_open(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.open_at(t) {
            return Some(t);
        }
        let start = t.with_second(0)?.with_nanosecond(0)?;
        (1..=8 * 24 * 60)
            .map(|i| start + Duration::minutes(i))
            .find(|m| self.open_at(*m))
    }
}

/// Unix ms of `t` (UTC).
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// A UTC time from unix ms.
pub fn at_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn w(active: &[&str], muted: &[&str], tz: &str) -> Window {
        Window::compile(&WindowSpec {
            timezone: Some(tz.into()),
            active: active.iter().map(|s| s.to_string()).collect(),
            muted: muted.iter().map(|s| s.to_string()).collect(),
            outside: None,
        })
        .unwrap()
    }

    #[test]
    fn office_hours_in_berlin() {
        let o = w(&["mon-fri 09:00-18:00"], &[], "Europe/Berlin");
        // 2026-12-07 is a Monday; Berlin is UTC+1 in December.
        assert!(o.open_at(utc("2026-12-07T08:00:00Z")), "09:00 Berlin");
        assert!(!o.open_at(utc("2026-12-07T07:59:00Z")));
        assert!(
            !o.open_at(utc("2026-12-07T17:00:00Z")),
            "18:00 Berlin is closed"
        );
        assert!(!o.open_at(utc("2026-12-05T10:00:00Z")), "a Saturday");
        // Friday evening → Monday 09:00 Berlin.
        assert_eq!(
            o.next_open(utc("2026-12-04T18:30:00Z")),
            Some(utc("2026-12-07T08:00:00Z"))
        );
    }

    #[test]
    fn muted_nights_cross_midnight() {
        let n = w(&[], &["22:00-06:00"], "UTC");
        assert!(!n.open_at(utc("2026-12-07T23:00:00Z")));
        assert!(!n.open_at(utc("2026-12-08T05:59:00Z")));
        assert!(n.open_at(utc("2026-12-08T06:00:00Z")));
        assert_eq!(
            n.next_open(utc("2026-12-07T22:30:10Z")),
            Some(utc("2026-12-08T06:00:00Z"))
        );
        let weekend = w(&[], &["sat-sun"], "UTC");
        assert!(!weekend.open_at(utc("2026-12-06T12:00:00Z")));
        assert!(weekend.open_at(utc("2026-12-07T00:00:00Z")));
        assert!(w(&[], &["mon-sun"], "UTC")
            .next_open(utc("2026-12-07T00:00:00Z"))
            .is_none());
    }

    #[test]
    fn bad_windows_say_why() {
        let e = |a: &[&str], tz: &str| {
            Window::compile(&WindowSpec {
                timezone: Some(tz.into()),
                active: a.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .unwrap_err()
        };
        assert!(e(&["mon-fry"], "UTC").contains("`fry` is not a day"));
        assert!(e(&["09:00-25:00"], "UTC").contains("not a time of day"));
        assert!(e(&["9-17"], "UTC").contains("not a day"));
        assert!(e(&["mon"], "Mars/Olympus").contains("not a time zone"));
        assert!(e(&[], "UTC").contains("needs `active` or `muted`"));
    }
}

//! The `/status` page a browser gets: the same JSON `/status` answers, laid out for a person.
//!
//! It is rendered from that JSON and nothing else, so the page can never show what the JSON
//! does not (no secrets: sources and destinations appear by name, kind and state). Every text
//! from the rules or from upstream answers is HTML-escaped. Times are written in UTC on the
//! server and turned into the reader's local time (with "3 min ago") by a few lines of script;
//! without script the UTC text stays. Long diagnostics and errors wrap instead of widening the
//! page.

use std::fmt::Write;

use serde_json::Value;

/// Escapes text for HTML content and attribute values (`& < > " ' \` =`), with the escaper the
/// templates already use.
fn esc(s: &str) -> String {
    handlebars::html_escape(s)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => String::new(),
        v => esc(&v.to_string()),
    }
}

/// A unix-ms time as `<time>`: UTC text, made local in the browser.
fn time(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "—".into();
    };
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => format!(
            "<time datetime=\"{}\" data-ms=\"{ms}\">{}</time>",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            t.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => "—".into(),
    }
}

/// `3d 4h`, `12m 5s`: an uptime for a person.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn num(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// A badge: `ok`, `warn` or `bad`.
fn badge(class: &str, label: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(label))
}

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#fff;--head:#f6f8fa;\
--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e}\
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#8d96a0;--line:#30363d;--bg:#0d1117;\
--head:#161b22;--ok:#3fb950;--warn:#d29922;--bad:#f85149}}\
*{box-sizing:border-box}body{font:14px/1.45 system-ui,sans-serif;margin:0;padding:1.5em 2em;\
color:var(--fg);background:var(--bg);max-width:1400px}\
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .5em;border-bottom:1px solid var(--line);padding-bottom:.2em}\
.meta{color:var(--muted);margin:0 0 1em}.meta b{color:var(--fg)}\
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid var(--line);border-radius:6px;padding:.5em .9em;min-width:9em}\
.card .n{font-size:1.5em;font-weight:600}.card .l{color:var(--muted);font-size:.85em}\
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}\
th{background:var(--head);font-weight:600;white-space:nowrap}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
td.err{max-width:40em;overflow-wrap:anywhere;color:var(--bad)}.muted{color:var(--muted)}\
pre.diag{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--head);border:1px solid var(--line);border-radius:6px;padding:.6em .8em;margin:.5em 0}\
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.85em;font-weight:600;border:1px solid currentColor}\
.badge.ok{color:var(--ok)}.badge.warn{color:var(--warn)}.badge.bad{color:var(--bad)}\
code{font-family:ui-monospace,monospace;font-size:.92em}";

/// Turns the `<time>` elements into the reader's local time, with how long ago (or until).
const SCRIPT: &str = "\
for(const t of document.querySelectorAll('time[data-ms]')){const ms=+t.dataset.ms;const d=new Date(ms);\
const s=Math.round((Date.now()-ms)/1000);const a=Math.abs(s);\
const r=a<60?a+' s':a<3600?Math.round(a/60)+' min':a<86400?Math.round(a/3600)+' h':Math.round(a/86400)+' d';\
t.title=t.textContent;t.textContent=d.toLocaleString()+' ('+(s>=0?r+' ago':'in '+r)+')';}";

/// The page for the `/status` JSON `v`.
pub fn render(v: &Value) -> String {
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!doctype html><html lang=en><meta charset=utf-8>");
    h.push_str("<meta name=viewport content=\"width=device-width,initial-scale=1\">");
    let _ = write!(
        h,
        "<title>switchyard status</title><style>{STYLE}</style><body>"
    );
    let ready = v["ready"] == true;
    let _ = write!(
        h,
        "<h1>switchyard {}</h1><p class=meta>version <b>{}</b> · commit <code>{}</code> · up <b>{}</b> since {} · {} · rules from <code>{}</code> · <a href=\"/metrics\">metrics</a> · <a href=\"/status?format=json\" id=json>JSON</a></p>",
        if ready { badge("ok", "ready") } else { badge("bad", "not ready") },
        text(&v["version"]),
        text(&v["commit"]),
        duration(v["uptime_seconds"].as_u64().unwrap_or(0)),
        time(&v["started_at"]),
        format_args!("page rendered {}", time(&v["now"])),
        text(&v["rules_dir"]),
    );
    cards(&mut h, v);
    reload(&mut h, &v["reload"]);
    destinations(&mut h, &v["destinations"]);
    sources(&mut h, &v["sources"]);
    keys(&mut h, &v["keys"]);
    silences(&mut h, &v["silences"]);
    groups(&mut h, &v["groups"]);
    schedules(&mut h, &v["schedules"]);
    kafka(&mut h, &v["kafka"]);
    store(&mut h, &v["store"]);
    rules(&mut h, &v["rules"]);
    let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

fn cards(h: &mut String, v: &Value) {
    let dests = v["destinations"].as_object();
    let sum = |k: &str| -> i64 { dests.into_iter().flatten().map(|(_, d)| num(&d[k])).sum() };
    let card = |h: &mut String, n: i64, label: &str, class: &str| {
        let _ = write!(
            h,
            "<div class=\"card {class}\"><div class=n>{n}</div><div class=l>{}</div></div>",
            esc(label)
        );
    };
    h.push_str("<div class=cards>");
    card(
        h,
        v["rules"].as_array().map_or(0, |r| r.len() as i64),
        "rules",
        "",
    );
    card(h, num(&v["queue_depth"]), "queued", "");
    card(h, sum("in_flight"), "in flight", "");
    card(h, sum("retrying"), "retrying", "");
    card(h, sum("delivered"), "delivered since start", "");
    card(h, sum("dead_letters"), "dead letters", "");
    card(
        h,
        num(&v["throttle"]["suppressed_since_start"]),
        "throttled since start",
        "",
    );
    card(
        h,
        num(&v["throttle"]["active_keys"]),
        "active throttle keys",
        "",
    );
    card(h, num(&v["keys"]["open"]), "open message keys", "");
    h.push_str("</div>");
}

fn reload(h: &mut String, r: &Value) {
    h.push_str("<h2 id=reload>Last reload</h2>");
    if r.is_null() {
        h.push_str("<p class=muted>unknown</p>");
        return;
    }
    let ok = r["ok"] == true;
    let _ = write!(
        h,
        "<p>{} {} by <b>{}</b> in {:.1} ms · serving the rules loaded {} · {} reloads succeeded, {} refused</p>",
        if ok { badge("ok", "ok") } else { badge("bad", "refused: the previous rules keep serving") },
        time(&r["at"]),
        text(&r["trigger"]),
        r["duration_ms"].as_f64().unwrap_or(0.0),
        time(&r["serving_since"]),
        num(&r["reloads_ok"]),
        num(&r["reloads_failed"]),
    );
    if let Some(d) = r["diagnostics"].as_array().filter(|d| !d.is_empty()) {
        h.push_str("<pre class=diag>");
        for l in d {
            h.push_str(&text(l));
            h.push('\n');
        }
        h.push_str("</pre>");
    }
}

fn destinations(h: &mut String, d: &Value) {
    h.push_str("<h2 id=destinations>Destinations</h2><table><tr><th>name</th><th>kind</th><th>state</th><th class=n>queued</th><th class=n>in flight</th><th class=n>retrying</th><th class=n>delivered</th><th class=n>failed attempts</th><th class=n>dead letters</th><th>last error</th></tr>");
    for (n, d) in d.as_object().into_iter().flatten() {
        let state = if let Some(why) = d["disabled_reason"].as_str() {
            format!(
                "{}<div class=muted>{}</div>",
                badge("bad", "disabled"),
                esc(why)
            )
        } else if let Some(f) = d["falls_back_to"].as_str() {
            badge("warn", &format!("delivers to {f}"))
        } else if num(&d["retrying"]) > 0 {
            badge("warn", "retrying")
        } else {
            badge("ok", "ok")
        };
        let err = match d["last_error"].as_str() {
            Some(e) => format!(
                "{}<div class=muted>{}</div>",
                esc(e),
                time(&d["last_error_at"])
            ),
            None => "<span class=muted>none</span>".into(),
        };
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td>{state}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=err>{err}</td></tr>",
            esc(n),
            text(&d["kind"]),
            num(&d["queue_depth"]),
            num(&d["in_flight"]),
            num(&d["retrying"]),
            num(&d["delivered"]),
            num(&d["failed_attempts"]),
            num(&d["dead_letters"]),
        );
    }
    h.push_str("</table>");
}

fn sources(h: &mut String, s: &Value) {
    h.push_str("<h2 id=sources>Sources</h2><table><tr><th>name</th><th>kind</th><th>takes</th><th>state</th></tr>");
    for (n, s) in s.as_object().into_iter().flatten() {
        let takes = match s["path"].as_str() {
            Some(p) => format!("<code>POST {}</code>", esc(p)),
            None => "Kafka topics".into(),
        };
        let state = match s["disabled_reason"].as_str() {
            Some(why) => format!(
                "{}<div class=muted>{}</div>",
                badge("bad", "disabled"),
                esc(why)
            ),
            None => badge("ok", "accepting"),
        };
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td>{takes}</td><td>{state}</td></tr>",
            esc(n),
            text(&s["kind"]),
        );
    }
    h.push_str("</table>");
}

fn keys(h: &mut String, k: &Value) {
    let Some(list) = k["list"].as_array().filter(|l| !l.is_empty()) else {
        return;
    };
    let _ = write!(
        h,
        "<h2 id=keys>Open message keys ({})</h2><table><tr><th>destination</th><th>key</th><th>channel</th><th>message ts</th><th>posted</th></tr>",
        num(&k["open"])
    );
    for x in list {
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&x["destination"]),
            text(&x["key"]),
            text(&x["channel"]),
            text(&x["ts"]),
            time(&x["opened_at"]),
        );
    }
    h.push_str("</table>");
}

fn silences(h: &mut String, s: &Value) {
    let Some(s) = s.as_array().filter(|s| !s.is_empty()) else {
        return;
    };
    h.push_str("<h2 id=silences>Silences</h2><table><tr><th>id</th><th>state</th><th>rule</th><th>matchers</th><th>from</th><th>until</th><th>by</th><th>comment</th><th class=n>suppressed</th></tr>");
    for x in s {
        let matchers: Vec<String> = x["matchers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("<code>{}</code>", text(m)))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td></tr>",
            num(&x["id"]),
            if x["active"] == true { badge("warn", "active") } else { badge("ok", "pending") },
            if x["rule"].is_null() { "<span class=muted>every rule</span>".to_string() } else { text(&x["rule"]) },
            matchers.join("<br>"),
            time(&x["starts_at"]),
            time(&x["ends_at"]),
            text(&x["author"]),
            text(&x["comment"]),
            num(&x["suppressed"]),
        );
    }
    h.push_str("</table>");
}

fn groups(h: &mut String, g: &Value) {
    let Some(g) = g.as_array().filter(|g| !g.is_empty()) else {
        return;
    };
    h.push_str("<h2 id=groups>Pending digests</h2><table><tr><th>rule</th><th>group</th><th class=n>items</th><th>oldest item</th><th>last digest</th><th>next digest</th></tr>");
    for x in g {
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&x["rule"]),
            text(&x["group"]),
            num(&x["items"]),
            time(&x["first_at"]),
            time(&x["last_digest_at"]),
            time(&x["due_at"]),
        );
    }
    h.push_str("</table>");
}

fn schedules(h: &mut String, s: &Value) {
    let Some(s) = s.as_object().filter(|s| !s.is_empty()) else {
        return;
    };
    h.push_str("<h2 id=schedules>Schedules</h2><table><tr><th>name</th><th>cron</th><th>time zone</th><th>next run</th><th>next run in its zone</th></tr>");
    for (n, s) in s {
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(n),
            text(&s["cron"]),
            text(&s["timezone"]),
            time(&s["next_run"]),
            text(&s["next_run_local"]),
        );
    }
    h.push_str("</table>");
}

/// The store; for a fleet on PostgreSQL, the replicas alive and the shared queue.
fn store(h: &mut String, s: &Value) {
    if s["kind"] != "postgres" {
        let _ = write!(
            h,
            "<h2 id=store>Store</h2><p class=meta>SQLite, <code>{}</code> (this engine alone)</p>",
            text(&s["location"])
        );
        return;
    }
    let _ = write!(
        h,
        "<h2 id=store>Replicas</h2><p class=meta>PostgreSQL <code>{}</code> · this replica <code>{}</code> · lease {} s · <b>{}</b> queued across the fleet</p>",
        text(&s["location"]),
        text(&s["replica"]),
        text(&s["lease_seconds"]),
        num(&s["queue_depth"]),
    );
    let Some(list) = s["replicas"].as_array() else {
        let _ = write!(
            h,
            "<p class=err>cannot read the replicas: {}</p>",
            text(&s["replicas"]["error"])
        );
        return;
    };
    h.push_str("<table><tr><th>replica</th><th>host</th><th>version</th><th>started</th><th>last heartbeat</th><th class=n>holding</th></tr>");
    for r in list {
        let me = r["id"] == s["replica"];
        let _ = write!(
            h,
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td></tr>",
            text(&r["id"]),
            if me { " (this one)" } else { "" },
            text(&r["host"]),
            text(&r["version"]),
            time(&r["started_at"]),
            time(&r["seen_at"]),
            num(&r["holding"]),
        );
    }
    h.push_str("</table>");
}

fn kafka(h: &mut String, k: &Value) {
    let Some(k) = k.as_object().filter(|k| !k.is_empty()) else {
        return;
    };
    h.push_str("<h2 id=kafka>Kafka</h2><table><tr><th>source</th><th>group</th><th>partition</th><th class=n>committed offset</th><th class=n>lag</th><th class=n>consumed</th><th class=n>rebalances</th><th>last error</th></tr>");
    for (n, s) in k {
        let committed = s["committed"].as_object();
        let lag = s["lag"].as_object();
        let mut parts: Vec<&String> = committed
            .into_iter()
            .flatten()
            .chain(lag.into_iter().flatten())
            .map(|(p, _)| p)
            .collect();
        parts.sort();
        parts.dedup();
        let row = |h: &mut String, part: String, com: String, lag: String| {
            let _ = write!(
                h,
                "<tr><td><b>{}</b></td><td>{}</td><td>{part}</td><td class=n>{com}</td><td class=n>{lag}</td><td class=n>{}</td><td class=n>{}</td><td class=err>{}</td></tr>",
                esc(n),
                text(&s["group"]),
                num(&s["consumed"]),
                num(&s["rebalances"]),
                text(&s["last_error"]),
            );
        };
        if parts.is_empty() {
            let topics: Vec<String> = s["topics"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            row(
                h,
                format!(
                    "<span class=muted>none assigned ({})</span>",
                    topics.join(", ")
                ),
                String::new(),
                String::new(),
            );
        }
        for p in parts {
            let com = committed
                .and_then(|c| c.get(p))
                .map(text)
                .unwrap_or_default();
            let l = lag.and_then(|c| c.get(p)).map(text).unwrap_or_default();
            row(h, format!("<code>{}</code>", esc(p)), com, l);
        }
    }
    h.push_str("</table>");
}

fn rules(h: &mut String, r: &Value) {
    h.push_str("<h2 id=rules>Rules</h2><table><tr><th>id</th><th>on</th><th>sends to</th><th>file</th></tr>");
    for r in r.as_array().into_iter().flatten() {
        let list = |v: &Value| -> String {
            v.as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td><code>{}</code></td><td>{}</td><td class=muted>{}</td></tr>",
            text(&r["id"]),
            list(&r["on"]),
            list(&r["destinations"]),
            text(&r["file"]),
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn everything_from_outside_is_escaped() {
        let v = json!({
            "version": "0.1.0", "ready": true, "uptime_seconds": 3725, "now": 0, "started_at": 0,
            "rules": [{"id": "<b>x</b>", "on": ["port/*"], "destinations": ["d"], "file": "a.yaml"}],
            "destinations": {"d": {"kind": "slack", "last_error": "<script>alert(1)</script>", "last_error_at": 1}},
            "sources": {}, "reload": {"ok": false, "diagnostics": ["a.yaml:1:2: error <i>"]},
        });
        let h = render(&v);
        assert!(!h.contains("<script>alert"), "{h}");
        assert!(!h.contains("<b>x</b>") && !h.contains("<i>"));
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("1h 2m"));
    }

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3 * 3600 + 120), "3h 2m");
        assert_eq!(duration(2 * 86_400 + 3 * 3600), "2d 3h");
    }
}

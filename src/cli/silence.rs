//! `switchyard silence add|list|expire`: against a running server's admin API (`--server`), or
//! the data directory of a stopped engine (a running one holds its lock, and the error says to
//! use `--server`).
use std::process::ExitCode;

use serde_json::json;
use switchyard::outbox::{now_ms, Outbox};
use switchyard::silence::{NewSilence, Silence};

use crate::{Format, SilenceAction, SilenceWhere};

pub fn run(action: SilenceAction) -> ExitCode {
    match go(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn rfc3339(what: &str, t: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|_| format!("--{what} `{t}` is not an RFC 3339 time (e.g. 2026-12-05T18:00:00Z)"))
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Runs `f` on the outbox of a stopped engine's data directory, or on a fleet's PostgreSQL
/// database (`--store`; the replicas may run: they read silences from it).
fn offline<T>(
    at: &SilenceWhere,
    f: impl FnOnce(Outbox) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>>>>,
) -> Result<T, String> {
    let store = crate::database_url(at.store.clone())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let outbox = Outbox::open_tool(store.as_ref(), &at.data_dir).await?;
        f(outbox).await
    })
}

fn show(s: &Silence) {
    println!(
        "{:>4}  {:<20}  {:<20}  {:<20}  {:<12}  {}{}",
        s.id,
        s.rule.as_deref().unwrap_or("(every rule)"),
        when(s.starts_at),
        when(s.ends_at),
        s.author,
        s.matchers.join(" and "),
        if s.comment.is_empty() {
            String::new()
        } else {
            format!("  # {}", s.comment)
        }
    );
}

fn go(action: SilenceAction) -> Result<(), String> {
    match action {
        SilenceAction::Add {
            at,
            rule,
            matchers,
            duration,
            until,
            start,
            author,
            comment,
            rules,
        } => {
            let new = NewSilence {
                rule,
                matchers,
                key: None,
                starts_at: start.map(|t| rfc3339("start", &t)).transpose()?,
                ends_at: until.map(|t| rfc3339("until", &t)).transpose()?,
                duration,
                author: author.unwrap_or_default(),
                comment,
            };
            let s: Silence = match &at.server {
                Some(server) => {
                    let body = serde_json::to_value(&new).map_err(|e| e.to_string())?;
                    let v = crate::cli::admin::call(server, "POST", "/-/silences", Some(body))?;
                    serde_json::from_value(v["silence"].clone()).map_err(|e| e.to_string())?
                }
                None => {
                    let opts =
                        switchyard::config::LoadOptions::new(switchyard::config::Mode::Check);
                    let (rs, _) = switchyard::config::load_dir(&rules, &opts);
                    let rs = rs.ok_or_else(|| {
                        format!(
                            "the rules in {} do not load, so the rule cannot be checked; run `switchyard check {}`",
                            rules.display(),
                            rules.display()
                        )
                    })?;
                    let (starts, ends) =
                        new.validate(now_ms(), |r| rs.rules.iter().any(|x| x.id == r))?;
                    offline(&at, move |o| {
                        Box::pin(async move {
                            o.add_silence(new, starts, ends)
                                .await
                                .map_err(|e| e.to_string())
                        })
                    })?
                }
            };
            println!("silence {} added, until {}", s.id, when(s.ends_at));
        }
        SilenceAction::List { at, all, format } => {
            let within = if all { 24 * 3600 * 1000 } else { 0 };
            let list: Vec<Silence> = match &at.server {
                Some(server) => {
                    let v = crate::cli::admin::call(
                        server,
                        "GET",
                        &format!("/-/silences?ended_within={within}"),
                        None,
                    )?;
                    serde_json::from_value(v["silences"].clone()).map_err(|e| e.to_string())?
                }
                None => offline(&at, move |o| {
                    Box::pin(async move { o.silences(within).await.map_err(|e| e.to_string()) })
                })?,
            };
            if format == Format::Json {
                println!("{}", json!(list));
            } else if list.is_empty() {
                println!("no silences");
            } else {
                println!(
                    "{:>4}  {:<20}  {:<20}  {:<20}  {:<12}  matchers",
                    "id", "rule", "starts", "ends", "author"
                );
                for s in &list {
                    show(s);
                }
            }
        }
        SilenceAction::Expire { at, id } => {
            let s: Option<Silence> = match &at.server {
                Some(server) => {
                    let v = crate::cli::admin::call(
                        server,
                        "POST",
                        &format!("/-/silences/{id}/expire"),
                        None,
                    )?;
                    serde_json::from_value(v["silence"].clone()).map_err(|e| e.to_string())?
                }
                None => offline(&at, move |o| {
                    Box::pin(async move { o.expire_silence(id).await.map_err(|e| e.to_string()) })
                })?,
            };
            let s = s.ok_or_else(|| format!("no silence {id}"))?;
            println!("silence {} ended at {}", s.id, when(s.ends_at));
        }
    }
    Ok(())
}

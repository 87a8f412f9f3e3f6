//! `switchyard dead-letters`: against the data directory, or a running server's admin API.
use std::process::ExitCode;

use crate::{DeadLetterAction, DlArgs, Format};
use switchyard::outbox::{list_dead, purge_dead, read_dead, DeadLetter, DeadLetterFilter, Outbox};

fn filter(a: &DlArgs) -> Result<DeadLetterFilter, String> {
    let since = match &a.since {
        None => None,
        Some(s) => Some(
            switchyard::outbox::now_ms()
                - switchyard::config::parse_duration(s)
                    .ok_or_else(|| format!("`{s}` is not a duration (e.g. `2h`)"))?
                    .as_millis() as i64,
        ),
    };
    Ok(DeadLetterFilter {
        destination: a.destination.clone(),
        rule: a.rule.clone(),
        since,
        until: None,
        limit: a.limit,
    })
}

fn server_call(
    a: &DlArgs,
    server: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let f = filter(a)?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(d) = &f.destination {
        q.append_pair("destination", d);
    }
    if let Some(r) = &f.rule {
        q.append_pair("rule", r);
    }
    if let Some(s) = f.since {
        q.append_pair("since", &s.to_string());
    }
    if let Some(l) = f.limit {
        q.append_pair("limit", &l.to_string());
    }
    let q = q.finish();
    let path = if method == "GET" && !q.is_empty() {
        format!("{path}?{q}")
    } else {
        path.to_string()
    };
    crate::cli::admin::call(server, method, &path, body)
}

fn print_list(list: &[DeadLetter], format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(list).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:>6}  {:<20}  {:<18}  {:<24}  {:>3}  last error",
        "id", "died", "destination", "rule", "try"
    );
    for d in list {
        let when = chrono::DateTime::from_timestamp_millis(d.dead_at)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        println!(
            "{:>6}  {:<20}  {:<18}  {:<24}  {:>3}  {}",
            d.id,
            when,
            d.destination,
            d.rule,
            d.attempts.len(),
            switchyard::render::blockkit::truncate_chars(&d.last_error, 80)
        );
    }
}

pub fn run(action: DeadLetterAction) -> ExitCode {
    match go(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn db(a: &DlArgs) -> Result<std::path::PathBuf, String> {
    let p = a.data_dir.join("switchyard.db");
    if !p.exists() {
        return Err(format!(
            "no outbox database at {} (use --data-dir, or --server for a running engine)",
            p.display()
        ));
    }
    Ok(p)
}

/// The fleet's PostgreSQL outbox when `--store` (or its environment) names one.
fn fleet_outbox(a: &DlArgs) -> Result<Option<(Outbox, tokio::runtime::Runtime)>, String> {
    let Some(url) = crate::database_url(a.store.clone())? else {
        return Ok(None);
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let outbox = rt.block_on(Outbox::open_tool(Some(&url), &a.data_dir))?;
    Ok(Some((outbox, rt)))
}

fn go(action: DeadLetterAction) -> Result<(), String> {
    if action.args().server.is_none() {
        if let Some((outbox, rt)) = fleet_outbox(action.args())? {
            return rt.block_on(fleet(&outbox, action));
        }
    }
    match action {
        DeadLetterAction::List { args, format } => {
            let list: Vec<DeadLetter> = match &args.server {
                Some(s) => serde_json::from_value(
                    server_call(&args, s, "GET", "/-/dead-letters", None)?["dead_letters"].clone(),
                )
                .map_err(|e| e.to_string())?,
                None => list_dead(&db(&args)?, &filter(&args)?)?,
            };
            print_list(&list, format);
        }
        DeadLetterAction::Show { args, id } => {
            let d: Option<DeadLetter> = match &args.server {
                Some(s) => {
                    let v = server_call(&args, s, "GET", &format!("/-/dead-letters/{id}"), None)?;
                    serde_json::from_value(v["dead_letter"].clone()).map_err(|e| e.to_string())?
                }
                None => read_dead(&db(&args)?, id)?,
            };
            let d = d.ok_or_else(|| format!("no dead letter {id}"))?;
            println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        }
        DeadLetterAction::Replay { args, ids } => match &args.server {
            Some(s) => {
                let body = if ids.is_empty() {
                    serde_json::to_value(filter_body(&args)?).unwrap_or_default()
                } else {
                    serde_json::json!({"ids": ids})
                };
                let v = server_call(&args, s, "POST", "/-/dead-letters/replay", Some(body))?;
                let pairs = |k: &str, b: &str| -> Vec<(i64, String)> {
                    v[k].as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let d = p["dead_letter"].as_i64().unwrap_or(0);
                            let other = match &p[b] {
                                serde_json::Value::String(s) => s.clone(),
                                x => x.to_string(),
                            };
                            (d, other)
                        })
                        .collect()
                };
                print_replay(
                    &pairs("requeued", "job"),
                    &pairs("skipped", "reason"),
                    "they are being sent now",
                );
            }
            None => {
                let path = db(&args)?;
                let ids = if ids.is_empty() {
                    list_dead(&path, &filter(&args)?)?
                        .into_iter()
                        .map(|d| d.id)
                        .collect()
                } else {
                    ids
                };
                let outbox = Outbox::open(&args.data_dir, usize::MAX)?;
                let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
                let done = rt.block_on(outbox.replay(ids))?;
                print_replayed(&done, "they go out when the engine starts");
            }
        },
        DeadLetterAction::Purge { args } => match &args.server {
            Some(s) => {
                let v = server_call(
                    &args,
                    s,
                    "POST",
                    "/-/dead-letters/purge",
                    Some(serde_json::to_value(filter_body(&args)?).unwrap_or_default()),
                )?;
                println!("purged {}", v["purged"]);
            }
            None => {
                let n = purge_dead(&db(&args)?, &filter(&args)?)?;
                println!("purged {n}");
            }
        },
    }
    Ok(())
}

/// A dead-letter command on a fleet's PostgreSQL outbox.
async fn fleet(outbox: &Outbox, action: DeadLetterAction) -> Result<(), String> {
    match action {
        DeadLetterAction::List { args, format } => {
            print_list(&outbox.dead_letters(filter(&args)?).await?, format);
        }
        DeadLetterAction::Show { id, .. } => {
            let d = outbox
                .dead_letter(id)
                .await?
                .ok_or_else(|| format!("no dead letter {id}"))?;
            println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        }
        DeadLetterAction::Replay { args, ids } => {
            let ids = if ids.is_empty() {
                outbox
                    .dead_letters(filter(&args)?)
                    .await?
                    .into_iter()
                    .map(|d| d.id)
                    .collect()
            } else {
                ids
            };
            let done = outbox.replay(ids).await?;
            print_replayed(&done, "a running replica takes them at its next heartbeat");
        }
        DeadLetterAction::Purge { args } => {
            println!("purged {}", outbox.purge(filter(&args)?).await?);
        }
    }
    Ok(())
}

/// Prints what a replay of the outbox itself did.
fn print_replayed(done: &switchyard::outbox::Replayed, when: &str) {
    let requeued: Vec<(i64, String)> = done
        .requeued
        .iter()
        .map(|(d, j)| (*d, j.to_string()))
        .collect();
    print_replay(&requeued, &done.skipped, when);
}

/// Prints what a replay did: each dead letter and the job it became, and what was skipped.
fn print_replay(requeued: &[(i64, String)], skipped: &[(i64, String)], when: &str) {
    for (d, job) in requeued {
        println!("dead letter {d} -> job {job}");
    }
    for (d, why) in skipped {
        println!("dead letter {d} skipped: {why}");
    }
    println!(
        "queued {} message(s) again; {when}; one that fails for good again is a dead letter under its old id",
        requeued.len()
    );
}

fn filter_body(a: &DlArgs) -> Result<serde_json::Value, String> {
    let f = filter(a)?;
    Ok(
        serde_json::json!({"destination": f.destination, "rule": f.rule, "since": f.since, "limit": f.limit}),
    )
}

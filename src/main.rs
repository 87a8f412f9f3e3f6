//! The `switchyard` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use switchyard::config::diag::{self, Diagnostic};
use switchyard::config::{LoadOptions, Mode};
use switchyard::sources::Request;

// glibc's malloc serialises on arena locks under many small allocations from several threads
// (JSON values, HTTP buffers); the profile of the load benchmark showed ~18% of CPU in
// malloc/free and lock waits. mimalloc removes most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Port and Coder webhooks in, Slack Block Kit out, decided by YAML rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Bounds on what HTTP peers may hold (`serve`).
#[derive(clap::Args, Clone)]
struct LimitArgs {
    /// Most connections open at once (also kept under the file-descriptor limit).
    #[arg(long, default_value_t = 10_000, env = "SWITCHYARD_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Time for a request's head to arrive, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, env = "SWITCHYARD_HEADER_TIMEOUT")]
    header_timeout: std::time::Duration,
    /// Time for a request's body to arrive once its head is in.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "SWITCHYARD_BODY_TIMEOUT")]
    body_timeout: std::time::Duration,
    /// A connection with nothing read or written for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, env = "SWITCHYARD_IDLE_TIMEOUT")]
    idle_timeout: std::time::Duration,
    /// Most request-body bytes held in memory at once, over all connections (MiB).
    #[arg(long, default_value_t = 64, env = "SWITCHYARD_MAX_BODY_MIB_IN_FLIGHT")]
    max_body_mib_in_flight: usize,
}

#[derive(clap::Args, Clone)]
struct DlArgs {
    #[arg(long, default_value = "data", env = "SWITCHYARD_DATA_DIR")]
    data_dir: PathBuf,
    /// A running server's base URL (e.g. http://127.0.0.1:8080); uses its admin API.
    #[arg(long, env = "SWITCHYARD_SERVER")]
    server: Option<String>,
    #[arg(long)]
    destination: Option<String>,
    #[arg(long)]
    rule: Option<String>,
    /// Only dead letters from the last DURATION (e.g. `2h`).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List dead letters (newest first).
    List {
        #[command(flatten)]
        args: DlArgs,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one dead letter with its message and every attempt.
    Show {
        #[command(flatten)]
        args: DlArgs,
        id: i64,
    },
    /// Queue dead letters for delivery again (all matching the filters, or the given ids).
    Replay {
        #[command(flatten)]
        args: DlArgs,
        ids: Vec<i64>,
    },
    /// Delete dead letters matching the filters.
    Purge {
        #[command(flatten)]
        args: DlArgs,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Validate a rules directory and run its rule tests (exit 0 valid, 1 invalid, 2 usage).
    Check {
        /// The rules directory.
        #[arg(default_value = "rules", env = "SWITCHYARD_RULES")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Show what the rules would do with one event: which rules match, why not, and the
    /// rendered messages. Nothing is sent.
    Simulate {
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
        /// The source that receives the event (a source name, or a kind with one source).
        #[arg(long)]
        source: String,
        /// A request header, `Name: value` (e.g. `RUN_ID: r_123`); repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Stand-in for a `with:` query result, `NAME=FILE.json` (a list of entities or a search
        /// answer); repeatable.
        #[arg(long = "with")]
        with: Vec<String>,
        /// The raw event body (a file).
        event: PathBuf,
    },
    /// Run the engine: receive webhooks, route them, deliver the messages.
    Serve {
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080", env = "SWITCHYARD_LISTEN")]
        listen: std::net::SocketAddr,
        /// Where the durable outbox and dead letters live.
        #[arg(long, default_value = "data", env = "SWITCHYARD_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SWITCHYARD_LOG_FORMAT")]
        log_format: LogFormat,
        /// Deliveries waiting before new events are answered 503.
        #[arg(long, default_value_t = 100_000, env = "SWITCHYARD_MAX_PENDING")]
        max_pending: usize,
        /// Seconds to let attempts in progress finish on SIGTERM/SIGINT.
        #[arg(long, default_value_t = 10)]
        grace_seconds: u64,
        /// Do not watch the rules directory (reload with SIGHUP or POST /-/reload).
        #[arg(long)]
        no_watch: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Inspect, replay or purge dead letters (in the data directory, or via a running server).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Print the JSON Schema of a rules file.
    Schema,
    /// Sign a body as Port does and print the headers (for curl and local testing).
    Sign {
        /// Name of the environment variable holding the secret.
        #[arg(long, default_value = "PORT_CLIENT_SECRET")]
        secret_env: String,
        /// Unix timestamp to sign with (default: now).
        #[arg(long)]
        timestamp: Option<String>,
        /// Sign as Slack does (`X-Slack-Signature`) instead of Port.
        #[arg(long)]
        slack: bool,
        /// The body file.
        body: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            dir,
            format,
            deny_warnings,
        } => cmd_check(dir, format, deny_warnings),
        Command::Simulate {
            rules,
            source,
            headers,
            format,
            with,
            event,
        } => cmd_simulate(rules, source, headers, format, with, event),
        Command::Serve {
            rules,
            listen,
            data_dir,
            log_format,
            max_pending,
            grace_seconds,
            no_watch,
            limits,
        } => {
            init_logging(log_format);
            let admin_token = std::env::var("SWITCHYARD_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(switchyard::config::secret::Secret::new);
            let cfg = switchyard::server::ServeConfig {
                rules_dir: rules,
                listen,
                data_dir,
                max_pending,
                admin_token,
                grace: std::time::Duration::from_secs(grace_seconds),
                watch: !no_watch,
                limits: switchyard::server::ConnLimits {
                    max_connections: limits.max_connections.max(1),
                    header_timeout: limits.header_timeout,
                    body_timeout: limits.body_timeout,
                    idle_timeout: limits.idle_timeout,
                    max_body_bytes_in_flight: limits.max_body_mib_in_flight.max(1) << 20,
                },
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(switchyard::server::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::DeadLetters { action } => dead_letters::run(action),
        Command::Schema => {
            print!("{}", switchyard::config::spec::json_schema());
            ExitCode::SUCCESS
        }
        Command::Sign {
            secret_env,
            timestamp,
            slack,
            body,
        } => cmd_sign(secret_env, timestamp, slack, body),
    }
}

fn print_diagnostics(diags: &[Diagnostic], files: &[switchyard::config::LoadedFile]) {
    let color = std::io::stderr().is_terminal();
    let mut err = std::io::stderr().lock();
    for d in diags {
        if !d.is_error() {
            let _ = writeln!(err, "{}", d.one_line());
            continue;
        }
        let text = d
            .file
            .as_ref()
            .and_then(|f| files.iter().find(|x| &x.path == f))
            .map(|x| x.text.clone());
        let text = text.or_else(|| {
            d.file
                .as_ref()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .map(std::sync::Arc::from)
        });
        let _ = writeln!(err, "{}", diag::render(d, text.as_ref(), color));
    }
}

fn cmd_check(dir: PathBuf, format: Format, deny_warnings: bool) -> ExitCode {
    let (rs, report) = switchyard::check::run(&dir, &LoadOptions::new(Mode::Check));
    let warnings = report.diagnostics.iter().filter(|d| !d.is_error()).count();
    let ok = report.valid && !(deny_warnings && warnings > 0);
    match format {
        Format::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        }
        Format::Text => {
            let files = rs.as_ref().map(|r| r.files.clone()).unwrap_or_default();
            print_diagnostics(&report.diagnostics, &files);
            let errors = report.diagnostics.len() - warnings;
            if report.valid {
                println!(
                    "{}: {} rules, {} sources, {} destinations, {} templates; {}/{} rule tests passed; {warnings} warning(s)",
                    if ok { "ok" } else { "failed (warnings denied)" },
                    report.rules,
                    report.sources,
                    report.destinations,
                    report.templates,
                    report.tests_passed,
                    report.tests_run
                );
            } else {
                println!(
                    "invalid: {errors} error(s), {warnings} warning(s); {}/{} rule tests passed",
                    report.tests_passed, report.tests_run
                );
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn parse_headers(headers: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .ok_or_else(|| format!("header `{h}` is not `Name: value`"))
        })
        .collect()
}

fn cmd_simulate(
    rules: PathBuf,
    source: String,
    headers: Vec<String>,
    format: Format,
    with: Vec<String>,
    event: PathBuf,
) -> ExitCode {
    let mut stand_ins = serde_json::Map::new();
    for w in &with {
        match switchyard::simulate::read_with(w) {
            Ok((k, v)) => {
                stand_ins.insert(k, v);
            }
            Err(e) => {
                eprintln!("error: --with {e}");
                return ExitCode::from(2);
            }
        }
    }
    let (rs, diags) = switchyard::config::load_dir(&rules, &LoadOptions::new(Mode::Check));
    let Some(rs) = rs else {
        print_diagnostics(&diags, &[]);
        eprintln!(
            "the rules do not load; fix them first (`switchyard check {}`)",
            rules.display()
        );
        return ExitCode::from(1);
    };
    let headers = match parse_headers(&headers) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let body = match std::fs::read(&event) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", event.display());
            return ExitCode::from(2);
        }
    };
    let req = Request {
        headers: headers.into(),
        body: &body,
        path_token: None,
        signed: None,
    };
    match switchyard::simulate::simulate(&rs, &source, &req, &stand_ins) {
        Ok(sim) => {
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&sim).unwrap_or_default())
                }
                Format::Text => print!("{}", switchyard::simulate::to_text(&sim)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", event.display());
            ExitCode::from(1)
        }
    }
}

fn cmd_sign(secret_env: String, timestamp: Option<String>, slack: bool, body: PathBuf) -> ExitCode {
    let Ok(secret) = std::env::var(&secret_env) else {
        eprintln!(
            "error: environment variable {secret_env} is not set (it holds the signing secret)"
        );
        return ExitCode::from(2);
    };
    let body = match std::fs::read(&body) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", body.display());
            return ExitCode::from(2);
        }
    };
    let ts = timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp().to_string());
    if slack {
        println!("X-Slack-Request-Timestamp: {ts}");
        println!(
            "X-Slack-Signature: {}",
            switchyard::sources::slack::sign(&secret, &ts, &body)
        );
    } else {
        println!("X-Port-Timestamp: {ts}");
        println!(
            "X-Port-Signature: {}",
            switchyard::sources::port::sign(&secret, &ts, &body)
        );
    }
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

mod dead_letters {
    //! `switchyard dead-letters`: against the data directory, or a running server's admin API.
    use std::process::ExitCode;

    use super::{DeadLetterAction, DlArgs, Format};
    use switchyard::outbox::{list_dead, purge_dead, DeadLetter, DeadLetterFilter, Outbox};

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
        let token = std::env::var("SWITCHYARD_ADMIN_TOKEN")
            .map_err(|_| "set SWITCHYARD_ADMIN_TOKEN to use --server".to_string())?;
        let f = filter(a)?;
        let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = reqwest::Client::new();
            let url = format!("{}{path}", server.trim_end_matches('/'));
            let mut req = if method == "GET" {
                client.get(&url)
            } else {
                client.post(&url)
            };
            let mut q = Vec::new();
            if let Some(d) = &f.destination {
                q.push(("destination", d.clone()));
            }
            if let Some(r) = &f.rule {
                q.push(("rule", r.clone()));
            }
            if let Some(s) = f.since {
                q.push(("since", s.to_string()));
            }
            if let Some(l) = f.limit {
                q.push(("limit", l.to_string()));
            }
            if method == "GET" {
                req = req.query(&q);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req
                .bearer_auth(token)
                .send()
                .await
                .map_err(|e| format!("cannot reach {server}: {e}"))?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{status}: {}", v["reason"].as_str().unwrap_or("")));
            }
            Ok(v)
        })
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
            "id", "died (UTC)", "destination", "rule", "try"
        );
        for d in list {
            let when = chrono::DateTime::from_timestamp_millis(d.dead_at)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
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

    fn go(action: DeadLetterAction) -> Result<(), String> {
        match action {
            DeadLetterAction::List { args, format } => {
                let list: Vec<DeadLetter> = match &args.server {
                    Some(s) => serde_json::from_value(
                        server_call(&args, s, "GET", "/-/dead-letters", None)?["dead_letters"]
                            .clone(),
                    )
                    .map_err(|e| e.to_string())?,
                    None => list_dead(&db(&args)?, &filter(&args)?)?,
                };
                print_list(&list, format);
            }
            DeadLetterAction::Show { args, id } => {
                let list: Vec<DeadLetter> = match &args.server {
                    Some(s) => serde_json::from_value(
                        server_call(&args, s, "GET", "/-/dead-letters", None)?["dead_letters"]
                            .clone(),
                    )
                    .map_err(|e| e.to_string())?,
                    None => list_dead(
                        &db(&args)?,
                        &DeadLetterFilter {
                            limit: Some(1_000_000),
                            ..Default::default()
                        },
                    )?,
                };
                let d = list
                    .into_iter()
                    .find(|d| d.id == id)
                    .ok_or_else(|| format!("no dead letter {id}"))?;
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
                    println!("replayed {}", v["replayed"]);
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
                    let jobs = rt.block_on(outbox.replay(ids))?;
                    println!(
                        "queued {} message(s) again; they go out when the engine starts",
                        jobs.len()
                    );
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

    fn filter_body(a: &DlArgs) -> Result<serde_json::Value, String> {
        let f = filter(a)?;
        Ok(
            serde_json::json!({"destination": f.destination, "rule": f.rule, "since": f.since, "limit": f.limit}),
        )
    }
}

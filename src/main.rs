//! The `switchyard` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use switchyard::config::diag::{self, Diagnostic};
use switchyard::config::{LoadOptions, Mode};
use switchyard::sources::Request;

// glibc's malloc serialises on arena locks under many small allocations from several threads
// (JSON values, HTTP buffers); mimalloc does not (bench/PROFILE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `0.1.0 (commit 1a2b3c4d5e6f, release)`: what `--version` prints.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SWITCHYARD_GIT_COMMIT"),
    ", ",
    env!("SWITCHYARD_BUILD_PROFILE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "switchyard",
    version = VERSION,
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

#[derive(Subcommand)]
enum BlueprintsAction {
    /// Fetch every blueprint with a `port` destination's credentials (`GET /v1/blueprints`)
    /// and save each as `blueprints/<identifier>.json` in the rules directory.
    Pull {
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
        /// The `port` destination whose credentials and base URL to use.
        #[arg(long)]
        port: String,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EnvelopeFormat {
    Markdown,
    Schema,
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

/// The PostgreSQL URL of `--store` / `SWITCHYARD_DATABASE_URL`, or of the file
/// `SWITCHYARD_DATABASE_URL_FILE` names (a mounted Secret); `None` for SQLite. The URL is a
/// secret from here on: it is never printed.
fn database_url(
    store: Option<String>,
) -> Result<Option<switchyard::config::secret::Secret>, String> {
    use switchyard::config::secret::Secret;
    let file = std::env::var_os("SWITCHYARD_DATABASE_URL_FILE").filter(|f| !f.is_empty());
    let given = store.filter(|s| !s.trim().is_empty());
    let url = match (given, file) {
        (Some(_), Some(_)) => {
            return Err("give the database URL once: --store (SWITCHYARD_DATABASE_URL) or SWITCHYARD_DATABASE_URL_FILE, not both".into())
        }
        (Some(s), None) => s.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| {
                format!(
                    "cannot read SWITCHYARD_DATABASE_URL_FILE {}: {e}",
                    std::path::Path::new(&f).display()
                )
            })?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if url == "sqlite" {
        return Ok(None);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Some(Secret::new(url)));
    }
    Err("the store is `sqlite` or a `postgres://` URL (hint: postgres://user:password@host:5432/db)".into())
}

#[derive(clap::Args, Clone)]
struct DlArgs {
    #[arg(long, default_value = "data", env = "SWITCHYARD_DATA_DIR")]
    data_dir: PathBuf,
    /// The PostgreSQL outbox of a fleet (`postgres://…`; also SWITCHYARD_DATABASE_URL or
    /// SWITCHYARD_DATABASE_URL_FILE), instead of --data-dir. Works while the replicas run:
    /// replayed messages are taken by a replica at its next heartbeat.
    #[arg(long, env = "SWITCHYARD_DATABASE_URL", hide_env_values = true)]
    store: Option<String>,
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

impl DeadLetterAction {
    /// The arguments every action has.
    fn args(&self) -> &DlArgs {
        match self {
            DeadLetterAction::List { args, .. }
            | DeadLetterAction::Show { args, .. }
            | DeadLetterAction::Replay { args, .. }
            | DeadLetterAction::Purge { args } => args,
        }
    }
}

/// Where `switchyard silence` acts: a running server's admin API, or a stopped engine's data
/// directory.
#[derive(clap::Args, Clone)]
struct SilenceWhere {
    #[arg(long, default_value = "data", env = "SWITCHYARD_DATA_DIR")]
    data_dir: PathBuf,
    /// The PostgreSQL outbox of a fleet (`postgres://…`; also SWITCHYARD_DATABASE_URL or
    /// SWITCHYARD_DATABASE_URL_FILE), instead of --data-dir. Works while the replicas run.
    #[arg(long, env = "SWITCHYARD_DATABASE_URL", hide_env_values = true)]
    store: Option<String>,
    /// A running server's base URL (e.g. http://127.0.0.1:8080); uses its admin API
    /// (`SWITCHYARD_ADMIN_TOKEN`).
    #[arg(long, env = "SWITCHYARD_SERVER")]
    server: Option<String>,
}

#[derive(Subcommand)]
enum SilenceAction {
    /// Silence a rule (or every rule) for events the matchers select, for a while.
    Add {
        #[command(flatten)]
        at: SilenceWhere,
        /// The rule to silence; without it, every rule (then give at least one --match).
        #[arg(long)]
        rule: Option<String>,
        /// A condition on the event envelope, in the rule language (repeatable; all must hold),
        /// e.g. `$.entity.identifier == "payments-api"`.
        #[arg(long = "match")]
        matchers: Vec<String>,
        /// How long it lasts from its start (e.g. `2h`).
        #[arg(long = "for")]
        duration: Option<String>,
        /// When it ends (RFC 3339), instead of --for.
        #[arg(long)]
        until: Option<String>,
        /// When it starts (RFC 3339; default now).
        #[arg(long)]
        start: Option<String>,
        /// Who silenced it (default: $USER).
        #[arg(long, env = "USER")]
        author: Option<String>,
        #[arg(long, default_value = "")]
        comment: String,
        /// Offline, the rules directory the rule must exist in.
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
    },
    /// List the silences not over yet (with --all, also those that ended in the last day).
    List {
        #[command(flatten)]
        at: SilenceWhere,
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// End a silence now.
    Expire {
        #[command(flatten)]
        at: SilenceWhere,
        id: i64,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Validate a rules directory and run its rule tests (exit 0 valid, 1 invalid, 2 usage).
    Check {
        /// The rules directory (also `--rules DIR`, as for the other commands; default
        /// `$SWITCHYARD_RULES`, else `rules`).
        dir: Option<PathBuf>,
        /// The rules directory.
        #[arg(long = "rules", conflicts_with = "dir")]
        rules: Option<PathBuf>,
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
        #[arg(
            long,
            required_unless_present = "schedule",
            conflicts_with = "schedule",
            requires = "event"
        )]
        source: Option<String>,
        /// Simulate a schedule's tick instead of a webhook.
        #[arg(long)]
        schedule: Option<String>,
        /// The tick's time (RFC 3339) with `--schedule`; default its next tick.
        #[arg(long, requires = "schedule", value_parser = parse_rfc3339)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// A request header, `Name: value` (e.g. `RUN_ID: r_123`); repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Stand-in for a `with:` query result, `NAME=FILE.json` (a list of entities or a search
        /// answer); repeatable.
        #[arg(long = "with")]
        with: Vec<String>,
        /// Say what each dispatch would do given a lifecycle state (open message keys,
        /// silences): a file holding `GET /-/state`'s answer, or a running server's URL (its
        /// admin API, `SWITCHYARD_ADMIN_TOKEN`).
        #[arg(long)]
        state: Option<String>,
        /// The raw event body (a file).
        event: Option<PathBuf>,
    },
    /// Print what a JSONPath selects in the envelope of an event (what `jq` is reached for).
    Query {
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
        /// The source that receives the event (a source name, or a kind with one source).
        #[arg(long)]
        source: String,
        /// A request header, `Name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The raw event body (a file).
        event: PathBuf,
        /// The path, e.g. `$.after.properties.cpuUtil` (RFC 9535).
        path: String,
    },
    /// Run the engine: receive webhooks, route them, deliver the messages.
    #[command(
        after_help = "Environment (besides the flags' own variables above):\n  \
        SWITCHYARD_ADMIN_TOKEN   bearer token of the admin API (/-/reload, /-/dead-letters); \
        unset: the admin API answers 404. Environment only, never a flag, so it stays out of `ps`.\n  \
        SWITCHYARD_LOG           log filter (default `info`; e.g. `switchyard=debug`)\n  \
        SWITCHYARD_KAFKA_DEBUG   librdkafka debug contexts (e.g. `all`), logged under target `librdkafka`\n  \
        and every `${VAR}` the rules files use."
    )]
    Serve {
        #[arg(long, default_value = "rules", env = "SWITCHYARD_RULES")]
        rules: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080", env = "SWITCHYARD_LISTEN")]
        listen: std::net::SocketAddr,
        /// Where the durable outbox and dead letters live.
        #[arg(long, default_value = "data", env = "SWITCHYARD_DATA_DIR")]
        data_dir: PathBuf,
        /// The outbox: `sqlite` (the default: a file in --data-dir, one engine) or a
        /// `postgres://user:password@host/db?sslmode=require` URL shared by several replicas.
        /// Prefer the environment (SWITCHYARD_DATABASE_URL) or a file
        /// (SWITCHYARD_DATABASE_URL_FILE) to the command line for a URL with a password.
        #[arg(long, env = "SWITCHYARD_DATABASE_URL", hide_env_values = true)]
        store: Option<String>,
        /// PostgreSQL: how long after a replica's last heartbeat the others take over its jobs.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, env = "SWITCHYARD_LEASE")]
        lease: std::time::Duration,
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SWITCHYARD_LOG_FORMAT")]
        log_format: LogFormat,
        /// Deliveries waiting before new events are answered 503.
        #[arg(long, default_value_t = 100_000, env = "SWITCHYARD_MAX_PENDING")]
        max_pending: usize,
        /// Seconds to let attempts in progress finish on SIGTERM/SIGINT.
        #[arg(long, default_value_t = 10, env = "SWITCHYARD_GRACE_SECONDS")]
        grace_seconds: u64,
        /// Do not watch the rules directory (reload with SIGHUP or POST /-/reload).
        #[arg(long, env = "SWITCHYARD_NO_WATCH")]
        no_watch: bool,

        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Inspect, replay or purge dead letters (in the data directory, or via a running server).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Create, list and expire silences (in the data directory, or via a running server).
    Silence {
        #[command(subcommand)]
        action: SilenceAction,
    },
    /// Port blueprint definitions for `check` (`blueprints/*.json` in the rules directory).
    Blueprints {
        #[command(subcommand)]
        action: BlueprintsAction,
    },
    /// Print the JSON Schema of a rules file.
    Schema,
    /// Print a shell completion script (e.g. `switchyard completions bash >
    /// /etc/bash_completion.d/switchyard`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff; e.g. `switchyard man > /usr/share/man/man1/switchyard.1`).
    Man,
    /// Exit 0 when `GET URL` answers 2xx within 3 s (a container HEALTHCHECK without curl).
    Probe {
        /// e.g. `http://127.0.0.1:8080/healthz`
        url: String,
    },
    /// Print the event envelope of every event type: docs/rules.md's tables (`markdown`) or a
    /// JSON Schema (`schema`, as in schemas/envelope.schema.json).
    Envelope {
        #[arg(long, value_enum, default_value_t = EnvelopeFormat::Markdown)]
        format: EnvelopeFormat,
    },
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

/// Offline commands end quietly when their reader goes away (`dead-letters show 1 | head`), as
/// Unix tools do, instead of panicking on the failed write to a closed pipe.
fn default_sigpipe() {
    // SAFETY: `signal` with `SIG_DFL` only changes the disposition of SIGPIPE; it runs before
    // any thread is started, and the Rust runtime's own choice (ignore) is what it replaces.
    // `serve` keeps the runtime's choice, so a peer closing a socket can never kill it.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        default_sigpipe();
    }
    match cli.command {
        Command::Check {
            dir,
            rules,
            format,
            deny_warnings,
        } => cmd_check(
            rules
                .or(dir)
                .or_else(|| std::env::var_os("SWITCHYARD_RULES").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("rules")),
            format,
            deny_warnings,
        ),
        Command::Simulate {
            rules,
            source,
            schedule,
            at,
            headers,
            format,
            with,
            state,
            event,
        } => {
            let input = match (source, schedule, event) {
                (Some(s), None, Some(e)) => SimInput::Webhook(s, e),
                (None, Some(n), None) => SimInput::Tick(n, at),
                _ => {
                    eprintln!("error: give --source NAME EVENT, or --schedule NAME [--at TIME]");
                    return ExitCode::from(2);
                }
            };
            cmd_simulate(rules, input, headers, format, with, state)
        }
        Command::Query {
            rules,
            source,
            headers,
            event,
            path,
        } => cmd_query(rules, source, headers, event, path),
        Command::Serve {
            rules,
            listen,
            data_dir,
            store,
            lease,
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
            let store = match database_url(store) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if lease < std::time::Duration::from_secs(1) {
                eprintln!(
                    "error: --lease must be at least 1s (heartbeats come five times per lease)"
                );
                return ExitCode::from(2);
            }
            let cfg = switchyard::server::ServeConfig {
                rules_dir: rules,
                listen,
                data_dir,
                store,
                lease,
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
                    // Logging is set up: one line, in the configured format.
                    tracing::error!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::DeadLetters { action } => cli::dead_letters::run(action),
        Command::Silence { action } => cli::silence::run(action),
        Command::Schema => {
            print!("{}", switchyard::config::spec::json_schema());
            ExitCode::SUCCESS
        }
        Command::Blueprints {
            action: BlueprintsAction::Pull { rules, port },
        } => cli::blueprints::pull(&rules, &port),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "switchyard", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Probe { url } => match probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("probe {url}: {e}");
                ExitCode::from(1)
            }
        },
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = std::io::stdout().lock();
            match clap_mangen::Man::new(cmd).render(&mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Envelope { format } => {
            match format {
                EnvelopeFormat::Markdown => print!("{}", switchyard::envelope::markdown()),
                EnvelopeFormat::Schema => print!("{}", switchyard::envelope::json_schema()),
            }
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

/// `GET url` over plain HTTP/1.1 with std's blocking socket: the image has no curl, and a probe
/// needs no runtime.
fn probe(url: &str) -> Result<(), String> {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are probed")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let limit = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code = line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "answered {}",
            if code.is_empty() { "nothing" } else { code }
        ))
    }
}

/// What `simulate` feeds in.
enum SimInput {
    Webhook(String, PathBuf),
    Tick(String, Option<chrono::DateTime<chrono::Utc>>),
}

fn parse_rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    switchyard::config::parse_time(s)
        .ok_or_else(|| format!("`{s}` is not an RFC 3339 time (e.g. 2026-01-05T09:00:00Z)"))
}

/// The `-H` headers and the body file of an offline command's event, or the exit code after
/// saying what is wrong with them.
fn event_parts(
    headers: &[String],
    event: &std::path::Path,
) -> Result<(std::collections::BTreeMap<String, String>, Vec<u8>), ExitCode> {
    let headers = parse_headers(headers).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    let body = switchyard::config::read_bounded(event, 4 * 1024 * 1024).map_err(|e| {
        eprintln!("error: {}", e.message);
        ExitCode::from(2)
    })?;
    Ok((headers, body))
}

/// Loads the rules for an offline command, printing why not when they do not load.
fn load_for_offline(rules: &std::path::Path) -> Option<switchyard::config::Ruleset> {
    let (rs, diags) = switchyard::config::load_dir(rules, &LoadOptions::new(Mode::Check));
    if rs.is_none() {
        print_diagnostics(&diags, &[]);
        eprintln!(
            "the rules do not load; fix them first (`switchyard check {}`)",
            rules.display()
        );
    }
    rs
}

fn cmd_query(
    rules: PathBuf,
    source: String,
    headers: Vec<String>,
    event: PathBuf,
    path: String,
) -> ExitCode {
    let expr = match switchyard::routing::path::JsonPathExpr::compile(&path) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: `{path}` is not a valid JSONPath: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(rs) = load_for_offline(&rules) else {
        return ExitCode::from(1);
    };
    let (headers, body) = match event_parts(&headers, &event) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let req = Request {
        headers: headers.into(),
        body: &body,
        path_token: None,
        signed: None,
    };
    match switchyard::simulate::envelope_of(&rs, &source, &req) {
        Ok(ev) => {
            if ev.secret {
                eprintln!("error: this event is a One-Time Passcode; its values are not shown");
                return ExitCode::from(1);
            }
            let selected = expr.select(&ev.data);
            let mut out = std::io::stdout().lock();
            for v in &selected {
                if writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(v).unwrap_or_default()
                )
                .is_err()
                {
                    return ExitCode::SUCCESS;
                }
            }
            if selected.is_empty() {
                eprintln!(
                    "(the path selects nothing in the envelope of this {} event)",
                    ev.event_type
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", event.display());
            ExitCode::from(1)
        }
    }
}

fn cmd_simulate(
    rules: PathBuf,
    input: SimInput,
    headers: Vec<String>,
    format: Format,
    with: Vec<String>,
    state: Option<String>,
) -> ExitCode {
    let state: Option<switchyard::simulate::State> = match state {
        None => None,
        Some(s) => {
            let v = if s.starts_with("http://") || s.starts_with("https://") {
                cli::admin::call(&s, "GET", "/-/state", None)
            } else {
                std::fs::read_to_string(&s)
                    .map_err(|e| format!("cannot read {s}: {e}"))
                    .and_then(|t| {
                        serde_json::from_str(&t).map_err(|e| format!("{s} is not JSON: {e}"))
                    })
            };
            match v.and_then(|v| {
                serde_json::from_value(v).map_err(|e| format!("--state: not a state ({e})"))
            }) {
                Ok(st) => Some(st),
                Err(e) => {
                    eprintln!("error: --state {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
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
    let Some(rs) = load_for_offline(&rules) else {
        return ExitCode::from(1);
    };
    let (result, what) = match &input {
        SimInput::Tick(name, at) => (
            switchyard::simulate::simulate_schedule(&rs, name, *at, &stand_ins),
            format!("schedule {name}"),
        ),
        SimInput::Webhook(source, event) => {
            let (headers, body) = match event_parts(&headers, event) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let req = Request {
                headers: headers.into(),
                body: &body,
                path_token: None,
                signed: None,
            };
            (
                switchyard::simulate::simulate(&rs, source, &req, &stand_ins),
                event.display().to_string(),
            )
        }
    };
    match result {
        Ok(mut sim) => {
            if let Some(st) = &state {
                switchyard::simulate::apply_state(&rs, &mut sim, st, switchyard::outbox::now_ms());
            }
            match format {
                Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&sim).unwrap_or_default())
                }
                Format::Text => print!("{}", switchyard::simulate::to_text(&sim)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {what}: {e}");
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
    // Colours only for a person at a terminal: `kubectl logs` and journald show escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The binary's own modules (the library is `switchyard::…`).
mod cli {
    pub mod admin;
    pub mod blueprints;
    pub mod dead_letters;
    pub mod silence;
}

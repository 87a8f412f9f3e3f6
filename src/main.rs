//! The `switchyard` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use switchyard::config::diag::{self, Diagnostic};
use switchyard::config::{LoadOptions, Mode};
use switchyard::sources::Request;

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
        /// The raw event body (a file).
        event: PathBuf,
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
            event,
        } => cmd_simulate(rules, source, headers, format, event),
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
    event: PathBuf,
) -> ExitCode {
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
        headers,
        body: &body,
        path_token: None,
    };
    match switchyard::simulate::simulate(&rs, &source, &req) {
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

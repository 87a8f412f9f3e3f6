//! Reloading the rules while serving.
//!
//! Triggers: changes in the rules directory (`notify`, debounced so an editor's save burst
//! reloads once), `SIGHUP`, and `POST /-/reload`. A reload compiles the directory on a blocking
//! thread, never on the request path; on success the new ruleset is swapped in atomically and
//! the delivery workers are reconfigured; on failure the previous ruleset keeps serving and the
//! diagnostics are logged, kept for `/status` and counted in `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::AppState;
use crate::config::diag::Diagnostic;
use crate::config::Ruleset;
use crate::config::{load_dir, LoadOptions, Mode};
use crate::outbox::now_ms;

/// The outcome of the last reload, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// Unix ms of the last attempt.
    pub at: i64,
    pub ok: bool,
    pub trigger: String,
    pub duration_ms: f64,
    /// Diagnostics of the last attempt (errors when it failed, warnings otherwise).
    pub diagnostics: Vec<String>,
    /// Unix ms when the ruleset now serving was loaded.
    pub serving_since: i64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

impl ReloadStatus {
    pub(super) fn initial(_rs: &Ruleset, diags: &[Diagnostic]) -> Self {
        let now = now_ms();
        ReloadStatus {
            at: now,
            ok: true,
            trigger: "start".into(),
            duration_ms: 0.0,
            diagnostics: diags.iter().map(Diagnostic::one_line).collect(),
            serving_since: now,
            reloads_ok: 0,
            reloads_failed: 0,
        }
    }
}

/// Reloads now; returns whether the new rules were swapped in.
pub async fn reload(st: &Arc<AppState>, trigger: &str) -> Result<usize, Vec<String>> {
    let _one_at_a_time = st.reload_lock.lock().await;
    let started = Instant::now();
    let dir = st.cfg.rules_dir.clone();
    let loaded =
        tokio::task::spawn_blocking(move || load_dir(&dir, &LoadOptions::new(Mode::Serve))).await;
    let (rs, diags) = match loaded {
        Ok(x) => x,
        Err(e) => (
            None,
            vec![Diagnostic::error(
                "internal",
                format!("reload task failed: {e}"),
            )],
        ),
    };
    let elapsed = started.elapsed();
    let lines: Vec<String> = diags.iter().map(Diagnostic::one_line).collect();
    metrics::histogram!("switchyard_reload_duration_seconds").record(elapsed.as_secs_f64());
    let mut status = st.reload.lock().unwrap_or_else(|p| p.into_inner());
    status.at = now_ms();
    status.trigger = trigger.to_string();
    status.duration_ms = elapsed.as_secs_f64() * 1000.0;
    status.diagnostics = lines.clone();
    match rs {
        Some(rs) => {
            let rs = Arc::new(rs);
            st.deliverer.configure(&rs);
            st.rules.store(rs.clone());
            #[cfg(feature = "kafka")]
            st.kafka.configure(&st.pipeline);
            status.ok = true;
            status.serving_since = status.at;
            status.reloads_ok += 1;
            metrics::counter!("switchyard_reloads_total", "outcome" => "ok").increment(1);
            super::series::reloaded(true);
            tracing::info!(
                trigger,
                rules = rs.rules.len(),
                ms = status.duration_ms,
                "rules reloaded"
            );
            for l in lines.iter() {
                tracing::warn!("{l}");
            }
            Ok(rs.rules.len())
        }
        None => {
            status.ok = false;
            status.reloads_failed += 1;
            metrics::counter!("switchyard_reloads_total", "outcome" => "error").increment(1);
            super::series::reloaded(false);
            tracing::error!(trigger, "reload rejected; the previous rules keep serving");
            for l in lines.iter().filter(|l| l.contains("error")) {
                tracing::error!("{l}");
            }
            Err(lines)
        }
    }
}

/// Starts the file watcher and the SIGHUP handler.
pub(super) fn spawn_triggers(st: Arc<AppState>) {
    #[cfg(unix)]
    {
        let st = st.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP");
                return;
            };
            while hup.recv().await.is_some() {
                let _ = reload(&st, "SIGHUP").await;
            }
        });
    }
    if !st.cfg.watch {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the rules directory; reload with SIGHUP or POST /-/reload");
            return;
        }
    };
    use notify::Watcher;
    if let Err(e) = watcher.watch(&st.cfg.rules_dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(error = %e, "cannot watch the rules directory; reload with SIGHUP or POST /-/reload");
        return;
    }
    tokio::spawn(async move {
        let _keep_alive = watcher;
        while rx.recv().await.is_some() {
            // Debounce: wait until the directory has been quiet for 250 ms.
            loop {
                match tokio::time::timeout(Duration::from_millis(250), rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(&st, "file change").await;
        }
    });
}

//! `port_kafka`: Port's Kafka backend. Consumes `ORG_ID.runs` and `ORG_ID.change.log` in a
//! consumer group and hands each record to the ingest stage.
//!
//! Messages decode with the same Port adapter as the HTTP path, so every rule works whichever
//! transport brought the event. Delivery is at-least-once and loses nothing:
//!
//! - An offset is *stored* only after the event's dispatches are committed to the durable
//!   outbox (`enable.auto.offset.store=false`); librdkafka commits stored offsets every 500 ms,
//!   on rebalance before a partition is given up, and on close. A crash in between re-reads the
//!   message, and the outbox's dedup window (event id / run id) keeps it from being sent twice.
//! - When the outbox is full the partition is paused and the same message retried, never dropped
//!   and never spun on.
//! - A message that is not JSON or of an unknown shape is logged with topic/partition/offset,
//!   counted, kept as a dead letter with its raw bytes, and skipped, so one poison message never
//!   stalls a partition.
//! - Run messages not for a `KAFKA` backend are skipped (counted), as Port's own agent does.
//!
//! Scaling out is Kafka's job: several engines in one group share the partitions; order holds
//! per partition (Port keys change-log records by entity, so per entity).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{KafkaSource, PortTopic, SourceEntry};
use crate::ingest::{Accepted, Pipeline};
use crate::job::{NewJob, Payload};
use crate::outbox::EnqueueError;
use crate::sources::{Decoded, Request};

/// What `/status` shows of one Kafka source.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    pub group: String,
    pub topics: Vec<String>,
    pub rebalances: u64,
    pub consumed: u64,
    /// `topic/partition` → committed offset.
    pub committed: BTreeMap<String, i64>,
    /// `topic/partition` → lag (log end − position).
    pub lag: BTreeMap<String, i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

type Statuses = Arc<Mutex<BTreeMap<String, SourceStatus>>>;

struct Ctx {
    source: String,
    status: Statuses,
}

impl ClientContext for Ctx {
    /// librdkafka's own log lines, as tracing events of this source (target `librdkafka`).
    /// `SWITCHYARD_KAFKA_DEBUG=cgrp` (any librdkafka `debug` contexts) makes them detailed.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", source = %self.source, fac, "{message}")
            }
            L::Warning => {
                tracing::warn!(target: "librdkafka", source = %self.source, fac, "{message}")
            }
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", source = %self.source, fac, "{message}")
            }
            L::Debug => {
                tracing::debug!(target: "librdkafka", source = %self.source, fac, "{message}")
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _c: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        let what = match r {
            Rebalance::Assign(tpl) => format!("assigned {}", describe(tpl)),
            Rebalance::Revoke(tpl) => format!("revoked {}", describe(tpl)),
            Rebalance::Error(e) => format!("rebalance error: {e}"),
        };
        tracing::info!(source = %self.source, "{what}");
        metrics::counter!("switchyard_kafka_rebalances_total", "source" => self.source.clone())
            .increment(1);
        if let Ok(mut s) = self.status.lock() {
            if let Some(st) = s.get_mut(&self.source) {
                st.rebalances += 1;
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let v: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

struct Running {
    settings: KafkaSource,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The Kafka consumers of a running engine, one per `port_kafka` source.
#[derive(Clone, Default)]
pub struct Consumers {
    running: Arc<Mutex<HashMap<String, Running>>>,
    status: Statuses,
}

impl Consumers {
    /// Starts, restarts (settings changed) and stops consumers to match the current rules.
    pub fn configure(&self, st: &Arc<Pipeline>) {
        let rs = st.rules();
        let wanted: HashMap<String, KafkaSource> = rs
            .sources
            .iter()
            .filter_map(|(n, s)| s.kafka.clone().map(|k| (n.clone(), k)))
            .collect();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            if wanted.get(&name) != running.get(&name).map(|r| &r.settings) {
                if let Some(r) = running.remove(&name) {
                    tracing::info!(source = %name, "stopping the Kafka consumer");
                    let _ = r.stop.send(true);
                }
                if let Ok(mut s) = self.status.lock() {
                    s.remove(&name);
                }
            }
        }
        for (name, settings) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let entry = rs.sources.get(&name).cloned();
            let Some(entry) = entry.filter(|e| e.disabled.is_none()) else {
                tracing::warn!(source = %name, "Kafka source not started: its settings are incomplete");
                continue;
            };
            if let Ok(mut s) = self.status.lock() {
                s.insert(
                    name.clone(),
                    SourceStatus {
                        group: settings.group.clone(),
                        topics: settings.topics.iter().map(|t| t.0.clone()).collect(),
                        ..Default::default()
                    },
                );
            }
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(consume(
                st.clone(),
                entry,
                settings.clone(),
                rx,
                self.status.clone(),
            ));
            running.insert(
                name,
                Running {
                    settings,
                    stop: tx,
                    task,
                },
            );
        }
    }

    /// `/status` view.
    pub fn status(&self) -> Value {
        serde_json::to_value(&*self.status.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or(Value::Null)
    }

    /// Stops every consumer (each commits its stored offsets and leaves the group).
    pub async fn shutdown(&self) {
        let all: Vec<Running> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in all {
            let _ = r.stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
        }
    }
}

fn count(source: &str, topic: &str, outcome: &'static str) {
    metrics::counter!("switchyard_kafka_messages_total", "source" => source.to_string(), "topic" => topic.to_string(), "outcome" => outcome).increment(1);
}

async fn consume(
    st: Arc<Pipeline>,
    src: SourceEntry,
    k: KafkaSource,
    mut stop: watch::Receiver<bool>,
    status: Statuses,
) {
    let name = src.name.clone();
    let mut k = k;
    if let Some(from) = k.credentials_from.clone() {
        // Brokers and SASL credentials from Port, with the `port` destination's API credentials;
        // retried every 30 s until Port answers.
        loop {
            match fetch_credentials(&st, &from).await {
                Ok((brokers, user, pass)) => {
                    tracing::info!(source = %name, brokers = brokers.len(), "Kafka credentials fetched from Port");
                    k.conn.brokers = brokers;
                    k.conn.username = Some(user);
                    k.conn.password = Some(pass);
                    break;
                }
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "cannot fetch the Kafka credentials from Port; retrying in 30 s");
                    set_error(&status, &name, e);
                    if tokio::time::timeout(Duration::from_secs(30), stop.wait_for(|s| *s))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
        }
    }
    let mut cfg = k.conn.client_config();
    // Static membership (KIP-345), when configured: an engine that restarts with the same
    // instance id takes its partitions back at once instead of waiting for its old session to
    // time out. (A static member does not leave the group on shutdown either.)
    if let Some(id) = &k.instance_id {
        cfg.set("group.instance.id", id);
    }
    cfg.set("group.id", &k.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.start_from)
        // Kafka's defaults (45 s, 3 s) unless the rules say otherwise. A short session (10 s
        // before) made a static member restarted within seconds race its own old session's
        // expiry; on tansu 0.6 that race left the group without a leader for good.
        .set(
            "session.timeout.ms",
            k.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (k.session_timeout / 15)
                .clamp(Duration::from_millis(500), Duration::from_secs(3))
                .as_millis()
                .to_string(),
        );
    // Troubleshooting: librdkafka's debug contexts (e.g. `cgrp,protocol`), logged at debug
    // level under target `librdkafka`.
    if let Some(d) = std::env::var("SWITCHYARD_KAFKA_DEBUG")
        .ok()
        .filter(|d| !d.trim().is_empty())
    {
        cfg.set("debug", d.trim());
    }
    let ctx = Ctx {
        source: name.clone(),
        status: status.clone(),
    };
    let consumer: StreamConsumer<Ctx> = match cfg.create_with_context(ctx) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(source = %name, error = %e, "cannot create the Kafka consumer");
            set_error(&status, &name, e.to_string());
            return;
        }
    };
    let consumer = Arc::new(consumer);
    let topics: Vec<&str> = k.topics.iter().map(|t| t.0.as_str()).collect();
    if let Err(e) = consumer.subscribe(&topics) {
        tracing::error!(source = %name, error = %e, "cannot subscribe");
        set_error(&status, &name, e.to_string());
        return;
    }
    tracing::info!(source = %name, group = %k.group, topics = ?topics, "consuming from Kafka");
    let kinds: Arc<HashMap<String, PortTopic>> = Arc::new(k.topics.iter().cloned().collect());
    let watcher = tokio::spawn(watch_progress(
        consumer.clone(),
        name.clone(),
        status.clone(),
    ));
    let src = Arc::new(src);
    loop {
        let msg = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let first = match msg {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "Kafka error");
                set_error(&status, &name, e.to_string());
                if tokio::time::timeout(Duration::from_secs(1), stop.wait_for(|s| *s))
                    .await
                    .is_ok()
                {
                    break;
                }
                continue;
            }
        };
        // Take what is already waiting (up to 256 messages) and handle it concurrently: the
        // outbox groups the enqueues into one transaction. Offsets are stored in order after.
        let mut batch = vec![first];
        while batch.len() < 256 {
            match tokio::time::timeout(Duration::from_millis(1), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, m) in batch.iter().enumerate() {
            let (st, src, kinds, m) = (st.clone(), src.clone(), kinds.clone(), m.clone());
            tasks.spawn(async move { (i, handle_record(&st, &src, &kinds, &m).await) });
        }
        // Anything not reported done (an error, or a task that died) is retried below.
        let mut done = vec![false; batch.len()];
        while let Some(r) = tasks.join_next().await {
            if let Ok((i, Ok(()))) = r {
                done[i] = true;
            }
        }
        let failed: Vec<usize> = (0..batch.len()).filter(|i| !done[*i]).collect();
        // A message that could not be queued (outbox full, storage error) is retried on its own,
        // with its partition paused, before anything after it is stored.
        for i in failed {
            let m = &batch[i];
            let mut paused = false;
            loop {
                match handle_record(&st, &src, &kinds, m).await {
                    Ok(()) => break,
                    Err(EnqueueError::Full { pending }) => {
                        if !paused {
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition(m.topic(), m.partition());
                            let _ = consumer.pause(&tpl);
                            paused = true;
                            tracing::warn!(source = %name, pending, "outbox full: partition paused");
                        }
                    }
                    Err(EnqueueError::Storage(e)) => {
                        tracing::error!(source = %name, error = %e, "cannot commit to the outbox; retrying")
                    }
                }
                if tokio::time::timeout(Duration::from_millis(500), stop.wait_for(|s| *s))
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            if paused {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(m.topic(), m.partition());
                let _ = consumer.resume(&tpl);
            }
            if *stop.borrow() {
                break;
            }
        }
        if *stop.borrow() {
            // Store nothing of an unfinished batch: it is read again after a restart.
            break;
        }
        for m in &batch {
            // librdkafka's rd_kafka_offset_store stores `offset + 1` (the next one to read) itself.
            if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                tracing::warn!(source = %name, error = %e, "cannot store the offset");
            }
        }
        if let Ok(mut s) = status.lock() {
            if let Some(x) = s.get_mut(&name) {
                x.consumed += batch.len() as u64;
            }
        }
    }
    watcher.abort();
    // Commit what is stored, then leave the group (dropping the consumer closes it).
    let c = consumer.clone();
    let _ = tokio::task::spawn_blocking(move || {
        c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
    })
    .await;
    tracing::info!(source = %name, "Kafka consumer stopped");
}

fn set_error(status: &Statuses, name: &str, e: String) {
    if let Ok(mut s) = status.lock() {
        if let Some(x) = s.get_mut(name) {
            x.last_error = Some(e);
        }
    }
}

/// Every 5 s: committed offsets and lag of the assigned partitions, for `/status` and `/metrics`.
async fn watch_progress(consumer: Arc<StreamConsumer<Ctx>>, name: String, status: Statuses) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let c = consumer.clone();
        let read = tokio::task::spawn_blocking(move || {
            let assignment = c.assignment().ok()?;
            let committed = c
                .committed_offsets(assignment.clone(), Duration::from_secs(2))
                .ok()?;
            let position = c.position().ok()?;
            let mut out = Vec::new();
            for e in assignment.elements() {
                let key = format!("{}/{}", e.topic(), e.partition());
                let high = c
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                    .ok()
                    .map(|w| w.1);
                let pos = position
                    .find_partition(e.topic(), e.partition())
                    .and_then(|p| match p.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                let com = committed
                    .find_partition(e.topic(), e.partition())
                    .and_then(|p| match p.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                out.push((
                    key,
                    e.topic().to_string(),
                    e.partition(),
                    com,
                    high.zip(pos).map(|(h, p)| (h - p).max(0)),
                ));
            }
            Some(out)
        })
        .await;
        let Ok(Some(rows)) = read else { continue };
        if let Ok(mut s) = status.lock() {
            if let Some(x) = s.get_mut(&name) {
                x.committed.clear();
                x.lag.clear();
                for (key, topic, partition, com, lag) in rows {
                    if let Some(c) = com {
                        x.committed.insert(key.clone(), c);
                    }
                    if let Some(l) = lag {
                        x.lag.insert(key, l);
                        metrics::gauge!("switchyard_kafka_lag", "source" => name.clone(), "topic" => topic, "partition" => partition.to_string()).set(l as f64);
                    }
                }
            }
        }
    }
}

/// [`handle`] for a polled record, its topic's kind looked up.
async fn handle_record(
    st: &Pipeline,
    src: &SourceEntry,
    kinds: &HashMap<String, PortTopic>,
    m: &rdkafka::message::OwnedMessage,
) -> Result<(), EnqueueError> {
    let kind = kinds
        .get(m.topic())
        .copied()
        .unwrap_or(PortTopic::ChangeLog);
    handle(
        st,
        src,
        kind,
        m.topic(),
        m.partition(),
        m.offset(),
        m.payload(),
    )
    .await
}

/// Decodes, routes and durably enqueues one message. `Ok` means the offset may be stored.
async fn handle(
    st: &Pipeline,
    src: &SourceEntry,
    kind: PortTopic,
    topic: &str,
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
) -> Result<(), EnqueueError> {
    let where_ = format!("{topic}/{partition}@{offset}");
    let raw = payload.unwrap_or_default();
    let poison = |reason: String| {
        tracing::warn!(source = %src.name, at = %where_, %reason, "poison message: kept as a dead letter and skipped");
        count(&src.name, topic, "poison");
        NewJob {
            destination: format!("kafka:{}", src.name),
            rule: "-".into(),
            event_id: format!("kafka:{topic}:{partition}:{offset}"),
            target: Default::default(),
            payload: Payload::Message(
                json!({"topic": topic, "partition": partition, "offset": offset, "raw": String::from_utf8_lossy(raw)}),
            ),
            secret: false,
            throttle: None,
            error: Some(reason),
        }
    };
    let body: Value = match serde_json::from_slice(raw) {
        Ok(v) => v,
        Err(e) => {
            let job = poison(format!("not JSON: {e}"));
            return keep_poison(st, job).await;
        }
    };
    if kind == PortTopic::Runs {
        let backend = body["payload"]["action"]["invocationMethod"]["type"]
            .as_str()
            .unwrap_or("");
        if backend != "KAFKA" {
            count(&src.name, topic, "skipped");
            tracing::debug!(source = %src.name, at = %where_, backend, "run for another backend: skipped");
            return Ok(());
        }
    }
    let req = Request {
        headers: Default::default(),
        body: raw,
        path_token: None,
        signed: None,
    };
    let mut ev = match src.source.decode(&src.name, &req) {
        Ok(Decoded::Event(ev)) => ev,
        Ok(Decoded::Ack) => return Ok(()),
        Err(r) => {
            let job = poison(r.reason().to_string());
            return keep_poison(st, job).await;
        }
    };
    let rs = st.rules();
    match st.accept(&rs, Some(src), &mut ev, src.dedup_window).await? {
        Accepted::Committed { matched, .. } => count(
            &src.name,
            topic,
            if matched { "accepted" } else { "unmatched" },
        ),
        Accepted::Duplicate => count(&src.name, topic, "duplicate"),
    }
    Ok(())
}

async fn fetch_credentials(
    st: &Pipeline,
    from: &str,
) -> Result<(Vec<String>, String, crate::config::secret::Secret), String> {
    let rs = st.rules();
    let cfg = rs
        .destinations
        .get(from)
        .ok_or_else(|| format!("no destination `{from}`"))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let api = crate::port_api::client_for(cfg, &client)
        .ok_or_else(|| format!("`{from}` is not a `port` destination"))?;
    api.kafka_credentials()
        .await
        .map_err(|e| e.reason().to_string())
}

/// Commits a poison message as a dead letter (once: its id is deduplicated for a week).
async fn keep_poison(st: &Pipeline, job: NewJob) -> Result<(), EnqueueError> {
    let key = job.event_id.clone();
    st.keep(key, vec![job], Duration::from_secs(7 * 24 * 3600))
        .await
}

//! Micro-benchmarks of the pipeline stages: verify, decode, route (100 and 1,000 rules), render.
//!
//! Run: `cargo bench --bench route`. Figures are in docs/performance.md.

use std::collections::BTreeMap;
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use switchyard::config::secret::Secret;
use switchyard::config::Ruleset;
use switchyard::config::{load_dir, LoadOptions, Mode};
use switchyard::routing::route;
use switchyard::sources::port::PortSource;
use switchyard::sources::{Decoded, Request, Source};

/// A rules directory with `n` rules: a realistic mix of blueprint and property conditions, of
/// which exactly three match the CPU-spike fixture (the last three).
pub fn ruleset(n: usize) -> Ruleset {
    let dir = tempfile::tempdir().unwrap();
    let mut y = String::from("sources:\n  port: { port: { client_secret: \"${BENCH_SECRET:-bench}\" } }\ndestinations:\n  sink: { stdout: {} }\nrules:\n");
    for i in 0..n.saturating_sub(3) {
        let cond = match i % 4 {
            0 => format!("$.blueprint == \"Blueprint{i}\""),
            1 => format!("$.after.properties.cpuUtil crosses_above {}", 95 + (i % 5)),
            2 => format!("$.after.properties.healthStatus changed_to \"State{i}\""),
            _ => format!("$.entity.identifier matches \"^svc-{i}-\""),
        };
        y.push_str(&format!("  - id: r{i}\n    on: port/entity.updated\n    where: ['{cond}', '$.after.properties.memoryUtil > 10']\n    send: [{{ to: sink, template: msg }}]\n"));
    }
    for j in 0..3.min(n) {
        y.push_str(&format!("  - id: hit{j}\n    on: port/entity.updated\n    where: ['$.blueprint == \"DeploymentConfig\"', '$.after.properties.cpuUtil crosses_above 80']\n    send: [{{ to: sink, template: msg }}]\n"));
    }
    std::fs::write(dir.path().join("bench.yaml"), y).unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/msg.hbs"),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/templates/cpu-hot.hbs"),
        )
        .unwrap(),
    )
    .unwrap();
    let (rs, diags) = load_dir(dir.path(), &LoadOptions::new(Mode::Check));
    rs.unwrap_or_else(|| panic!("{diags:#?}"))
}

fn spike() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events/cpu-spike.json"))
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let body = spike();
    let port = PortSource {
        secrets: vec![Secret::new("bench")],
        ..PortSource::default()
    };
    let ts = "1790000000";
    let sig = switchyard::sources::port::sign("bench", ts, &body);
    let mut headers = BTreeMap::new();
    headers.insert("x-port-timestamp".to_string(), ts.to_string());
    headers.insert("x-port-signature".to_string(), sig);
    let req = Request {
        headers: headers.into(),
        body: &body,
        path_token: None,
        signed: None,
    };
    c.bench_function("verify (port HMAC, 2 KiB body)", |b| {
        b.iter(|| port.verify(black_box(&req), 1_790_000_000).unwrap())
    });
    c.bench_function("decode (port changelog)", |b| {
        b.iter(|| port.decode("port", black_box(&req)).unwrap())
    });
    let Decoded::Event(ev) = port.decode("port", &req).unwrap() else {
        unreachable!()
    };
    let mut miss = (*ev).clone();
    miss.data["after"]["properties"]["cpuUtil"] = 50.into();
    for n in [100, 1000] {
        let rs = ruleset(n);
        assert_eq!(route(&rs, &ev).len(), 3);
        assert_eq!(route(&rs, &miss).len(), 0);
        c.bench_function(&format!("route {n} rules, no match"), |b| {
            b.iter(|| route(black_box(&rs), black_box(&miss)))
        });
        c.bench_function(&format!("route {n} rules, 3 matches rendered"), |b| {
            b.iter(|| route(black_box(&rs), black_box(&ev)))
        });
    }
}

fn render_and_enqueue(c: &mut Criterion) {
    use switchyard::outbox::{NewJob, Outbox};
    let body = spike();
    let port = PortSource {
        secrets: vec![Secret::new("bench")],
        ..PortSource::default()
    };
    let req = Request {
        headers: BTreeMap::new().into(),
        body: &body,
        path_token: None,
        signed: None,
    };
    let Decoded::Event(ev) = port.decode("port", &req).unwrap() else {
        unreachable!()
    };
    let rs = ruleset(10);
    let ctx = handlebars::Context::from(ev.data.clone());
    c.bench_function("render the cpu-hot Block Kit template", |b| {
        b.iter(|| rs.templates.render_message("msg", black_box(&ctx)).unwrap())
    });

    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), usize::MAX).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let msg = route(&rs, &ev)[0].message.clone().unwrap();
    let job = NewJob {
        destination: "sink".into(),
        rule: "r".into(),
        event_id: "e".into(),
        target: Default::default(),
        payload: msg,
        secret: false,
        throttle: None,
        error: None,
    };
    let mut seq = 0u64;
    c.bench_function("enqueue 1 job (durable commit, alone)", |b| {
        b.iter(|| {
            seq += 1;
            rt.block_on(outbox.enqueue(
                Some((format!("k{seq}"), std::time::Duration::from_secs(60))),
                vec![job.clone()],
                None,
            ))
            .unwrap()
        })
    });
    c.bench_function(
        "enqueue 64 concurrent events (group commit), per event",
        |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                rt.block_on(async {
                    for _ in 0..iters.div_ceil(64) {
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..64 {
                            seq += 1;
                            let (o, j, k) = (outbox.clone(), job.clone(), format!("g{seq}"));
                            set.spawn(async move {
                                o.enqueue(
                                    Some((k, std::time::Duration::from_secs(60))),
                                    vec![j],
                                    None,
                                )
                                .await
                            });
                        }
                        while set.join_next().await.is_some() {}
                    }
                });
                start.elapsed() * (iters as u32) / (iters.div_ceil(64) as u32 * 64).max(1)
            })
        },
    );
}

/// The lifecycle's costs beside a plain message: a keyed job's read of its key before the attempt,
/// its outcome committed with the key's record, and a digest rendered over its items.
fn lifecycle(c: &mut Criterion) {
    use switchyard::job::{Identity, KeyAction, Payload, Target};
    use switchyard::outbox::{Enqueued, KeyChange, KeyEffect, NewJob, Outbox, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), usize::MAX).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = |keyed: bool| NewJob {
        destination: "bot".into(),
        rule: "r".into(),
        event_id: "e".into(),
        target: Target {
            channel: Some("#c".into()),
            identity: keyed.then(|| Identity {
                key: "health:payments-api".into(),
                action: KeyAction::Update,
                ttl_secs: 3600,
            }),
            ..Default::default()
        },
        payload: Payload::Message(serde_json::json!({"text": "payments-api is Degraded"})),
        secret: false,
        throttle: None,
        error: None,
    };
    let mut seq = 0u64;
    for keyed in [false, true] {
        let name = if keyed {
            "enqueue + deliver a keyed job (key read, key upsert in the outcome)"
        } else {
            "enqueue + deliver a plain job"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                rt.block_on(async {
                    let Ok(Enqueued::Committed(jobs, _)) = outbox
                        .enqueue(
                            Some((format!("k{seq}"), std::time::Duration::from_secs(60))),
                            vec![job(keyed)],
                            None,
                        )
                        .await
                    else {
                        unreachable!()
                    };
                    let key = if keyed {
                        let _ = outbox
                            .message_key("bot", "health:payments-api")
                            .await
                            .unwrap();
                        Some(KeyChange {
                            destination: "bot".into(),
                            key: "health:payments-api".into(),
                            change: KeyEffect::Open {
                                channel: "C1".into(),
                                ts: format!("1790000000.{seq:06}"),
                                ttl_ms: 3_600_000,
                            },
                        })
                    } else {
                        None
                    };
                    let delivered = Outcome::Delivered {
                        follow_ups: vec![],
                        message: true,
                        key,
                    };
                    outbox.finish(jobs[0].id, delivered).await
                })
            })
        });
    }

    // A digest of 50 changes.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("r.yaml"),
        "sources:\n  port: { port: { client_secret: x } }\ndestinations:\n  sink: { stdout: {} }\nrules:\n  - id: bulk\n    on: port/entity.updated\n    group: { by: \"{{blueprint}}\" }\n    send: [{ to: sink, text: \"{{count}} changes: {{#each items}}`{{entity.identifier}}` {{/each}}\" }]\n",
    )
    .unwrap();
    let (rs, diags) = load_dir(d.path(), &LoadOptions::new(Mode::Check));
    let rs = rs.unwrap_or_else(|| panic!("{diags:#?}"));
    let rule = &rs.rules[0];
    let items: Vec<serde_json::Value> = (0..50)
        .map(|i| serde_json::json!({"entity": {"identifier": format!("svc-{i}")}, "blueprint": "service"}))
        .collect();
    c.bench_function("render a digest of 50 items", |b| {
        b.iter(|| switchyard::routing::digest(&rs, rule, "service", black_box(items.clone()), "d"))
    });
}

criterion_group!(lifecycle_benches, lifecycle);
criterion_group!(benches_group, benches, render_and_enqueue);
criterion_main!(benches_group, lifecycle_benches);

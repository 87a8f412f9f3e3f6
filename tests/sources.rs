//! Source adapters against the shared fixtures: decoding into one envelope, and the worked
//! signature examples of `fixtures/signatures.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use switchyard::config::secret::Secret;
use switchyard::event::Event;
use switchyard::sources::coder::CoderSource;
use switchyard::sources::port::PortSource;
use switchyard::sources::slack::SlackSource;
use switchyard::sources::{Decoded, Rejection, Request, Source};

const NOW: i64 = 1_790_000_000;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap()
}

fn port() -> PortSource {
    PortSource {
        secrets: vec![Secret::new("port-fixture-secret")],
        ..PortSource::default()
    }
}

fn req<'a>(body: &'a [u8], headers: &[(&str, &str)]) -> Request<'a> {
    Request {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
            .into(),
        body,
        path_token: None,
        signed: None,
    }
}

fn decode(src: &dyn Source, body: &[u8], headers: &[(&str, &str)]) -> Event {
    match src.decode("src", &req(body, headers)).unwrap() {
        Decoded::Event(e) => *e,
        Decoded::Ack => panic!("ack"),
    }
}

fn normalized(e: &Event) -> Value {
    let d = &e.data;
    json!({"type": e.event_type, "blueprint": d["blueprint"], "entity_id": d["entity"]["identifier"], "entity_title": d["entity"]["title"],
           "before": d["before"], "after": d["after"]})
}

#[test]
fn legacy_changelog_and_automation_body_decode_to_the_same_envelope() {
    let legacy = decode(&port(), &read("port/changelog-update-cpu-spike.json"), &[]);
    let auto = decode(&port(), &read("port/automation-entity-updated.json"), &[]);
    assert_eq!(legacy.event_type, "port/entity.updated");
    assert_eq!(normalized(&legacy), normalized(&auto));
    assert_eq!(legacy.data["after"]["properties"]["cpuUtil"], 91);
    assert_eq!(legacy.data["entity"]["title"], "Payments API (production)");
    assert_eq!(legacy.data["family"], "changelog");
    assert_eq!(auto.data["family"], "automation");
    assert!(
        legacy.id.starts_with("port:sha256:584f248c"),
        "{}",
        legacy.id
    );
    assert_eq!(auto.id, "port:automation-run:r_ystUM7CiRaVpbXyd");
    assert_eq!(
        legacy.data["body"]["context"]["entity"],
        "payments-deploy-prod"
    );
}

#[test]
fn every_port_family_decodes() {
    let cases = [
        ("port/changelog-create.json", "port/entity.created"),
        ("port/changelog-delete.json", "port/entity.deleted"),
        ("port/changelog-timer-expired.json", "port/timer.expired"),
        ("port/automation-run-created.json", "port/run.created"),
        ("port/action-run-legacy.json", "port/run.created"),
        ("port/action-run-custom.json", "port/run.created"),
    ];
    for (f, t) in cases {
        let e = decode(&port(), &read(f), &[]);
        assert_eq!(e.event_type, t, "{f}");
    }
    let legacy_run = decode(&port(), &read("port/action-run-legacy.json"), &[]);
    assert_eq!(legacy_run.data["run"]["id"], "r_Kkzy25Ge8YwLsTVh");
    assert_eq!(legacy_run.data["user"]["email"], "maya.cohen@example.com");
    assert_eq!(legacy_run.data["properties"]["channel"], "#platform");
    assert_eq!(
        legacy_run.data["action"]["identifier"],
        "send_scorecard_reminder"
    );
    let auto_run = decode(&port(), &read("port/automation-run-created.json"), &[]);
    assert_eq!(auto_run.data["run"]["id"], "r_e9SCX2m1rKCtOylU");
    assert_eq!(auto_run.data["automation_run"]["id"], "r_RFQz52vyB285JURf");
    assert_eq!(auto_run.data["entity"]["identifier"], "payments-api");
    let custom = decode(&port(), &read("port/action-run-custom.json"), &[]);
    assert_eq!(custom.id, "port:run:r_6AZQMDvVXYo5pHII");
    assert_eq!(
        custom.data["properties"],
        json!({"scorecard": "ProductionReadiness", "channel": "#platform"})
    );
    let timer = decode(&port(), &read("port/changelog-timer-expired.json"), &[]);
    assert_eq!(
        timer.data["entity"]["identifier"],
        "payments-deploy-pr-4821"
    );
    // A run id only in the RUN_ID header.
    let hdr = decode(&port(), br#"{"scorecard": "x"}"#, &[("RUN_ID", "r_hdr")]);
    assert_eq!(hdr.data["run"]["id"], "r_hdr");
}

#[test]
fn unknown_and_broken_port_bodies_are_rejected_with_reasons() {
    let p = port();
    let e = p.decode("p", &req(b"not json", &[])).unwrap_err();
    assert_eq!(e.status(), 400);
    let e = p
        .decode("p", &req(br#"{"hello": "port"}"#, &[]))
        .unwrap_err();
    assert_eq!(e.status(), 422);
    assert!(e.reason().contains("runId"), "{}", e.reason());
    let e = p
        .decode("p", &req(br#"{"event": "{\"action\":\"UPDATE\"}"}"#, &[]))
        .unwrap_err();
    assert_eq!(e.status(), 422);
    assert!(e.reason().contains("{{ .event }}"));
    let e = p
        .decode(
            "p",
            &req(
                br#"{"action":"UPDATE","resourceType":"blueprint","context":{"blueprint":"x"}}"#,
                &[],
            ),
        )
        .unwrap_err();
    assert_eq!(e.status(), 422);
}

#[test]
fn coder_fixtures_decode_and_otp_is_secret() {
    let c = CoderSource::default();
    let e = decode(&c, &read("coder/workspace-deleted.json"), &[]);
    assert_eq!(e.event_type, "coder/notification");
    assert_eq!(e.id, "coder:380c4bb6-2d53-4d77-842a-849791c8ddf9");
    assert_eq!(e.data["user"]["email"], "priya.raman@example.com");
    assert_eq!(e.data["template"]["name"], "Workspace Deleted");
    assert_eq!(
        e.data["labels"]["reason"],
        "idle > 30 days & disk usage < 1 GiB"
    );
    assert_eq!(e.data["actions"].as_array().unwrap().len(), 2);
    assert!(!e.secret);
    let otp = decode(&c, &read("coder/one-time-passcode.json"), &[]);
    assert!(otp.secret);
    for (field, body) in [
        (
            "title",
            json!({"body": "b", "payload": {"user_email": "a@b", "actions": []}, "msg_id": "m"}),
        ),
        (
            "body",
            json!({"title": "t", "payload": {"user_email": "a@b", "actions": []}, "msg_id": "m"}),
        ),
        ("payload", json!({"title": "t", "body": "b", "msg_id": "m"})),
        (
            "payload.user_email",
            json!({"title": "t", "body": "b", "payload": {"actions": []}, "msg_id": "m"}),
        ),
        (
            "payload.actions",
            json!({"title": "t", "body": "b", "payload": {"user_email": "a@b"}, "msg_id": "m"}),
        ),
    ] {
        let e = c
            .decode("c", &req(body.to_string().as_bytes(), &[]))
            .unwrap_err();
        assert_eq!(
            e,
            Rejection::BadRequest(format!("missing required field `{field}`"))
        );
    }
}

#[test]
fn coder_token_in_path_or_bearer() {
    let c = CoderSource {
        tokens: vec![Secret::new("old-token"), Secret::new("new-token")],
    };
    let body = read("coder/test-notification.json");
    let mut r = req(&body, &[]);
    assert_eq!(c.verify(&r, NOW).unwrap_err().status(), 401);
    r.path_token = Some("new-token".into());
    assert!(c.verify(&r, NOW).is_ok());
    r.path_token = Some("old-token".into());
    assert!(c.verify(&r, NOW).is_ok(), "rotation: both tokens work");
    r.path_token = Some("new-tokem".into());
    assert_eq!(c.verify(&r, NOW).unwrap_err().status(), 401);
    let r = req(&body, &[("Authorization", "Bearer new-token")]);
    assert!(c.verify(&r, NOW).is_ok());
}

fn verify_port(body: &[u8], ts: &str, sig: &str, now: i64) -> Result<(), Rejection> {
    port()
        .verify(
            &req(body, &[("X-Port-Timestamp", ts), ("X-Port-Signature", sig)]),
            now,
        )
        .map(|_| ())
}

#[test]
fn port_worked_examples_verify() {
    let spike = read("port/changelog-update-cpu-spike.json");
    verify_port(
        &spike,
        "1790000000",
        "v1,Dh8TkXNB9Q1TY0A3DLTU0tZNU/CTLhKFmF2Fmg2sgSk=",
        NOW,
    )
    .expect("(1) seconds");
    verify_port(
        &spike,
        "1790000000000",
        "v1,gr2npvOoCAq2ZB7CP5yNywrM+GleJla0HBbfgEOpxu4=",
        NOW,
    )
    .expect("(2) milliseconds");
    verify_port(
        br#"{"hello":"port"}"#,
        "1790000000",
        "v1,J1Ja4Wj+YlYCp7BZYLInLX8+O6OYj8Ivk6y67YalT84=",
        NOW,
    )
    .expect("(3) inline");
    verify_port(
        &spike,
        "1790000000",
        "v1,LEkoACzxiAQlmFgt0nt/xZwKUqhLX3opYZYeCNEwoas= v1,Dh8TkXNB9Q1TY0A3DLTU0tZNU/CTLhKFmF2Fmg2sgSk=",
        NOW,
    )
    .expect("(1b) two signatures");
    let agent = br#"{"port_context": {"runId": "r_agent01"}, "note": "a, b: c", "n": [1, 2]}"#;
    verify_port(
        agent,
        "1790000000",
        "v1,Eno4QYaGiNL4Gj1v9mbN8E8ii4b0DJNwbgB1xYKM1zI=",
        NOW,
    )
    .expect("(6) port-agent");
    let mut changed = agent.to_vec();
    changed[60] = b'X';
    assert_eq!(
        verify_port(
            &changed,
            "1790000000",
            "v1,Eno4QYaGiNL4Gj1v9mbN8E8ii4b0DJNwbgB1xYKM1zI=",
            NOW
        )
        .unwrap_err()
        .status(),
        401
    );
    // Secret rotation: the second of two secrets matches.
    let rotated = PortSource {
        secrets: vec![
            Secret::new("new-secret"),
            Secret::new("port-fixture-secret"),
        ],
        ..PortSource::default()
    };
    assert!(rotated
        .verify(
            &req(
                &spike,
                &[
                    ("X-Port-Timestamp", "1790000000"),
                    (
                        "X-Port-Signature",
                        "v1,Dh8TkXNB9Q1TY0A3DLTU0tZNU/CTLhKFmF2Fmg2sgSk="
                    )
                ]
            ),
            NOW
        )
        .is_ok());
}

#[test]
fn port_negative_examples_are_rejected() {
    let spike = read("port/changelog-update-cpu-spike.json");
    let sig = "v1,Dh8TkXNB9Q1TY0A3DLTU0tZNU/CTLhKFmF2Fmg2sgSk=";
    assert!(
        verify_port(&spike[..spike.len() - 1], "1790000000", sig, NOW).is_err(),
        "5a"
    );
    let bumped = String::from_utf8(spike.clone())
        .unwrap()
        .replace("\"cpuUtil\": 91", "\"cpuUtil\": 92");
    assert!(
        verify_port(bumped.as_bytes(), "1790000000", sig, NOW).is_err(),
        "5c"
    );
    assert!(verify_port(&spike, "1790000001", sig, NOW).is_err(), "5d");
    let e = verify_port(&spike, "1790000000", sig, NOW + 301).unwrap_err();
    assert!(e.reason().contains("tolerance"), "5e: {}", e.reason());
    assert!(
        verify_port(&spike, "1790000000", sig, NOW + 300).is_ok(),
        "boundary is inclusive"
    );
    assert!(verify_port(&spike, "1790000000", sig, NOW - 300).is_ok());
    assert!(
        port()
            .verify(&req(&spike, &[("X-Port-Timestamp", "1790000000")]), NOW)
            .is_err(),
        "missing signature"
    );
    assert!(
        port()
            .verify(&req(&spike, &[("X-Port-Signature", sig)]), NOW)
            .is_err(),
        "missing timestamp"
    );
    assert!(verify_port(&spike, "soon", sig, NOW).is_err());
}

#[test]
fn slack_worked_example_verifies_and_decodes() {
    let s = SlackSource {
        secrets: vec![Secret::new("slack-fixture-signing-secret")],
    };
    let form = read("slack/block-actions.form");
    let sig = "v0=87381bb59e58f469f0a66922dd4575b7d7a7293b83852d78486f3c326e4b29bb";
    let r = req(
        &form,
        &[
            ("X-Slack-Request-Timestamp", "1790000000"),
            ("X-Slack-Signature", sig),
        ],
    );
    s.verify(&r, NOW).expect("(4)");
    let e = decode(&s, &form, &[]);
    assert_eq!(e.event_type, "slack/block_actions");
    assert_eq!(e.data["action"]["action_id"], "coder_action_0");
    assert_eq!(e.data["user"]["id"], "U05LHPP95C");
    assert_eq!(e.data["channel"]["id"], "D07O63M37X");
    assert_eq!(e.data["message"]["ts"], "1789999760.000200");
    assert!(
        e.data["body"].get("token").is_none(),
        "the verification token is dropped"
    );
    let mut nl = form.clone();
    nl.push(b'\n');
    let r = req(
        &nl,
        &[
            ("X-Slack-Request-Timestamp", "1790000000"),
            ("X-Slack-Signature", sig),
        ],
    );
    assert_eq!(s.verify(&r, NOW).unwrap_err().status(), 401, "5b");
    let r = req(b"ssl_check=1&token=x", &[]);
    assert!(s.verify(&r, NOW).is_ok());
    assert!(matches!(s.decode("s", &r).unwrap(), Decoded::Ack));
}

//! Slack interactivity: v0 signature over the raw form body, then decoding of `payload`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::config::secret::Secret;
use switchyard::sources::slack::{sign, SlackSource};
use switchyard::sources::{Request, Source};

const NOW: i64 = 1_790_000_000;

fuzz_target!(|data: &[u8]| {
    let src = SlackSource {
        secrets: vec![Secret::new("fuzz-signing")],
    };
    let ts = NOW.to_string();
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("x-slack-request-timestamp".to_string(), ts.clone());
    headers.insert("x-slack-signature".to_string(), sign("fuzz-signing", &ts, data));
    let req = Request {
        headers: headers.into(),
        body: data,
        path_token: None,
        signed: None,
    };
    if src.verify(&req, NOW).is_ok() {
        let _ = src.decode("slack", &req);
    }
    // The input as a JSON payload inside a form body.
    let form: String = form_encode(data);
    let req = Request {
        body: form.as_bytes(),
        ..req
    };
    let _ = src.decode("slack", &req);
});

fn form_encode(data: &[u8]) -> String {
    let mut s = String::from("payload=");
    for b in data {
        if b.is_ascii_alphanumeric() {
            s.push(*b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

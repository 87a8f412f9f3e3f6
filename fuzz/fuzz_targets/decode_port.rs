//! Port: verification on raw bytes, then decoding. Each input is tried twice: signed with the
//! source's secret (so the decoder sees it) and with whatever signature headers the input's
//! first line names (so the verifier sees hostile headers).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::config::secret::Secret;
use switchyard::sources::port::{sign, PortSource};
use switchyard::sources::{Request, Source};

const NOW: i64 = 1_790_000_000;

fuzz_target!(|data: &[u8]| {
    let src = PortSource {
        secrets: vec![Secret::new("fuzz-secret")],
        ..PortSource::default()
    };
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let ts = NOW.to_string();
    let sig = sign("fuzz-secret", &ts, body);
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("x-port-timestamp".to_string(), ts);
    headers.insert("x-port-signature".to_string(), sig);
    let mut req = Request {
        headers: headers.into(),
        body,
        path_token: None,
        signed: None,
    };
    if let Ok(signed) = src.verify(&req, NOW) {
        req.signed = signed;
        let _ = src.decode("port", &req);
    }
    // Hostile headers: `timestamp signature` from the first line.
    let head = String::from_utf8_lossy(head);
    let mut parts = head.splitn(2, ' ');
    let mut h = std::collections::BTreeMap::new();
    h.insert("x-port-timestamp".to_string(), parts.next().unwrap_or("").to_string());
    h.insert("x-port-signature".to_string(), parts.next().unwrap_or("").to_string());
    let req = Request {
        headers: h.into(),
        body,
        path_token: None,
        signed: None,
    };
    if let Ok(signed) = src.verify(&req, NOW) {
        let req = Request { signed, ..req };
        let _ = src.decode("port", &req);
    }
});

//! Coder: token check (bearer or path), then decoding of the notification body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::config::secret::Secret;
use switchyard::sources::coder::CoderSource;
use switchyard::sources::{Request, Source};

fuzz_target!(|data: &[u8]| {
    let src = CoderSource {
        tokens: vec![Secret::new("fuzz-token")],
    };
    let (token, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        None => ("fuzz-token".to_string(), data),
    };
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {token}"));
    let req = Request {
        headers: headers.into(),
        body,
        path_token: None,
        signed: None,
    };
    let _ = src.verify(&req, 0);
    let req = Request {
        headers: Default::default(),
        body,
        path_token: Some("fuzz-token".into()),
        signed: None,
    };
    if src.verify(&req, 0).is_ok() {
        let _ = src.decode("coder", &req);
    }
});

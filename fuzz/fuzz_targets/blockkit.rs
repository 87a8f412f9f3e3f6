//! Block Kit limits: enforcing any JSON message never panics, and what comes out fits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::render::blockkit::{enforce, fits};

fuzz_target!(|data: &[u8]| {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let before = fits(&v);
    let original = v.clone();
    enforce(&mut v);
    assert!(fits(&v), "enforce leaves a message that does not fit");
    if before {
        assert_eq!(v, original, "a message that fits is left as it is");
    }
});

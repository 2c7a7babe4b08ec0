//! `PUT /v1/jobs/{id}` bodies: never a panic; an accepted registration has
//! 1..=16 pinned host keys, a nonzero port, and a valid actor.
#![no_main]

use ci_gateway::api::{validate, RegisterRequest};
use ci_gateway::ids::JobId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<RegisterRequest>(data) else {
        return;
    };
    let job = JobId::parse("42").expect("id");
    let source = "10.0.0.9".parse().expect("ip");
    if let Ok(reg) = validate(job, body, source, 1, None) {
        assert!((1..=16).contains(&reg.host_keys.len()));
        assert_ne!(reg.port, 0);
        assert!(!reg.host.is_unspecified());
    }
});

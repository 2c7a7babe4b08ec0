//! authorized_keys editing: installing then removing a job's block gives the
//! file back (plus the newline a last line lacked), and installing twice is
//! the same as once. The input is split at the first NUL into the existing
//! file and the lines to install.
#![no_main]

use ci_gateway::agent::authorized_keys::{install, installed, remove};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (existing, keys) = text.split_once('\0').unwrap_or((text, "ssh-ed25519 AAAA k"));
    let keys: Vec<String> = keys.split('\n').map(str::to_string).collect();
    let job = "9876543210";
    // Only files without a block for this job (a block is ours to replace).
    if existing.contains("# ci-gateway job 9876543210 ") {
        return;
    }
    let Ok(once) = install(existing, job, &keys) else {
        return;
    };
    assert_eq!(install(&once, job, &keys).expect("again"), once);
    assert_eq!(installed(&once, job), keys);
    let mut expected = existing.to_string();
    if !expected.is_empty() && !expected.ends_with('\n') {
        expected.push_str(if existing.contains("\r\n") { "\r\n" } else { "\n" });
    }
    assert_eq!(remove(&once, job), expected);
});

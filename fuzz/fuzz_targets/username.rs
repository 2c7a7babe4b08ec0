//! SSH usernames (and jump destinations): never a panic; what parses as a
//! job is all digits and round-trips; what parses as a login is a valid
//! GitHub login.
#![no_main]

use ci_gateway::ids::{GithubLogin, JobId, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(user) = std::str::from_utf8(data) else {
        return;
    };
    match Target::parse_user(user) {
        Ok(Target::Job(job)) => {
            let shown = job.to_string();
            assert!(shown.bytes().all(|b| b.is_ascii_digit()), "{shown}");
            assert_eq!(JobId::parse(&shown).expect("round trip"), job);
        }
        Ok(Target::Jump(login)) => {
            assert!(login.as_str().len() <= 39);
            assert!(GithubLogin::parse(login.as_str()).is_ok());
        }
        Err(_) => {}
    }
    let _ = JobId::parse(user);
});

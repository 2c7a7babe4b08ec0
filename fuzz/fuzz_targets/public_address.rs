//! `ssh.public_host`: never a panic; what parses renders a `-J` spec that
//! parses back to the same address.
#![no_main]

use ci_gateway::config::PublicAddress;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addr) = PublicAddress::parse(raw) {
        let again = PublicAddress::parse(&addr.jump_spec()).expect("its own spec parses");
        assert_eq!(again, addr);
    }
});

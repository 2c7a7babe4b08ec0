//! The `ci-gateway` command, built inside the test crate so that its
//! end-to-end tests can run it as a process (`CARGO_BIN_EXE_…`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ci_gateway::cli::main()
}

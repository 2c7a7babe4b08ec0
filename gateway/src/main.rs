//! The `ci-gateway` binary; everything is in the library's `cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ci_gateway::cli::main()
}

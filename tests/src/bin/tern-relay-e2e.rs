//! The `tern-relay` command line, built inside this package so the end-to-end tests
//! get it through `CARGO_BIN_EXE_tern-relay-e2e`: always fresh, built with the same
//! features as the tests, and with no nested cargo call.

fn main() -> std::process::ExitCode {
    tern_relay::cli::main()
}

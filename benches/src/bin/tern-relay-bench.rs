//! The `tern-relay` command line, built inside this package so `tern-load` finds it
//! beside itself: `cargo build --release -p tern-benches` builds both.

fn main() -> std::process::ExitCode {
    tern_relay::cli::main()
}

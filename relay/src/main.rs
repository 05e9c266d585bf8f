//! `tern-relay`: run a Tern relay node. See `tern-relay --help`.

fn main() -> std::process::ExitCode {
    tern_relay::cli::main()
}

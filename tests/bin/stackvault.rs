//! The suite's copy of the `stackvault` binary. `cargo test` builds it before the integration
//! tests, with the suite's features (the engine's `testing` hooks: crash and pause points), so
//! no second build with other features runs inside the test process.

fn main() -> std::process::ExitCode {
    stackvault_cli::main()
}

//! The `stackvault` binary: everything lives in the `stackvault_cli` library.

fn main() -> std::process::ExitCode {
    stackvault_cli::main()
}

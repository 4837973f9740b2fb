fn main() -> std::process::ExitCode {
    cargo_distbuild::cli::main()
}

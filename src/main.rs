fn main() -> std::process::ExitCode {
    runner_provisioner::cli::main()
}

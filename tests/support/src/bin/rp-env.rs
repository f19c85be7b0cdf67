fn main() {
    eprintln!("rp-env: not built yet");
    std::process::exit(2);
}

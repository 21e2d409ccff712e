fn main() {
    eprintln!("veilnet-cni: not implemented yet");
    std::process::exit(1);
}

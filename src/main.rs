use clap::Parser;

fn main() {
    let cli = rudolph::cli::Cli::parse();
    if let Err(err) = rudolph::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

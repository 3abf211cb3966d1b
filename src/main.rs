use clap::Parser;

fn main() {
    // Die quietly when the reader of our output goes away (`rudolph … | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = rudolph::cli::Cli::parse();
    if let Err(err) = rudolph::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

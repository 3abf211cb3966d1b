use clap::Parser;

/// mimalloc instead of the system allocator: the tensor library allocates and frees large
/// buffers at every step, and glibc's malloc hands them back to the kernel and faults them in
/// again each time (page clearing showed up as a large share of training and decoding time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Die quietly when the reader of our output goes away (`rudolph … | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = rudolph::cli::Cli::parse();
    if let Err(err) = rudolph::cli::run(cli) {
        eprintln!("error: {}", describe(&err));
        std::process::exit(1);
    }
}

/// The error and its causes, leaving out a cause whose text the message before it already
/// contains (most of our errors spell out their source).
fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

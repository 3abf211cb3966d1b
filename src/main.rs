use clap::Parser;

/// mimalloc instead of the system allocator: the tensor library allocates and frees large
/// buffers at every step, and glibc's malloc hands them back to the kernel and faults them in
/// again each time (page clearing showed up as a large share of training and decoding time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Die quietly when the reader of our output goes away (`rudolph … | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed memory instead of handing it back to the kernel after 10 ms: tensors of a few
    // MiB are freed and allocated again at every step, and each return meant the kernel zeroing
    // fresh pages on the next touch (a tenth of a training step). Peak memory does not grow,
    // since the kept pages are what the next step allocates.
    // SAFETY: setting an allocator option, which mimalloc reads at its next purge.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
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

use clap::Parser;

mod cli;

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
    let cli = cli::Cli::parse();
    if let Some(problem) = rudolph::kernels::Cpu::setting_problem() {
        eprintln!("warning: {problem}");
    }
    // SAFETY: nothing has started a thread yet.
    let threads = unsafe { set_threads(cli.threads()) };
    if let Err(err) = threads.and_then(|()| cli::run(cli)) {
        eprintln!("error: {}", describe(&err));
        std::process::exit(1);
    }
}

/// Sizes the pools of tensor work: candle's CPU kernels and rayon's global pool both read
/// `RAYON_NUM_THREADS`.
///
/// # Safety
///
/// No other thread may exist: writing the environment races with any thread reading it.
unsafe fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(n) = threads else { return Ok(()) };
    anyhow::ensure!(n > 0, "--threads must be at least 1");
    // SAFETY: the caller guarantees that this is the only thread.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    Ok(())
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

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
    // SAFETY: setting a signal's disposition before any thread starts. A write past the file
    // size limit then fails with EFBIG, which the command reports, instead of killing it.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = cli::Cli::parse();
    // Keep freed memory instead of handing it back to the kernel after 10 ms: tensors of a few
    // MiB are freed and allocated again at every step, and each return meant the kernel zeroing
    // fresh pages on the next touch (a tenth of a training step). Peak memory does not grow,
    // since the kept pages are what the next step allocates. The server hands them back at once
    // instead: each of its request threads has a heap of its own, and each kept its peak (a soak
    // of 2,000 requests on the built-in model peaked 260 MiB above the loaded model when pages
    // were kept 10 ms, 116 MiB when they go at once).
    let purge_delay = if cli.serves() { 0 } else { -1 };
    // SAFETY: setting an allocator option, which mimalloc reads at its next purge.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay);
    }
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

/// The most worker threads per core: more only costs memory (each has its stack) and time.
const MAX_THREADS_PER_CORE: usize = 4;

/// Sizes the pools of tensor work: candle's CPU kernels and rayon's global pool both read
/// `RAYON_NUM_THREADS`. The count (`--threads`, else that variable) is bounded by the cores, and
/// the pool is built here, so that a count the machine cannot start is an error, not a panic
/// inside the first parallel loop.
///
/// # Safety
///
/// No other thread may exist: writing the environment races with any thread reading it.
unsafe fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    const ENV: &str = "RAYON_NUM_THREADS";
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = cores * MAX_THREADS_PER_CORE;
    let (n, name) = match threads {
        Some(n) => (n, format!("--threads {n}")),
        None => match std::env::var(ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let n = v
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("{ENV}={v} is not a count of threads"))?;
                // rayon reads 0 as "one per core".
                (if n == 0 { cores } else { n }, format!("{ENV}={v}"))
            }
            _ => return Ok(()),
        },
    };
    anyhow::ensure!(n > 0, "{name}: at least 1 thread");
    anyhow::ensure!(
        n <= cap,
        "{name} is more than the {cap} threads this machine can use ({MAX_THREADS_PER_CORE} for each of its {cores} cores)"
    );
    // SAFETY: the caller guarantees that this is the only thread.
    unsafe { std::env::set_var(ENV, n.to_string()) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {n} worker threads ({name}): {e}"))
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

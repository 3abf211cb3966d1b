//! What this CPU can run: one [`Cpu`] value, found once, from which every kernel picks its
//! instructions, and one switch (`$RUDOLPH_CPU`) that caps it.
//!
//! The crate is built for the baseline x86-64 (SSE2), where the compiler vectorises an element
//! loop four lanes wide. `simd_variants!` compiles such a loop again under `target_feature`
//! for AVX2 and AVX-512, and runs the widest the [`Cpu`] allows. Hand-written intrinsics (the
//! few-row and packed-bf16 products, the decoding attention's dot products) match on the level
//! to pick theirs. `cargo bench --bench attention` compares the levels on the 350M decoding
//! attention: with 192 cached rows per step read from memory, 19.3 ms at the baseline against
//! 15.6 ms with AVX2 or AVX-512 (one run); with the cache in the last-level cache all three take
//! 8–9 ms: the wider loops are no faster there, but with fewer instructions in flight more loads
//! from memory overlap.

/// Names the highest [`Level`] the kernels may use (`portable`, `avx2`, `avx512` or `amx`), to
/// compare kernels or to rule out a faulty one; unset, they use the best this CPU has.
pub const CPU_ENV: &str = "RUDOLPH_CPU";

/// Instruction-set levels, each including the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust for the baseline x86-64 (or any other CPU).
    Portable,
    /// AVX2 with FMA and F16C (any x86-64 of the last decade).
    Avx2,
    /// AVX-512F, and AVX-512 BF16 dot products where the CPU has them (AMD Zen 4, Intel Cooper
    /// Lake and later).
    Avx512,
    /// Intel AMX bf16 tiles (Sapphire Rapids and later Xeons), granted by the OS.
    Amx,
}

impl Level {
    pub const ALL: [Level; 4] = [Self::Portable, Self::Avx2, Self::Avx512, Self::Amx];

    /// The name [`CPU_ENV`] takes.
    pub fn id(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Amx => "amx",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.id() == s.trim())
            .ok_or_else(|| format!("'{s}': expected portable, avx2, avx512 or amx"))
    }
}

/// What the kernels may run on this CPU. Only [`Cpu::best`] and [`Cpu::available`] make one, so
/// holding a `Cpu` proves the CPU has its features (the kernels rely on it for safety).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    level: Level,
    /// AVX-512 BF16 dot products (`vdpbf16ps`); only with [`Level::Avx512`] or above.
    bf16_dot: bool,
}

impl Cpu {
    /// The highest level this CPU has, capped by `$RUDOLPH_CPU` (an unknown value is ignored:
    /// [`Cpu::setting_problem`] tells the caller).
    pub fn best() -> Self {
        static CHOSEN: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let top = detected();
            let cap = std::env::var(CPU_ENV)
                .ok()
                .and_then(|v| v.parse::<Level>().ok())
                .unwrap_or(Level::Amx);
            top.capped(cap)
        })
    }

    /// Every level this CPU can run, the portable one first, whatever `$RUDOLPH_CPU` says (the
    /// tests and benchmarks compare them).
    pub fn available() -> &'static [Self] {
        static ALL: std::sync::OnceLock<Vec<Cpu>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| {
            let top = detected();
            Level::ALL
                .into_iter()
                .filter(|&l| l <= top.level)
                .map(|l| top.capped(l))
                .collect()
        })
    }

    /// A message when `$RUDOLPH_CPU` is set to something [`Cpu::best`] cannot follow.
    pub fn setting_problem() -> Option<String> {
        let v = std::env::var(CPU_ENV).ok()?;
        match v.parse::<Level>() {
            Err(e) => Some(format!("{CPU_ENV}={e}; using the best this CPU has")),
            Ok(l) if l > detected().level => Some(format!(
                "{CPU_ENV}={v}: this CPU has at most {}",
                detected().level.id()
            )),
            Ok(_) => None,
        }
    }

    pub fn level(self) -> Level {
        self.level
    }

    /// Whether AVX-512 BF16 dot products may be used.
    pub fn has_bf16_dot(self) -> bool {
        self.bf16_dot
    }

    /// The vector width of the loops compiled per level.
    pub(crate) fn simd(self) -> Simd {
        Simd(match self.level {
            Level::Portable => Width::Baseline,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => Width::Avx2,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Amx => Width::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => Width::Baseline,
        })
    }

    fn capped(self, cap: Level) -> Self {
        let level = self.level.min(cap);
        Self {
            level,
            bf16_dot: self.bf16_dot && level >= Level::Avx512,
        }
    }
}

/// What this CPU (and, for AMX, the OS) offers, found once.
fn detected() -> Cpu {
    static FOUND: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2 && is_x86_feature_detected!("avx512f");
            let bf16_dot = avx512 && is_x86_feature_detected!("avx512bf16");
            let level = if avx512 && amx_granted() {
                Level::Amx
            } else if avx512 {
                Level::Avx512
            } else if avx2 {
                Level::Avx2
            } else {
                Level::Portable
            };
            Cpu { level, bf16_dot }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Cpu {
            level: Level::Portable,
            bf16_dot: false,
        }
    })
}

/// Whether the CPU has AMX bf16 tiles and the kernel grants this process the tile state (Linux
/// asks each process to request it, `ARCH_REQ_XCOMP_PERM`).
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// A vector width for kernels written as plain loops, from a [`Cpu`].
#[derive(Clone, Copy, Debug)]
pub struct Simd(pub(crate) Width);

#[derive(Clone, Copy, Debug)]
pub(crate) enum Width {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    /// The width the best [`Cpu`] runs.
    pub fn best() -> Self {
        Cpu::best().simd()
    }

    /// Every width this CPU can run, the baseline first (the tests and benchmarks compare them).
    pub fn available() -> Vec<Self> {
        let mut widths: Vec<Self> = Vec::new();
        for simd in Cpu::available().iter().map(|c| c.simd()) {
            if widths.last().is_none_or(|w| w.name() != simd.name()) {
                widths.push(simd);
            }
        }
        widths
    }

    /// The width's name: `baseline`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Width::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => "avx512",
        }
    }
}

/// `fn $name(simd, args…)` runs the `#[inline(always)]` function `$body` compiled for `simd`:
/// inlined into a `target_feature` wrapper, its loops vectorise that wide.
macro_rules! simd_variants {
    ($vis:vis $name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        $vis fn $name(simd: $crate::kernels::cpu::Simd, $($arg: $ty),*) {
            use $crate::kernels::cpu::Width;
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) {
                $body($($arg),*)
            }
            match simd.0 {
                Width::Baseline => $body($($arg),*),
                // SAFETY: only a `Cpu` makes a `Simd`, after finding the feature.
                #[cfg(target_arch = "x86_64")]
                Width::Avx2 => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Width::Avx512 => unsafe { avx512($($arg),*) },
            }
        }
    };
}
pub(crate) use simd_variants;

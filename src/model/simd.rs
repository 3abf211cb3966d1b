//! The widest vectors this CPU has, for kernels written as plain loops.
//!
//! The crate is built for the baseline x86-64 (SSE2), where the compiler vectorises an element
//! loop four lanes wide. [`simd_variants!`] compiles such a loop again under `target_feature`
//! for AVX2 and AVX-512, and [`Simd::best`] picks the widest at run time. (Hand-written
//! intrinsics, as in [`super::skinny`], choose their own kernels; where the compiler vectorises
//! a loop badly, as the decoding attention's dot products, a kernel matches on the level to
//! pick its intrinsics.) `cargo bench --bench attention` compares the levels on the 350M
//! decoding attention: with 192 cached rows per step read from memory, 19.3 ms at the baseline
//! against 15.6 ms with AVX2 or AVX-512 (one run); with the cache in the last-level cache all
//! three take 8–9 ms: the wider loops are no faster there, but with fewer instructions in flight
//! more loads from memory overlap.

/// A vector width this CPU can run. Only [`Simd::best`] and [`Simd::available`] make one, so
/// holding a `Simd` proves the CPU has its features (the kernels rely on it for safety).
#[derive(Clone, Copy, Debug)]
pub struct Simd(pub(crate) Level);

#[derive(Clone, Copy, Debug)]
pub(crate) enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    /// The widest level this CPU has.
    pub fn best() -> Self {
        *Self::available()
            .last()
            .expect("the baseline is always available")
    }

    /// Every level this CPU can run, the baseline first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut levels = vec![Self(Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                levels.push(Self(Level::Avx2));
            }
            if is_x86_feature_detected!("avx512f") {
                levels.push(Self(Level::Avx512));
            }
        }
        levels
    }

    /// The level's name: `baseline`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "avx512",
        }
    }
}

/// `fn $name(simd, args…)` runs the `#[inline(always)]` function `$body` compiled for `simd`:
/// inlined into a `target_feature` wrapper, its loops vectorise that wide.
macro_rules! simd_variants {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        fn $name(simd: $crate::model::simd::Simd, $($arg: $ty),*) {
            use $crate::model::simd::Level;
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
                Level::Baseline => $body($($arg),*),
                // SAFETY: only `Simd::available` makes a `Simd`, after finding the feature.
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { avx512($($arg),*) },
            }
        }
    };
}
pub(crate) use simd_variants;

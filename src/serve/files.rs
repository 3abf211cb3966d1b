//! Pictures answered as `url`: kept in memory for an hour under an id nobody can guess, the
//! oldest dropped first when they fill their budget.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a picture's URL works.
pub const LIFETIME: Duration = Duration::from_secs(3600);

/// The most bytes of pictures kept.
const BUDGET: usize = 256 << 20;

#[derive(Default)]
pub struct Files {
    kept: Mutex<VecDeque<Kept>>,
}

struct Kept {
    id: String,
    until: Instant,
    png: Vec<u8>,
}

impl Files {
    /// Keeps `png` and returns its id.
    pub fn put(&self, png: Vec<u8>) -> String {
        let id = format!("img-{}", random_id());
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        kept.retain(|k| k.until > now);
        let mut total: usize = kept.iter().map(|k| k.png.len()).sum::<usize>() + png.len();
        while total > BUDGET {
            match kept.pop_front() {
                Some(old) => total -= old.png.len(),
                None => break,
            }
        }
        kept.push_back(Kept {
            id: id.clone(),
            until: now + LIFETIME,
            png,
        });
        id
    }

    /// The picture kept under `id`, while its hour lasts.
    pub fn get(&self, id: &str) -> Option<Vec<u8>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        kept.iter()
            .find(|k| k.id == id && k.until > now)
            .map(|k| k.png.clone())
    }
}

/// 128 random bits in hex: an id nobody can guess.
pub fn random_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// 64 random bits from the standard library's per-process random hash keys.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

//! The only source of randomness in quant-robust.
//!
//! Every random draw (weight init, shuffling, augmentation, subsets, attack random starts)
//! comes from a [`Rng`]: ChaCha8 seeded from the run's seed and a *stream name*, so that
//! two uses never share a sequence and adding a use elsewhere does not shift this one.
//! candle's own CPU generator cannot be seeded, so it is never used.
//!
//! A generator's position can be saved ([`RngState`]) and restored exactly, which is what
//! resuming a training run needs.

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A seeded, named random stream.
#[derive(Debug, Clone)]
pub struct Rng {
    seed: u64,
    stream: String,
    inner: ChaCha8Rng,
}

/// The exact position of a [`Rng`], for checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub stream: String,
    /// ChaCha word position (u128 as a decimal string: JSON numbers cannot hold it).
    pub word_pos: String,
}

fn derive_key(seed: u64, stream: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"quant-robust/rng/v1\0");
    h.update(seed.to_le_bytes());
    h.update(stream.as_bytes());
    h.finalize().into()
}

impl Rng {
    /// The stream `stream` of seed `seed`.
    pub fn new(seed: u64, stream: &str) -> Self {
        Rng {
            seed,
            stream: stream.to_string(),
            inner: ChaCha8Rng::from_seed(derive_key(seed, stream)),
        }
    }

    /// A child stream, independent of this one's position: `stream/name`.
    pub fn fork(&self, name: &str) -> Self {
        Rng::new(self.seed, &format!("{}/{name}", self.stream))
    }

    /// The seed this stream was made from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The saved position.
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            stream: self.stream.clone(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    /// A generator at a saved position.
    pub fn from_state(state: &RngState) -> crate::Result<Self> {
        let pos: u128 = state.word_pos.parse().map_err(|_| {
            crate::Error::config("rng.word_pos", &state.word_pos, "not an unsigned integer")
        })?;
        let mut rng = Rng::new(state.seed, &state.stream);
        rng.inner.set_word_pos(pos);
        Ok(rng)
    }

    /// Uniform in [0, 1).
    pub fn uniform_f32(&mut self) -> f32 {
        self.inner.random::<f32>()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.inner.random::<bool>()
    }

    /// `n` draws uniform in [lo, hi).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.inner.random::<f32>())
            .collect()
    }

    /// `n` standard normal draws (Box-Muller), scaled by `std`.
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // u1 in (0, 1] so that ln is finite.
            let u1 = 1.0 - self.inner.random::<f64>();
            let u2 = self.inner.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push((r * t.cos()) as f32 * std);
            out.push((r * t.sin()) as f32 * std);
        }
        out.truncate(n);
        out
    }

    /// A uniformly random permutation of 0..n (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        self.shuffle(&mut p);
        p
    }

    /// Shuffles a slice in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.inner.random_range(0..=i);
            xs.swap(i, j);
        }
    }

    /// Raw 64-bit draw.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

//! Shared test helpers: data paths and small data sets.

use std::path::PathBuf;
use std::sync::OnceLock;

use quant_robust::data::{self, CifarData, DataSource};

/// The shipped archive beside the checkout (developers' machines and this workplace's CI
/// have `../shared/data`). Where `../shared` exists the archive must be there; a checkout
/// with no `../shared` at all (a public CI runner) skips these tests, saying so.
pub fn shipped_archive() -> Option<PathBuf> {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let p = shared.join("data/cifar10-jpeg.tar.gz");
    if p.is_file() {
        Some(p)
    } else if shared.is_dir() {
        panic!("{} is missing", p.display());
    } else {
        eprintln!("skipping: ../shared/data/cifar10-jpeg.tar.gz not found");
        None
    }
}

/// The embedded sample, loaded once per test binary.
pub fn sample() -> &'static CifarData {
    // The heavy tests all start here: allocate as the CLI does (device::keep_freed_memory).
    quant_robust::device::keep_freed_memory();
    static S: OnceLock<CifarData> = OnceLock::new();
    S.get_or_init(|| data::load(&DataSource::Embedded).expect("embedded sample loads"))
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// max |t| over all elements (f32).
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// (max |a − b|, max |b|) over all elements: a difference and the scale it is judged against.
pub fn max_diff_and_scale(a: &candle_core::Tensor, b: &candle_core::Tensor) -> (f32, f32) {
    (max_abs(&(a - b).unwrap()), max_abs(b))
}

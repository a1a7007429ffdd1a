//! Shared test helpers: data paths and small data sets.

use std::path::PathBuf;
use std::sync::OnceLock;

use quant_robust::data::{self, CifarData, DataSource};

/// The shipped archive beside the checkout (developers' machines and CI have it).
pub fn shipped_archive() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-jpeg.tar.gz");
    if p.is_file() {
        Some(p)
    } else if std::env::var_os("CI").is_some() {
        panic!("CI must have ../shared/data/cifar10-jpeg.tar.gz beside the checkout");
    } else {
        eprintln!("skipping: ../shared/data/cifar10-jpeg.tar.gz not found");
        None
    }
}

/// The embedded sample, loaded once per test binary.
pub fn sample() -> &'static CifarData {
    static S: OnceLock<CifarData> = OnceLock::new();
    S.get_or_init(|| data::load(&DataSource::Embedded).expect("embedded sample loads"))
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

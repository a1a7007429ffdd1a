//! The canonical CIFAR-10 binary release (`cifar-10-batches-bin`).
//!
//! `data_batch_1.bin` … `data_batch_5.bin` (training) and `test_batch.bin` (test); each is
//! 10,000 records of 3,073 bytes: one label byte (0-9) then 1,024 red, 1,024 green and
//! 1,024 blue bytes, rows top to bottom — already our CHW layout. Class names come from
//! `batches.meta.txt` where present. A missing batch, a size that is not a whole number of
//! records, or a label ≥ 10 is an error naming the file.

use std::path::Path;

use super::{CifarData, DataIdentity, Dataset, Format, CIFAR10_CLASSES, IMAGE_BYTES};
use crate::{Error, Result};

/// Bytes of one record.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Records per batch file in the canonical release.
pub const RECORDS_PER_BATCH: usize = 10_000;
/// The training batch files.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";

/// Parses one batch file's bytes (any whole number of records) into `ds`.
pub fn parse_batch(bytes: &[u8], path: &Path, ds: &mut Dataset) -> Result<()> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(Error::bad_data(
            path,
            format!(
                "size {} bytes is not a whole number of {RECORD_BYTES}-byte records \
                 (truncated or not a CIFAR-10 batch)",
                bytes.len()
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = rec[0];
        if label as usize >= CIFAR10_CLASSES.len() {
            return Err(Error::bad_data(
                path,
                format!("record {i}: label {label} is not a CIFAR-10 class (0-9)"),
            ));
        }
        ds.labels.push(label);
        ds.images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

fn read_batches(dir: &Path, files: &[&str]) -> Result<Dataset> {
    let mut ds = Dataset::empty();
    for f in files {
        let p = dir.join(f);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        parse_batch(&bytes, &p, &mut ds)?;
    }
    Ok(ds)
}

/// Reads a `cifar-10-batches-bin` folder (all five training batches and the test batch).
pub fn read_dir(dir: &Path) -> Result<CifarData> {
    let mut train = read_batches(dir, &TRAIN_FILES)?;
    let mut test = read_batches(dir, &[TEST_FILE])?;
    let meta = dir.join("batches.meta.txt");
    if meta.is_file() {
        let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() != CIFAR10_CLASSES.len() {
            return Err(Error::bad_data(
                &meta,
                format!("lists {} class names, expected 10", names.len()),
            ));
        }
        train.classes = names.clone();
        test.classes = names;
    }
    Ok(CifarData {
        identity: DataIdentity {
            name: "cifar10".into(),
            format: Format::CifarBinary,
            path: dir.display().to_string(),
            file_sha256: None,
            train_sha256: train.content_sha256(),
            test_sha256: test.content_sha256(),
            n_train: train.len(),
            n_test: test.len(),
        },
        train,
        test,
    })
}

/// Writes a split in the binary record format (used by tests and by `export`).
pub fn write_batch(path: &Path, ds: &Dataset) -> Result<()> {
    let mut bytes = Vec::with_capacity(ds.len() * RECORD_BYTES);
    for i in 0..ds.len() {
        bytes.push(ds.labels[i]);
        bytes.extend_from_slice(ds.image(i));
    }
    crate::io::write_bytes_atomic(path, &bytes)
}

//! The shipped `cifar10-jpeg.tar.gz`: gzip + tar + JPEG, read in one pass.
//!
//! Entries are `{train,test}/<class>/NNNN.jpg`; the JPEGs are decoded in parallel.
//! A corrupt gzip stream, a truncated tar, an unknown class folder, an undecodable JPEG or
//! an image that is not 32×32 is an error naming the archive and the entry.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{assemble, class_label, parse_image_path, CifarData, DataIdentity, Format, RawImage};
use crate::{Error, Result};

/// Reads an archive file.
pub fn read_archive(path: &Path) -> Result<CifarData> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_archive_bytes(&bytes, path)
}

/// Reads an archive already in memory; `path` is used in messages and the identity.
pub fn read_archive_bytes(bytes: &[u8], path: &Path) -> Result<CifarData> {
    let file_sha256 = {
        use sha2::{Digest, Sha256};
        super::hex(&Sha256::digest(bytes))
    };
    let raw = raw_images(bytes, path)?;
    if raw.is_empty() {
        return Err(Error::bad_data(
            path,
            "archive holds no train/<class>/*.jpg or test/<class>/*.jpg images",
        ));
    }
    let (train, test) = assemble(raw)?;
    Ok(CifarData {
        identity: DataIdentity {
            name: "cifar10-jpeg".into(),
            format: Format::JpegArchive,
            path: path.display().to_string(),
            file_sha256: Some(file_sha256),
            train_sha256: train.content_sha256(),
            test_sha256: test.content_sha256(),
            n_train: train.len(),
            n_test: test.len(),
        },
        train,
        test,
    })
}

/// Writes a gzip'd tar with the given `(entry path, bytes)` pairs, atomically.
/// Used by `make-sample` (the embedded sample keeps the original JPEG bytes).
pub fn write_archive(path: &Path, entries: &[(String, Vec<u8>)]) -> Result<()> {
    crate::io::write_atomic(path, |w| {
        let gz = flate2::write::GzEncoder::new(w, flate2::Compression::best());
        let mut b = tar::Builder::new(gz);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice())?;
        }
        b.into_inner()?.finish()?;
        Ok(())
    })
}

/// One undecoded image entry of an archive.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// `train/<class>/<name>` or `test/<class>/<name>`.
    pub path: String,
    pub train: bool,
    pub label: u8,
    /// The file's bytes (JPEG).
    pub bytes: Vec<u8>,
}

/// Reads the raw (undecoded) image entries of an archive, sorted by split (train first),
/// class and name.
pub fn read_raw_entries(path: &Path) -> Result<Vec<RawEntry>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out: Vec<RawEntry> = raw_images(&bytes, path)?
        .into_iter()
        .map(|r| {
            let train = r.split == super::Split::Train;
            let dir = if train { "train" } else { "test" };
            let class = super::CIFAR10_CLASSES[r.label as usize];
            RawEntry {
                path: format!("{dir}/{class}/{}", r.name),
                train,
                label: r.label,
                bytes: r.bytes,
            }
        })
        .collect();
    out.sort_by(|a, b| (!a.train, a.label, &a.path).cmp(&(!b.train, b.label, &b.path)));
    Ok(out)
}

/// The `{train,test}/<class>/*` image entries of a tar.gz in memory, in archive order, their
/// bytes undecoded. `path` names the archive in messages and prefixes each entry's path.
fn raw_images(bytes: &[u8], path: &Path) -> Result<Vec<RawImage>> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut tar = tar::Archive::new(gz);
    let mut raw = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| Error::bad_data(path, format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry = entry
            .map_err(|e| Error::bad_data(path, format!("corrupt or truncated archive: {e}")))?;
        let rel: PathBuf = entry
            .path()
            .map_err(|e| Error::bad_data(path, format!("bad entry name: {e}")))?
            .into_owned();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some((split, class, name)) = parse_image_path(&rel) else {
            continue;
        };
        let entry_path = path.join(&rel);
        let label = class_label(&class, &entry_path)?;
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(|e| {
            Error::bad_data(&entry_path, format!("corrupt or truncated archive: {e}"))
        })?;
        raw.push(RawImage {
            split,
            label,
            name,
            path: entry_path,
            bytes: data,
        });
    }
    // tar stops at its end-of-archive blocks; reading the gzip stream to its end checks its
    // CRC, which covers every byte: a changed byte that still inflates is caught here.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
        .map_err(|e| Error::bad_data(path, format!("corrupt or truncated archive: {e}")))?;
    Ok(raw)
}

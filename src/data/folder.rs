//! An image-folder tree: `ROOT/{train,test}/<class>/*.{png,jpg,jpeg}`.
//!
//! Class folders must be CIFAR-10 class names (an unknown one is an error naming it);
//! every image must decode and be 32×32. Files are ordered by class, then by name.

use std::path::Path;

use super::{assemble, class_label, parse_image_path, CifarData, DataIdentity, Format, RawImage};
use crate::{Error, Result};

/// Reads both splits under `root`.
pub fn read_folder(root: &Path) -> Result<CifarData> {
    let mut raw = Vec::new();
    for split in ["train", "test"] {
        let split_dir = root.join(split);
        if !split_dir.is_dir() {
            continue;
        }
        let classes = std::fs::read_dir(&split_dir).map_err(|e| Error::io(&split_dir, e))?;
        for class in classes {
            let class = class.map_err(|e| Error::io(&split_dir, e))?;
            let class_dir = class.path();
            if !class_dir.is_dir() {
                continue;
            }
            let name = class.file_name().to_string_lossy().into_owned();
            class_label(&name, &class_dir)?;
            let files = std::fs::read_dir(&class_dir).map_err(|e| Error::io(&class_dir, e))?;
            for file in files {
                let file = file.map_err(|e| Error::io(&class_dir, e))?;
                let path = file.path();
                let rel = Path::new(split).join(&name).join(file.file_name());
                let Some((split, class, fname)) = parse_image_path(&rel) else {
                    continue;
                };
                let label = class_label(&class, &path)?;
                let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                raw.push(RawImage {
                    split,
                    label,
                    name: fname,
                    path,
                    bytes,
                });
            }
        }
    }
    if raw.is_empty() {
        return Err(Error::bad_data(
            root,
            "no images found under train/<class>/ or test/<class>/",
        ));
    }
    let (train, test) = assemble(raw)?;
    Ok(CifarData {
        identity: DataIdentity {
            name: "folder".into(),
            format: Format::ImageFolder,
            path: root.display().to_string(),
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

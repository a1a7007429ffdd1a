//! CIFAR-10 data: three on-disk formats, one in-memory [`Dataset`].
//!
//! - [`archive`]: the shipped `cifar10-jpeg.tar.gz` (`{train,test}/<class>/NNNN.jpg`), read
//!   directly (gzip + tar + JPEG decode, decoded in parallel);
//! - [`cifar_bin`]: the canonical `cifar-10-batches-bin` release;
//! - [`folder`]: an image-folder tree `{train,test}/<class>/*.{png,jpg}`.
//!
//! Images are kept as `u8`, N×3×32×32 (CHW per image), labels as `u8` in CIFAR-10's own
//! order ([`CIFAR10_CLASSES`]). Files are ordered by class, then by name, so every loader
//! gives the same order for the same files. [`subset`] draws seeded, class-stratified
//! subsets; [`augment`] and [`batch`] turn a data set into device batches.

pub mod archive;
pub mod augment;
pub mod batch;
pub mod cifar_bin;
pub mod folder;
pub mod subset;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Image side in pixels.
pub const SIDE: usize = 32;
/// Colour channels.
pub const CHANNELS: usize = 3;
/// Bytes of one image (3×32×32).
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// CIFAR-10's class names, label = index.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The small sample committed with the code: 2,000 training and 1,000 test images of
/// cifar10-jpeg (class-balanced, seeded; the original JPEG bytes, not re-encoded), so that
/// the main command works on a fresh clone with no data anywhere. Made by
/// `quant-robust make-sample` (README, "Data").
pub const EMBEDDED_SAMPLE: &[u8] = include_bytes!("embedded/cifar10-jpeg-sample.tar.gz");

/// The data set name of [`EMBEDDED_SAMPLE`].
pub const SAMPLE_NAME: &str = "cifar10-jpeg-sample";

/// One split of a data set, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// N×3×32×32 bytes, CHW per image.
    pub images: Vec<u8>,
    /// N labels, each < `classes.len()`.
    pub labels: Vec<u8>,
    /// Class names, label = index.
    pub classes: Vec<String>,
}

impl Dataset {
    /// An empty split with CIFAR-10's classes.
    pub fn empty() -> Self {
        Dataset {
            images: Vec::new(),
            labels: Vec::new(),
            classes: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True if there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The bytes of image `i` (CHW).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            images,
            labels,
            classes: self.classes.clone(),
        }
    }

    /// The first `n` images (all if fewer).
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            images: self.images[..n * IMAGE_BYTES].to_vec(),
            labels: self.labels[..n].to_vec(),
            classes: self.classes.clone(),
        }
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// sha256 over labels and pixels: identifies the decoded content whatever the format.
    pub fn content_sha256(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.len() as u64).to_le_bytes());
        h.update(&self.labels);
        h.update(&self.images);
        hex(&h.finalize())
    }
}

/// Which format a data source was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// gzip'd tar of `{train,test}/<class>/*.jpg` (cifar10-jpeg).
    JpegArchive,
    /// The canonical binary batches.
    CifarBinary,
    /// An image-folder tree.
    ImageFolder,
}

/// Where a data set came from: recorded in every manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// Data set name: `cifar10-jpeg`, `cifar10-jpeg-sample`, `cifar10`, or `folder`.
    pub name: String,
    pub format: Format,
    /// The path read (`<embedded>` for the committed sample).
    pub path: String,
    /// sha256 of the archive file, where the source is one file.
    pub file_sha256: Option<String>,
    /// sha256 of the decoded training split (labels + pixels).
    pub train_sha256: String,
    /// sha256 of the decoded test split (labels + pixels).
    pub test_sha256: String,
    pub n_train: usize,
    pub n_test: usize,
}

impl DataIdentity {
    /// Whether this is the committed sample (numbers on it prove the code path, nothing
    /// about the paper).
    pub fn is_sample(&self) -> bool {
        self.name == SAMPLE_NAME
    }
}

/// A loaded data set: both splits and where they came from.
#[derive(Debug, Clone)]
pub struct CifarData {
    pub train: Dataset,
    pub test: Dataset,
    pub identity: DataIdentity,
}

/// What `--data` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The committed sample (2,000 train / 1,000 test images).
    Embedded,
    /// A file or folder; the format is detected.
    Path(PathBuf),
}

impl std::str::FromStr for DataSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "embedded" {
            DataSource::Embedded
        } else {
            DataSource::Path(PathBuf::from(s))
        })
    }
}

/// Where the shipped archive is looked for when `--data` is not given, relative to the
/// working directory: the developers' and CI's checkouts have `../shared` beside them.
pub const DEFAULT_ARCHIVE_CANDIDATES: [&str; 2] = [
    "../shared/data/cifar10-jpeg.tar.gz",
    "shared/data/cifar10-jpeg.tar.gz",
];

/// The default source: the shipped archive. Where it is not found, an error that says where
/// it was looked for (never a quiet fall back to the 3,000-image sample, which would make a
/// "study" of the sample).
pub fn default_source() -> Result<DataSource> {
    for c in DEFAULT_ARCHIVE_CANDIDATES {
        if Path::new(c).is_file() {
            return Ok(DataSource::Path(PathBuf::from(c)));
        }
    }
    Err(Error::config(
        "data",
        "default",
        format!(
            "the shipped archive is not at {} (relative to {}): give the data's path, or \
             `embedded` for the committed 3,000-image sample",
            DEFAULT_ARCHIVE_CANDIDATES.join(" or "),
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the working directory".into())
        ),
    ))
}

/// Loads both splits from a source, detecting the format. Every split must hold images of
/// every class: less data than a CIFAR-10 layout promises is an error, never a smaller set.
pub fn load(source: &DataSource) -> Result<CifarData> {
    let d = load_unchecked(source)?;
    let path = match source {
        DataSource::Embedded => PathBuf::from("<embedded>"),
        DataSource::Path(p) => p.clone(),
    };
    for (split, ds) in [("train", &d.train), ("test", &d.test)] {
        check_split(&path, split, ds)?;
    }
    Ok(d)
}

/// A split is usable: 10 classes, labels in range, images of each class, pixel bytes for
/// each label.
fn check_split(path: &Path, split: &str, ds: &Dataset) -> Result<()> {
    let problem = |p: String| Err(Error::bad_data(path, format!("{split} split: {p}")));
    if ds.classes.len() != CIFAR10_CLASSES.len() {
        return problem(format!("{} classes, expected 10", ds.classes.len()));
    }
    if ds.labels.is_empty() {
        return problem("no images (a CIFAR-10 layout has both splits)".into());
    }
    if ds.images.len() != ds.labels.len() * IMAGE_BYTES {
        return problem(format!(
            "{} bytes of pixels for {} labels",
            ds.images.len(),
            ds.labels.len()
        ));
    }
    let mut counts = vec![0usize; ds.classes.len()];
    for &l in &ds.labels {
        match counts.get_mut(l as usize) {
            Some(c) => *c += 1,
            None => return problem(format!("label {l} is not a class (0-9)")),
        }
    }
    if let Some(k) = counts.iter().position(|&c| c == 0) {
        return problem(format!("class {k} ({}) has no images", ds.classes[k]));
    }
    Ok(())
}

fn load_unchecked(source: &DataSource) -> Result<CifarData> {
    match source {
        DataSource::Embedded => {
            archive::read_archive_bytes(EMBEDDED_SAMPLE, Path::new("<embedded>")).map(|mut d| {
                d.identity.name = SAMPLE_NAME.into();
                d
            })
        }
        DataSource::Path(p) => load_path(p),
    }
}

fn load_path(p: &Path) -> Result<CifarData> {
    if !p.exists() {
        return Err(Error::bad_data(
            p,
            "no such file or folder (give a cifar10-jpeg .tar.gz, a cifar-10-batches-bin \
             folder, an image-folder tree, or `embedded`)",
        ));
    }
    if p.is_file() {
        return archive::read_archive(p);
    }
    let shipped = p.join("cifar10-jpeg.tar.gz");
    if shipped.is_file() {
        return archive::read_archive(&shipped);
    }
    for dir in [p.to_path_buf(), p.join("cifar-10-batches-bin")] {
        if dir.join("data_batch_1.bin").exists() || dir.join("test_batch.bin").exists() {
            return cifar_bin::read_dir(&dir);
        }
    }
    if p.join("train").is_dir() || p.join("test").is_dir() {
        return folder::read_folder(p);
    }
    Err(Error::bad_data(
        p,
        "not a recognized CIFAR-10 layout: expected cifar10-jpeg.tar.gz, \
         data_batch_{1..5}.bin + test_batch.bin, or train/<class>/ and test/<class>/ folders",
    ))
}

/// The label of a class folder name, or an error naming the file and the known classes.
pub(crate) fn class_label(class: &str, path: &Path) -> Result<u8> {
    CIFAR10_CLASSES
        .iter()
        .position(|c| *c == class)
        .map(|i| i as u8)
        .ok_or_else(|| {
            Error::bad_data(
                path,
                format!(
                    "unknown class folder `{class}` (CIFAR-10 classes: {})",
                    CIFAR10_CLASSES.join(", ")
                ),
            )
        })
}

/// Decodes a JPEG with libjpeg-turbo's decoder (through the `mozjpeg` crate): the same
/// pixels as PIL and torchvision, so the same file gives the same input here as in a PyTorch
/// pipeline (zune-jpeg and jpeg-decoder differ from it by up to 4 levels). Returns HWC RGB.
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    let run = || -> std::io::Result<(usize, usize, Vec<u8>)> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (d.width(), d.height());
        let mut img = d.rgb()?;
        let px: Vec<[u8; 3]> = img.read_scanlines()?;
        img.finish()?;
        Ok((w, h, px.into_iter().flatten().collect()))
    };
    // libjpeg reports fatal errors by unwinding (without the panic hook); catch them.
    match std::panic::catch_unwind(run) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libjpeg error".into())),
    }
}

/// Decodes a JPEG or PNG into 3×32×32 CHW bytes; any other size is an error.
pub(crate) fn decode_image(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let cannot = |e: String| Error::bad_data(path, format!("cannot decode image: {e}"));
    let (w, h, hwc) = if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes).map_err(cannot)?
    } else {
        let img = image::load_from_memory(bytes).map_err(|e| cannot(e.to_string()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        (w, h, img.to_rgb8().into_raw())
    };
    if w != SIDE || h != SIDE {
        return Err(Error::bad_data(
            path,
            format!("image is {w}x{h}, expected {SIDE}x{SIDE}"),
        ));
    }
    if hwc.len() != IMAGE_BYTES {
        return Err(Error::bad_data(path, "decoded image has the wrong size"));
    }
    let mut chw = vec![0u8; IMAGE_BYTES];
    for (p, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * SIDE * SIDE + p] = px[c];
        }
    }
    Ok(chw)
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex(&h.finalize()))
}

/// A named image file found in a tree or archive, before decoding.
pub(crate) struct RawImage {
    pub split: Split,
    pub label: u8,
    /// File name inside its class folder (the sort key after the label).
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Train or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Split {
    Train,
    Test,
}

/// Sorts by (split, class, name), decodes in parallel, and builds both splits.
/// Any undecodable image fails the whole load (nothing partial is returned).
pub(crate) fn assemble(mut raw: Vec<RawImage>) -> Result<(Dataset, Dataset)> {
    use rayon::prelude::*;
    raw.sort_by(|a, b| (a.split, a.label, &a.name).cmp(&(b.split, b.label, &b.name)));
    let decoded: Vec<Vec<u8>> = raw
        .par_iter()
        .map(|r| decode_image(&r.bytes, &r.path))
        .collect::<Result<_>>()?;
    let mut train = Dataset::empty();
    let mut test = Dataset::empty();
    for (r, img) in raw.iter().zip(decoded) {
        let d = match r.split {
            Split::Train => &mut train,
            Split::Test => &mut test,
        };
        d.images.extend_from_slice(&img);
        d.labels.push(r.label);
    }
    Ok((train, test))
}

/// Parses `split/class/file` (with an optional leading folder) into its parts.
/// Returns `None` for entries that are not image files (folders, READMEs).
pub(crate) fn parse_image_path(rel: &Path) -> Option<(Split, String, String)> {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.len() < 3 {
        return None;
    }
    let n = parts.len();
    let (split, class, name) = (&parts[n - 3], &parts[n - 2], &parts[n - 1]);
    let lower = name.to_ascii_lowercase();
    if !(lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png")) {
        return None;
    }
    let split = match split.as_str() {
        "train" => Split::Train,
        "test" => Split::Test,
        _ => return None,
    };
    Some((split, class.clone(), name.clone()))
}

//! Data: each loader on real files, bad input, subsets, augmentation.

use std::path::Path;

use candle_core::{Device, Tensor};
use quant_robust::data::augment::{self, AugmentConfig, AugmentDraw};
use quant_robust::data::batch::{epoch_batches, DeviceData};
use quant_robust::data::subset::{class_quotas, stratified, stratified_indices, SubsetSize};
use quant_robust::data::{self, cifar_bin, DataSource, Dataset, Format, IMAGE_BYTES};
use quant_robust::rng::Rng;
use quant_robust::Error;

use crate::common::{sample, shipped_archive, tempdir};

#[test]
fn shipped_archive_loads_whole_and_matches_its_checksum() {
    let Some(p) = shipped_archive() else { return };
    let t = std::time::Instant::now();
    let d = data::load(&DataSource::Path(p.clone())).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(d.train.len(), 50_000);
    assert_eq!(d.test.len(), 10_000);
    assert_eq!(d.train.class_counts(), vec![5000; 10]);
    assert_eq!(d.test.class_counts(), vec![1000; 10]);
    assert_eq!(d.identity.format, Format::JpegArchive);
    let sums = std::fs::read_to_string(p.with_file_name("SHA256SUMS")).unwrap();
    let expected = sums.split_whitespace().next().unwrap();
    assert_eq!(d.identity.file_sha256.as_deref(), Some(expected));
    // The decoded test split equals PIL's (libjpeg-turbo) decode pixel for pixel: made by
    // `python3 scripts/pil_split_sha256.py ../shared/data/cifar10-jpeg.tar.gz test`
    // (Pillow 13.0, numpy 2.4). Another JPEG decoder (zune-jpeg, jpeg-decoder) differs by up
    // to 4 levels and fails this.
    assert_eq!(
        d.identity.test_sha256,
        "719d5deebd427efc214626d16c502be1b435680d6fa993a2b72f38201b1f3a88"
    );
    // Decoding 60,000 JPEGs takes seconds, not minutes (2 cores).
    assert!(secs < 60.0, "loading took {secs:.1}s");
    // Pixel statistics of CIFAR-10 (mean ≈ 0.47): a decode in the wrong channel order or
    // layout would still pass the counts.
    let mean: f64 =
        d.test.images.iter().map(|&b| b as f64).sum::<f64>() / d.test.images.len() as f64 / 255.0;
    assert!((mean - 0.473).abs() < 0.01, "mean pixel {mean}");
    let red: f64 = (0..1000)
        .map(|i| {
            d.test.image(i)[..1024]
                .iter()
                .map(|&b| b as f64)
                .sum::<f64>()
                / 1024.0
        })
        .sum::<f64>()
        / 1000.0
        / 255.0;
    let blue: f64 = (0..1000)
        .map(|i| {
            d.test.image(i)[2048..]
                .iter()
                .map(|&b| b as f64)
                .sum::<f64>()
                / 1024.0
        })
        .sum::<f64>()
        / 1000.0
        / 255.0;
    // Airplanes (the first 1,000 test images): sky, bluer than red.
    assert!(
        blue > red,
        "airplane images: blue {blue} should exceed red {red}"
    );
}

#[test]
fn embedded_sample_is_balanced_and_equals_the_archive_images() {
    let s = sample();
    assert_eq!(s.train.class_counts(), vec![200; 10]);
    assert_eq!(s.test.class_counts(), vec![100; 10]);
    assert_eq!(s.identity.name, "cifar10-jpeg-sample");
    let Some(p) = shipped_archive() else { return };
    let full = data::load(&DataSource::Path(p)).unwrap();
    // Every sampled test image is byte-identical (decoded) to one of the same class.
    for i in (0..s.test.len()).step_by(97) {
        let img = s.test.image(i);
        let label = s.test.labels[i];
        let found =
            (0..full.test.len()).any(|j| full.test.labels[j] == label && full.test.image(j) == img);
        assert!(found, "sample test image {i} not in the archive");
    }
}

fn write_binary_release(dir: &Path, train: &Dataset, test: &Dataset) {
    let per = train.len().div_ceil(5);
    for (k, f) in cifar_bin::TRAIN_FILES.iter().enumerate() {
        let idx: Vec<usize> = (k * per..((k + 1) * per).min(train.len())).collect();
        cifar_bin::write_batch(&dir.join(f), &train.select(&idx)).unwrap();
    }
    cifar_bin::write_batch(&dir.join(cifar_bin::TEST_FILE), test).unwrap();
}

#[test]
fn binary_release_round_trips() {
    let s = sample();
    let dir = tempdir();
    let root = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&root).unwrap();
    write_binary_release(&root, &s.train, &s.test);
    std::fs::write(
        root.join("batches.meta.txt"),
        data::CIFAR10_CLASSES.join("\n") + "\n\n",
    )
    .unwrap();
    // Detected from the parent folder too.
    let d = data::load(&DataSource::Path(dir.path().to_path_buf())).unwrap();
    assert_eq!(d.identity.format, Format::CifarBinary);
    assert_eq!(d.train, s.train);
    assert_eq!(d.test, s.test);
    assert_eq!(d.identity.train_sha256, s.identity.train_sha256);
}

#[test]
fn binary_release_bad_input_names_the_file() {
    let s = sample();
    let dir = tempdir();
    write_binary_release(dir.path(), &s.train.take(50), &s.test.take(10));
    // Truncated batch.
    let f = dir.path().join("data_batch_3.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = data::load(&DataSource::Path(dir.path().into())).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("whole number"),
        "{msg}"
    );
    // Bad label.
    let mut bad = bytes.clone();
    bad[cifar_bin::RECORD_BYTES] = 10;
    std::fs::write(&f, &bad).unwrap();
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("label 10"),
        "{msg}"
    );
    // Missing batch.
    std::fs::write(&f, &bytes).unwrap();
    std::fs::remove_file(dir.path().join("data_batch_5.bin")).unwrap();
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("data_batch_5.bin"), "{msg}");
}

fn write_png(path: &Path, chw: &[u8], side: u32) {
    let s = side as usize;
    let mut hwc = vec![0u8; 3 * s * s];
    for p in 0..s * s {
        for c in 0..3 {
            hwc[p * 3 + c] = chw[c * s * s + p];
        }
    }
    image::RgbImage::from_raw(side, side, hwc)
        .unwrap()
        .save(path)
        .unwrap();
}

fn write_folder(root: &Path, split: &str, ds: &Dataset) {
    for i in 0..ds.len() {
        let class = &ds.classes[ds.labels[i] as usize];
        let dir = root.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        write_png(&dir.join(format!("{i:05}.png")), ds.image(i), 32);
    }
}

#[test]
fn image_folder_round_trips_pixels_exactly() {
    let s = sample();
    let idx: Vec<usize> = (0..s.train.len()).step_by(40).collect();
    let train = s.train.select(&idx);
    let test = s
        .test
        .select(&(0..s.test.len()).step_by(50).collect::<Vec<_>>());
    let dir = tempdir();
    write_folder(dir.path(), "train", &train);
    write_folder(dir.path(), "test", &test);
    let d = data::load(&DataSource::Path(dir.path().into())).unwrap();
    assert_eq!(d.identity.format, Format::ImageFolder);
    assert_eq!(d.train, train);
    assert_eq!(d.test, test);
}

#[test]
fn image_folder_bad_input_names_the_file() {
    let s = sample();
    let dir = tempdir();
    write_folder(dir.path(), "train", &s.train.take(3));
    // Unknown class folder.
    std::fs::create_dir_all(dir.path().join("train/zebra")).unwrap();
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("zebra") && msg.contains("unknown class"),
        "{msg}"
    );
    std::fs::remove_dir(dir.path().join("train/zebra")).unwrap();
    // Wrong image size.
    let small = dir.path().join("train/airplane/small.png");
    write_png(&small, &vec![7u8; 3 * 16 * 16], 16);
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("small.png") && msg.contains("16x16"), "{msg}");
    std::fs::remove_file(&small).unwrap();
    // Corrupt JPEG.
    let bad = dir.path().join("train/airplane/broken.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF\xE0 this is not a jpeg").unwrap();
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("broken.jpg") && msg.contains("cannot decode"),
        "{msg}"
    );
}

#[test]
fn archive_bad_input_names_the_file() {
    let dir = tempdir();
    // Missing file.
    let missing = dir.path().join("nope.tar.gz");
    let msg = data::load(&DataSource::Path(missing))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("nope.tar.gz") && msg.contains("no such file"),
        "{msg}"
    );
    // Truncated archive: the embedded sample cut in half.
    let cut = dir.path().join("cut.tar.gz");
    std::fs::write(
        &cut,
        &data::EMBEDDED_SAMPLE[..data::EMBEDDED_SAMPLE.len() / 2],
    )
    .unwrap();
    let e = data::load(&DataSource::Path(cut)).unwrap_err();
    assert!(matches!(e, Error::BadData { .. }), "{e}");
    assert!(e.to_string().contains("cut.tar.gz"), "{e}");
    // Not an archive at all.
    let junk = dir.path().join("junk.tar.gz");
    std::fs::write(&junk, b"hello").unwrap();
    let msg = data::load(&DataSource::Path(junk)).unwrap_err().to_string();
    assert!(msg.contains("junk.tar.gz"), "{msg}");
    // A corrupt JPEG and an unknown class inside an archive.
    let entries = vec![(
        "train/cat/0001.jpg".to_string(),
        b"\xFF\xD8garbage".to_vec(),
    )];
    let p = dir.path().join("corrupt.tar.gz");
    data::archive::write_archive(&p, &entries).unwrap();
    let msg = data::load(&DataSource::Path(p)).unwrap_err().to_string();
    assert!(
        msg.contains("train/cat/0001.jpg") && msg.contains("cannot decode"),
        "{msg}"
    );
    let entries = vec![("test/zebra/0001.jpg".to_string(), vec![1, 2, 3])];
    let p = dir.path().join("zebra.tar.gz");
    data::archive::write_archive(&p, &entries).unwrap();
    let msg = data::load(&DataSource::Path(p)).unwrap_err().to_string();
    assert!(
        msg.contains("zebra") && msg.contains("unknown class"),
        "{msg}"
    );
    // An unrecognized folder.
    let msg = data::load(&DataSource::Path(dir.path().into()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a recognized CIFAR-10 layout"), "{msg}");
}

#[test]
fn stratified_subsets_are_balanced_seeded_and_validated() {
    let labels = &sample().train.labels;
    let mut rng = Rng::new(1, "t");
    let a = stratified_indices(labels, 10, SubsetSize::Fraction(0.05), &mut rng).unwrap();
    assert_eq!(a.len(), 100);
    let mut counts = [0; 10];
    for &i in &a {
        counts[labels[i] as usize] += 1;
    }
    assert_eq!(counts, [10; 10]);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    let b = stratified_indices(
        labels,
        10,
        SubsetSize::Fraction(0.05),
        &mut Rng::new(1, "t"),
    )
    .unwrap();
    assert_eq!(a, b, "same seed, same subset");
    let c = stratified_indices(
        labels,
        10,
        SubsetSize::Fraction(0.05),
        &mut Rng::new(2, "t"),
    )
    .unwrap();
    assert_ne!(a, c, "another seed, another subset");
    // Count, uneven: quotas differ by at most one.
    let d = stratified(&sample().train, SubsetSize::Count(25), &mut rng).unwrap();
    let cc = d.class_counts();
    assert_eq!(cc.iter().sum::<usize>(), 25);
    assert!(cc.iter().all(|&k| k == 2 || k == 3), "{cc:?}");
    assert_eq!(class_quotas(&[5, 3, 2], 5), vec![3, 1, 1]);
    // Invalid sizes.
    for bad in [
        SubsetSize::Fraction(0.0),
        SubsetSize::Fraction(1.5),
        SubsetSize::Count(0),
    ] {
        assert!(
            stratified_indices(labels, 10, bad, &mut rng).is_err(),
            "{bad:?}"
        );
    }
    let msg = stratified_indices(labels, 10, SubsetSize::Count(2001), &mut rng)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2001") && msg.contains("2000"), "{msg}");
}

fn to_tensor(ds: &Dataset, n: usize) -> Tensor {
    let dd = DeviceData::new(&ds.take(n), &Device::Cpu).unwrap();
    dd.range(0, n).unwrap().0
}

#[test]
fn augmentation_crops_and_flips_as_drawn() {
    let x = to_tensor(&sample().test, 4);
    // No shift, no flip: identity.
    let id = AugmentDraw {
        dy: vec![4; 4],
        dx: vec![4; 4],
        flip: vec![0; 4],
    };
    let y = augment::apply(&x, 4, &id).unwrap();
    let diff = crate::common::max_abs(&(&y - &x).unwrap());
    assert_eq!(diff, 0.0);
    // Flip only: columns reversed.
    let fl = AugmentDraw {
        dy: vec![4; 4],
        dx: vec![4; 4],
        flip: vec![1; 4],
    };
    let y = augment::apply(&x, 4, &fl).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for b in 0..4 {
        for c in 0..3 {
            for i in 0..32 {
                for j in 0..32 {
                    let at = |jj: usize| ((b * 3 + c) * 32 + i) * 32 + jj;
                    assert_eq!(yv[at(j)], xv[at(31 - j)]);
                }
            }
        }
    }
    // Shift by (dy, dx) = (0, 8): output (i, j) = input (i - 4, j + 4), zero outside.
    let sh = AugmentDraw {
        dy: vec![0; 4],
        dx: vec![8; 4],
        flip: vec![0; 4],
    };
    let y = augment::apply(&x, 4, &sh).unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..32usize {
        for j in 0..32usize {
            let expect = if i >= 4 && j + 4 < 32 {
                xv[(i - 4) * 32 + j + 4]
            } else {
                0.0
            };
            assert_eq!(yv[i * 32 + j], expect, "({i},{j})");
        }
    }
    // Draws are seeded and within range.
    let cfg = AugmentConfig::default();
    let d1 = AugmentDraw::sample(&cfg, 1000, &mut Rng::new(3, "aug"));
    let d2 = AugmentDraw::sample(&cfg, 1000, &mut Rng::new(3, "aug"));
    assert_eq!(d1, d2);
    assert!(d1.dy.iter().chain(&d1.dx).all(|&v| v <= 8));
    assert!(d1.dy.contains(&0) && d1.dy.contains(&8));
    let flips = d1.flip.iter().filter(|&&f| f == 1).count();
    assert!((400..600).contains(&flips), "{flips} flips of 1000");
}

#[test]
fn device_batches_and_epochs() {
    let s = sample();
    let dd = DeviceData::new(&s.test, &Device::Cpu).unwrap();
    let (x, y) = dd.batch(&[5, 0, 999]).unwrap();
    assert_eq!(x.dims(), &[3, 3, 32, 32]);
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(xv[0], s.test.image(5)[0] as f32 / 255.0);
    assert_eq!(xv[2 * IMAGE_BYTES], s.test.image(999)[0] as f32 / 255.0);
    assert_eq!(
        y.to_vec1::<u32>().unwrap(),
        vec![s.test.labels[5] as u32, 0, 9]
    );
    // An epoch covers every image once; a trailing batch of one is dropped.
    let b = epoch_batches(10, 4, &mut Rng::new(0, "e"));
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
    let b = epoch_batches(9, 4, &mut Rng::new(0, "e"));
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);
    let mut all: Vec<u32> = epoch_batches(12, 5, &mut Rng::new(0, "e")).concat();
    all.sort();
    assert_eq!(all, (0..12).collect::<Vec<u32>>());
    let mut part: Vec<u32> = epoch_batches(10, 3, &mut Rng::new(0, "e")).concat();
    part.sort();
    part.dedup();
    assert_eq!(part.len(), 9);
}

/// Less data than a CIFAR-10 layout promises is an error in every format, never a smaller
/// data set: a split missing, a class folder missing, a class without images in a batch file.
/// (Each of these used to train without a word: on 9 classes, or with "test acc 0/0".)
#[test]
fn missing_splits_and_classes_are_errors() {
    let s = sample();
    let train = s
        .train
        .select(&(0..s.train.len()).step_by(50).collect::<Vec<_>>());
    let test = s
        .test
        .select(&(0..s.test.len()).step_by(50).collect::<Vec<_>>());
    let load = |p: &Path| {
        data::load(&DataSource::Path(p.into()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // Image folders: no test split; then a class folder missing from train.
    let dir = tempdir();
    write_folder(dir.path(), "train", &train);
    let msg = load(dir.path());
    assert!(
        msg.contains("test split") && msg.contains("no images"),
        "{msg:?}"
    );
    write_folder(dir.path(), "test", &test);
    assert!(data::load(&DataSource::Path(dir.path().into())).is_ok());
    std::fs::remove_dir_all(dir.path().join("train/cat")).unwrap();
    let msg = load(dir.path());
    assert!(
        msg.contains("train split") && msg.contains("class 3 (cat) has no images"),
        "{msg:?}"
    );
    // The binary release: a test batch without one class.
    let dir = tempdir();
    let no_ship: Vec<usize> = (0..test.len()).filter(|&i| test.labels[i] != 8).collect();
    write_binary_release(dir.path(), &train, &test.select(&no_ship));
    let msg = load(dir.path());
    assert!(
        msg.contains("test split") && msg.contains("class 8 (ship) has no images"),
        "{msg:?}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// The committed sample archive, truncated anywhere or with one byte changed anywhere
    /// (the gzip header, the compressed stream, its CRC trailer): never a panic, never a data
    /// set. gzip's CRC covers every byte, so a changed byte that still inflates is caught
    /// once the stream is read to its end.
    #[test]
    fn a_truncated_or_altered_archive_is_refused(
        cut in 0.0f64..1.0,
        pos in 0.0f64..1.0,
        flip in 1u8..=255,
        truncate in proptest::bool::ANY,
    ) {
        let good = data::EMBEDDED_SAMPLE;
        let bytes = if truncate {
            good[..(cut * good.len() as f64) as usize].to_vec()
        } else {
            let mut b = good.to_vec();
            let i = ((pos * b.len() as f64) as usize).min(b.len() - 1);
            b[i] ^= flip;
            b
        };
        let r = data::archive::read_archive_bytes(&bytes, Path::new("mutated.tar.gz"));
        proptest::prop_assert!(r.is_err(), "accepted a corrupt archive (truncate {}, cut {}, pos {}, flip {})", truncate, cut, pos, flip);
        let e = r.err().unwrap().to_string();
        proptest::prop_assert!(e.contains("mutated.tar.gz"), "{}", e);
    }
}

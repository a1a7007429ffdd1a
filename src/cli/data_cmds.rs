//! `make-sample` and `export-bin`.

use std::process::ExitCode;

use anyhow::Result;

use quant_robust::data::{self, subset};
use quant_robust::rng::Rng;

use super::args::*;
use super::load_data;

pub(super) fn make_sample(a: MakeSampleArgs) -> Result<ExitCode> {
    let entries = data::archive::read_raw_entries(&a.from)?;
    let mut rng = Rng::new(a.seed, "make-sample");
    let mut out = Vec::new();
    for (is_train, n) in [(true, a.train), (false, a.test)] {
        let part: Vec<&data::archive::RawEntry> =
            entries.iter().filter(|e| e.train == is_train).collect();
        let labels: Vec<u8> = part.iter().map(|e| e.label).collect();
        let idx = subset::stratified_indices(
            &labels,
            data::CIFAR10_CLASSES.len(),
            subset::SubsetSize::Count(n),
            &mut rng,
        )?;
        out.extend(
            idx.into_iter()
                .map(|i| (part[i].path.clone(), part[i].bytes.clone())),
        );
    }
    data::archive::write_archive(&a.out, &out)?;
    tracing::info!("wrote {} images to {}", out.len(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

pub(super) fn export_bin(a: ExportBinArgs) -> Result<ExitCode> {
    use quant_robust::data::cifar_bin::{write_batch, TEST_FILE, TRAIN_FILES};
    let d = load_data(&a.data)?;
    let per = d.train.len().div_ceil(TRAIN_FILES.len());
    for (k, f) in TRAIN_FILES.iter().enumerate() {
        let idx: Vec<usize> = (k * per..((k + 1) * per).min(d.train.len())).collect();
        write_batch(&a.out.join(f), &d.train.select(&idx))?;
    }
    write_batch(&a.out.join(TEST_FILE), &d.test)?;
    let meta = a.out.join("batches.meta.txt");
    quant_robust::io::write_bytes_atomic(&meta, (d.train.classes.join("\n") + "\n").as_bytes())?;
    tracing::info!("wrote {} in the binary format", a.out.display());
    Ok(ExitCode::SUCCESS)
}

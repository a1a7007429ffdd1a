//! The subcommands, each a thin layer over the library: parse the arguments, call the
//! library, write the result. `args` holds the command line's types (clap); one file per
//! group of subcommands; the helpers they share are here.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use quant_robust::data;
use quant_robust::model::checkpoint;
use quant_robust::train::{EpochRecord, Progress};

mod args;
mod data_cmds;
mod eval;
mod quant;
mod study;
mod study_args;
mod train;

pub use args::*;
use data_cmds::{export_bin, make_sample};
use eval::{attack, eval};
use quant::{ptq, qat, train_size};
use study::{golden_check, golden_update, merge, report, reproduce, slurm};
use train::{train, train_config};

/// Parses `8/255`, `0.0314` or `1e-3` (clap's value parser).
pub fn parse_number(s: &str) -> std::result::Result<f64, String> {
    quant_robust::attack::parse_fraction(s)
}

/// Sets up `tracing` on stderr.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Train(a) => train(*a),
        Command::Eval(a) => eval(a),
        Command::Attack(a) => attack(*a),
        Command::Ptq(a) => ptq(*a),
        Command::Qat(a) => qat(*a),
        Command::Reproduce(a) => reproduce(a),
        Command::Merge(a) => merge(a),
        Command::Slurm(a) => slurm(*a),
        Command::Report(a) => report(a),
        Command::Golden(GoldenCommand::Update(a)) => golden_update(a),
        Command::Golden(GoldenCommand::Check(a)) => golden_check(a),
        Command::MakeSample(a) => make_sample(a),
        Command::ExportBin(a) => export_bin(a),
    }
}

fn load_data(a: &DataArgs) -> Result<data::CifarData> {
    let source = match a.data.clone() {
        Some(s) => s,
        None => data::default_source().context("--data not given")?,
    };
    let t = Instant::now();
    let d = data::load(&source).with_context(|| format!("loading data from {source:?}"))?;
    tracing::info!(
        "data: {} ({}), {} train / {} test images, read in {:.1}s",
        d.identity.name,
        d.identity.path,
        d.train.len(),
        d.test.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(d)
}

/// `--calib N`: at least one image, at most the training split.
fn check_calib(n: usize, data: &data::CifarData) -> Result<()> {
    if n == 0 || n > data.train.len() {
        bail!(
            "--calib {n}: the training split has {} images",
            data.train.len()
        );
    }
    Ok(())
}

fn write_result(out: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    match out {
        Some(p) => quant_robust::io::write_json_atomic(p, value)
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// An indicatif bar per epoch.
struct Bar {
    bar: Option<ProgressBar>,
}

impl Progress for Bar {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        self.bar = Some(bar);
    }
    fn update(&mut self, done: usize, loss: f64, acc: f64, rate: f64) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            b.set_message(format!(
                "loss {loss:.4} acc {:.1}% {rate:.0} img/s",
                100.0 * acc
            ));
        }
    }
    fn epoch_end(&mut self, r: &EpochRecord) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let pgd = r
            .test_pgd
            .map(|p| format!(", test PGD-10 {:.2}%", p.percent()))
            .unwrap_or_default();
        tracing::info!(
            "epoch {}: loss {:.4}, train acc {:.2}%, test acc {:.2}% ({}/{}){pgd}, {:.0} img/s, {:.1}s",
            r.epoch,
            r.train_loss,
            100.0 * r.train_accuracy,
            r.test.percent(),
            r.test.correct,
            r.test.total,
            r.images_per_s,
            r.wall_s
        );
    }
}

/// Exit status of a run stopped early by --time-budget or --max-stages (BSD EX_TEMPFAIL).
pub const EXIT_STOPPED_EARLY: u8 = 75;

/// The manifest beside a checkpoint for a result file; an unreadable one is reported in the
/// log and left out (it describes the input, it is not needed to compute the result).
fn side_manifest(ck: &Path) -> Option<quant_robust::manifest::Manifest> {
    match checkpoint::load_manifest(ck) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("ignoring the checkpoint's manifest: {e}");
            None
        }
    }
}

/// Refuses a result path that would overwrite the checkpoint's own manifest.
fn check_out_path(out: Option<&Path>, ck: &Path) -> Result<()> {
    if let Some(o) = out {
        if o == checkpoint::manifest_path(ck) {
            bail!(
                "--out {} is the manifest of the checkpoint being written; choose another path",
                o.display()
            );
        }
    }
    Ok(())
}

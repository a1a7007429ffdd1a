//! The subcommands, each a thin layer over the library: parse the arguments, call the
//! library, write the result.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use quant_robust::attack::PgdConfig;
use quant_robust::data::{self, batch::DeviceData, subset, DataSource};
use quant_robust::device::{self, DeviceChoice};
use quant_robust::eval::clean_accuracy;
use quant_robust::model::checkpoint;
use quant_robust::rng::Rng;
use quant_robust::train::{Adversarial, EpochRecord, LrSchedule, Progress, TrainConfig, Trainer};

const EXAMPLES: &str = "\
Examples:
  # natural training on the shipped data (../shared/data), 30 epochs, one-cycle SGD
  quant-robust train --checkpoint runs/natural.safetensors
  # a short CPU run on the embedded sample
  quant-robust train --data embedded --epochs 2 --checkpoint runs/demo.safetensors
  # PGD adversarial training (eps 8/255, step 2/255, 7 steps)
  quant-robust train --adv pgd --checkpoint runs/robust.safetensors
  # resume an interrupted run (and extend it to 40 epochs)
  quant-robust train --resume runs/natural.safetensors --epochs 40
  # clean accuracy of a checkpoint on the test set
  quant-robust eval --checkpoint runs/natural.safetensors --out eval.json";

const ATTACK_EXAMPLES: &str = "\
Examples:
  # PGD-10 and FGSM over five L-inf radii on 1,000 stratified test images
  quant-robust attack --checkpoint runs/natural.safetensors --attacks fgsm,pgd \\
      --eps 1/255,2/255,4/255,8/255,16/255 --n 1000
  # the strongest mix we run, with the worst case per example, and a picture
  quant-robust attack --checkpoint runs/robust.safetensors \\
      --attacks pgd,apgd-ce,apgd-dlr,square --eps 8/255 --save-examples adv.png
  # L2, with examples transferred from another model
  quant-robust attack --checkpoint q.safetensors --norm l2 --eps 0.25,0.5,1.0 \\
      --attacks pgd,transfer:runs/natural.safetensors";

const PTQ_EXAMPLES: &str = "\
Examples:
  # PWLQ at 4-bit weights, 8-bit activations (first conv and last linear keep 8-bit weights)
  quant-robust ptq --checkpoint runs/natural.safetensors --method pwlq --wbits 4 --abits 8
  # uniform at the same bits, activations full precision
  quant-robust ptq --checkpoint runs/natural.safetensors --method uniform --wbits 4 --abits 32";

const QAT_EXAMPLES: &str = "\
Examples:
  # W4A4 from the natural model on 10% of the training data, 5 epochs
  quant-robust qat --init natural:runs/natural.safetensors --wbits 4 --abits 4 \\
      --fraction 0.1 --epochs 5 --checkpoint runs/qat-w4a4.safetensors
  # the same with PGD adversarial training inside QAT, from the robust model
  quant-robust qat --init robust:runs/robust.safetensors --wbits 4 --abits 4 --adv pgd";

const STUDY_EXAMPLES: &str = "\
Examples:
  # the whole pipeline on the CPU in a few minutes (numbers meaningless; proves the code path)
  quant-robust reproduce --preset smoke --out runs/study-smoke
  # the study at reduced epochs (GPU); stop cleanly after 9 minutes, run again to continue
  quant-robust reproduce --preset fast --out runs/study-fast --time-budget 540
  # on the GPU machine, with the data carried elsewhere
  quant-robust reproduce --preset fast --data .device/data/cifar10-jpeg.tar.gz --device cuda
  # split the cells over 4 machines, then merge the shards and write the report
  quant-robust reproduce --preset fast --out shard1 --shard 1/4   # ... up to 4/4
  quant-robust merge --out runs/study-fast shard1 shard2 shard3 shard4
  # every setting of a preset, to edit and pass back with --config
  quant-robust reproduce --preset fast --print-config > my-study.json
  # redraw report.md and the plots from results.json only
  quant-robust report runs/study-fast";

/// quant-robust: does quantization make a network more or less robust to adversarial attacks?
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXAMPLES)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train ResNet-20 (natural or PGD adversarial training), checkpointing every epoch.
    #[command(after_help = EXAMPLES)]
    Train(Box<TrainArgs>),
    /// Clean accuracy of a checkpoint on a data set.
    #[command(after_help = EXAMPLES)]
    Eval(EvalArgs),
    /// Robust accuracy of a checkpoint under attacks and ε: per attack, the worst case,
    /// masking diagnostics.
    #[command(after_help = ATTACK_EXAMPLES)]
    Attack(Box<AttackArgs>),
    /// Post-training quantization: fold BatchNorm, quantize weights (PWLQ or uniform) and
    /// activations (uniform, calibrated); writes the quantized checkpoint, prints clean accuracy.
    #[command(after_help = PTQ_EXAMPLES)]
    Ptq(Box<PtqArgs>),
    /// Quantization-aware training (PACT activations, DoReFa weights) from a random, natural
    /// or robust initialization, optionally with PGD adversarial training.
    #[command(after_help = QAT_EXAMPLES)]
    Qat(Box<QatArgs>),
    /// Run the study (presets smoke, cpu, fast, full, or a configuration file): every stage is
    /// cached by the hash of its configuration and inputs, so a re-run computes only what
    /// changed and an interrupted run resumes; writes results.json, report.md and plots.
    #[command(after_help = STUDY_EXAMPLES)]
    Reproduce(ReproduceArgs),
    /// Merge the caches of sharded runs (`reproduce --shard K/N`) and write the results and
    /// the report.
    #[command(after_help = STUDY_EXAMPLES)]
    Merge(MergeArgs),
    /// Redraw report.md and the plots of a study directory from its results.json.
    #[command(after_help = STUDY_EXAMPLES)]
    Report(ReportArgs),
    /// Golden results: freeze a finished study into golden/<name>/ (`update`), or re-measure
    /// every golden model and compare (`check`, the GPU tier).
    #[command(subcommand)]
    Golden(GoldenCommand),
    /// Write a small class-balanced sample of a cifar10-jpeg archive (original JPEG bytes).
    MakeSample(MakeSampleArgs),
    /// Write a data set's decoded pixels in the canonical binary format
    /// (data_batch_1..5.bin, test_batch.bin, batches.meta.txt), e.g. to compare decoders.
    ExportBin(ExportBinArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReproduceArgs {
    /// A preset: smoke (CPU, minutes), cpu (the real study on 2 CPU cores, from the golden
    /// checkpoints), fast (reduced epochs, GPU), full (3 seeds).
    #[arg(long, default_value = "smoke")]
    pub preset: String,
    /// A study configuration file (JSON; fields left out take their defaults). Overrides
    /// --preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The study directory (cache, results, report). Default: the configuration's `out`
    /// (the cpu preset: studies/cpu, committed), else runs/study-<name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only shard K of N (e.g. 2/4) of the models; merge the shards with `merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Stop cleanly (resumable) once this many seconds have passed: checked between stages
    /// and between training epochs. Exit status 75 means "stopped early, run again".
    #[arg(long)]
    pub time_budget: Option<f64>,
    /// Stop cleanly (resumable) after computing this many stages.
    #[arg(long)]
    pub max_stages: Option<usize>,
    /// Make the models only (training, PTQ, QAT), not their evaluations; a later run
    /// without it evaluates them from the cache.
    #[arg(long)]
    pub models_only: bool,
    /// Data path (overrides the configuration's `data`; results are keyed by the data's
    /// content hashes, not its path, so the same data anywhere gives the same cache).
    #[arg(long)]
    pub data: Option<String>,
    /// Print the full configuration (every default written out) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Device: cpu, cuda, or auto (CUDA if built in and present).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The merged study directory.
    #[arg(long)]
    pub out: PathBuf,
    /// The shards' study directories.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum GoldenCommand {
    /// Copy a finished study (results, report, plots, every checkpoint) into golden/<name>/
    /// with golden.json (command, device, data, code). Refuses a dirty tree. Then run
    /// `cargo insta test --review` (and `QR_SLOW=1 cargo insta test --review`) to update the
    /// snapshots, and commit both with a message naming the command, device, seed and commit.
    Update(GoldenUpdateArgs),
    /// Re-evaluate every golden model (clean and FGSM on the golden study's evaluation
    /// subset; all test images with --n all) and compare with golden results.
    Check(GoldenCheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct GoldenUpdateArgs {
    /// The finished study directory (with results.json).
    #[arg(long)]
    pub study: PathBuf,
    /// The golden set's name (golden/<name>/).
    #[arg(long)]
    pub name: String,
    /// The device, in words: "NVIDIA H100 80GB HBM3", "2-core CPU (CI class)".
    #[arg(long)]
    pub device_label: String,
    /// The command that produced the study, verbatim.
    #[arg(long)]
    pub command: String,
    /// The golden root. Default golden.
    #[arg(long, default_value = "golden")]
    pub golden: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct GoldenCheckArgs {
    /// A golden directory (golden/<name>).
    pub dir: PathBuf,
    /// Test images: the golden study's evaluation subset (default), or `all`.
    #[arg(long)]
    pub n: Option<String>,
    /// Images a count may differ by (0: exact, the policy on the device that made the study).
    #[arg(long, default_value_t = 0)]
    pub tolerance: usize,
    /// Data (default: the one the golden study names).
    #[arg(long)]
    pub data: Option<DataSource>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Write the comparison as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A study directory with results.json.
    pub dir: PathBuf,
}

/// Options every data-reading command shares.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Data: a cifar10-jpeg .tar.gz, a cifar-10-batches-bin folder, an image-folder tree
    /// (train/<class>/, test/<class>/), or `embedded` (the committed 2,000/1,000-image
    /// sample). Default: ../shared/data/cifar10-jpeg.tar.gz where it exists, else embedded.
    #[arg(long)]
    pub data: Option<DataSource>,
    /// Device: cpu, cuda, or auto (CUDA if built in and present).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    OneCycle,
    Cosine,
    Multistep,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdvArg {
    None,
    Pgd,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to write the checkpoint (X.safetensors, X.json manifest, X.train.safetensors
    /// resume point), after every epoch.
    #[arg(long, default_value = "runs/train/model.safetensors")]
    pub checkpoint: PathBuf,
    /// Resume the run saved at this checkpoint (its configuration is used; --epochs may
    /// extend it).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// A JSON training configuration (TrainConfig); flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Epochs [default 30].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default 0.1].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule [default one-cycle].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// SGD momentum [default 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Weight decay [default 5e-4].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Plain (not Nesterov) momentum.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Seed of every random draw [default 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Adversarial training: none or pgd [default none].
    #[arg(long, value_enum)]
    pub adv: Option<AdvArg>,
    /// PGD-AT radius, in pixel units (8/255 or 0.0314) [default 8/255].
    #[arg(long, value_parser = parse_number)]
    pub adv_eps: Option<f64>,
    /// PGD-AT step size [default 2/255].
    #[arg(long, value_parser = parse_number)]
    pub adv_step: Option<f64>,
    /// PGD-AT steps [default 7].
    #[arg(long)]
    pub adv_steps: Option<usize>,
    /// Train on a stratified, seeded fraction of the training set, in (0, 1].
    #[arg(long, conflicts_with = "train_count")]
    pub fraction: Option<f64>,
    /// Train on a stratified, seeded number of training images.
    #[arg(long)]
    pub train_count: Option<usize>,
    /// Test images evaluated after each epoch [default all].
    #[arg(long)]
    pub eval_images: Option<usize>,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The checkpoint (safetensors) to evaluate.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which split to evaluate.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    pub split: SplitArg,
    /// Evaluate N images of the split (a seeded, class-stratified subset) [default all].
    #[arg(long)]
    pub n: Option<usize>,
    /// Seed of the subset drawn by --n.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch size.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The checkpoint (safetensors) to attack.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Comma-separated attacks: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square,
    /// autoattack, transfer:SOURCE.
    #[arg(long, default_value = "fgsm,pgd")]
    pub attacks: String,
    /// Norm of the threat model.
    #[arg(long, value_enum, default_value_t = quant_robust::attack::Norm::Linf)]
    pub norm: quant_robust::attack::Norm,
    /// Comma-separated radii in pixel units (8/255 or 0.0314).
    #[arg(long, default_value = "1/255,2/255,4/255,8/255,16/255")]
    pub eps: String,
    /// PGD steps (also the transfer attack's PGD on its source).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// PGD step size as a fraction of ε.
    #[arg(long, default_value_t = 0.25)]
    pub step_fraction: f64,
    /// Random restarts of PGD and APGD.
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// APGD iterations.
    #[arg(long, default_value_t = 100)]
    pub apgd_iterations: usize,
    /// Square attack query budget.
    #[arg(long, default_value_t = 5000)]
    pub square_queries: usize,
    /// FAB and FAB-T iterations.
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().fab_iterations)]
    pub fab_iterations: usize,
    /// AutoAttack's stages in order, for a custom version (default: the standard
    /// apgd-ce,apgd-t,fab-t,square, each with AutoAttack's own settings).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub autoattack_stages: Option<Vec<quant_robust::attack::autoattack::Stage>>,
    /// Test images (a seeded, class-stratified subset).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Seed of the subset and of every random draw of the attacks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch size.
    #[arg(long, default_value_t = 250)]
    pub batch_size: usize,
    /// Write a PNG grid of 8 examples (the first attack at the largest ε).
    #[arg(long)]
    pub save_examples: Option<PathBuf>,
    /// Attack the checkpoint uniformly post-training-quantized to these bits, e.g. w4a4
    /// (32 = full precision; first conv and last linear keep 8-bit weights).
    #[arg(long)]
    pub quantize: Option<quant_robust::quant::Bits>,
    /// Training images that calibrate the activation ranges of --quantize (seeded, stratified).
    #[arg(long, default_value_t = 512)]
    pub calib: usize,
    /// Gradients through quantizers: ste (straight-through) or raw (the true, zero, gradient).
    #[arg(long, value_enum, default_value_t = quant_robust::quant::GradientMode::Ste)]
    pub gradient: quant_robust::quant::GradientMode,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PtqArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The full-precision checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Weight quantizer.
    #[arg(long, value_enum, default_value_t = quant_robust::quant::ptq::PtqMethod::Pwlq)]
    pub method: quant_robust::quant::ptq::PtqMethod,
    /// Weight bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 8)]
    pub wbits: u32,
    /// Activation bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 8)]
    pub abits: u32,
    /// Weight bits of the first conv and the last linear layer.
    #[arg(long, default_value_t = 8)]
    pub first_last_bits: u32,
    /// PWLQ breakpoint.
    #[arg(long, value_enum, default_value_t = quant_robust::quant::pwlq::Breakpoint::Search)]
    pub breakpoint: quant_robust::quant::pwlq::Breakpoint,
    /// PWLQ bias correction.
    #[arg(long)]
    pub bias_correction: bool,
    /// Training images that calibrate the activation ranges (seeded, stratified).
    #[arg(long, default_value_t = 512)]
    pub calib: usize,
    /// Activation range: `max`, or a percentile such as `99.99`.
    #[arg(long, default_value = "max")]
    pub calib_range: String,
    /// Seed of the calibration set and of the evaluation subset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Test images for the clean accuracy (seeded, stratified) [default all].
    #[arg(long)]
    pub n: Option<usize>,
    /// The quantized checkpoint [default: beside the input, named by method and bits].
    #[arg(long)]
    pub out_checkpoint: Option<PathBuf>,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct QatArgs {
    /// Initialization: random, natural:CHECKPOINT or robust:CHECKPOINT (not with --resume:
    /// a resumed run continues from its resume point, with the settings it started with).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub init: Option<String>,
    /// Weight bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 4)]
    pub wbits: u32,
    /// Activation bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 4)]
    pub abits: u32,
    /// Weight bits of the first conv and the last linear layer.
    #[arg(long, default_value_t = 8)]
    pub first_last_bits: u32,
    /// Initial α: `calibrated` (the site's full-precision maximum) or a number > 0. Default:
    /// 10 from random init (an untrained network's activations say nothing about their
    /// trained range), calibrated from a trained model.
    #[arg(long)]
    pub alpha_init: Option<String>,
    /// Training options (epochs, lr, fraction, adversarial training, seed, device, data…).
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Debug, clap::Args)]
pub struct MakeSampleArgs {
    /// The cifar10-jpeg archive to sample from.
    #[arg(long)]
    pub from: PathBuf,
    /// Training images (class-balanced).
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Test images (class-balanced).
    #[arg(long, default_value_t = 1000)]
    pub test: usize,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output archive.
    #[arg(long, default_value = "src/data/embedded/cifar10-jpeg-sample.tar.gz")]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExportBinArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

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

fn write_result(out: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    match out {
        Some(p) => quant_robust::io::write_json_atomic(p, value)
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg: TrainConfig = match &a.config {
        Some(p) => quant_robust::io::read_json(p)?,
        None => TrainConfig::default(),
    };
    if let Some(v) = a.epochs {
        cfg.epochs = v;
    }
    if let Some(v) = a.batch_size {
        cfg.batch_size = v;
    }
    if let Some(v) = a.lr {
        cfg.lr = v;
    }
    if let Some(s) = a.schedule {
        cfg.schedule = match s {
            ScheduleArg::OneCycle => LrSchedule::one_cycle(),
            ScheduleArg::Cosine => LrSchedule::Cosine,
            ScheduleArg::Multistep => LrSchedule::multistep(),
            ScheduleArg::Constant => LrSchedule::Constant,
        };
    }
    if let Some(v) = a.momentum {
        cfg.sgd.momentum = v;
    }
    if let Some(v) = a.weight_decay {
        cfg.sgd.weight_decay = v;
    }
    if a.no_nesterov {
        cfg.sgd.nesterov = false;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.eval_images {
        cfg.eval_images = Some(v);
    }
    let wants_pgd = a.adv == Some(AdvArg::Pgd)
        || (a.adv.is_none() && matches!(cfg.adversarial, Adversarial::Pgd(_)));
    if a.adv == Some(AdvArg::None) {
        cfg.adversarial = Adversarial::None;
    }
    if wants_pgd {
        let mut p = match (&cfg.adversarial, Adversarial::pgd_default()) {
            (Adversarial::Pgd(p), _) => p.clone(),
            (_, Adversarial::Pgd(d)) => d,
            _ => PgdConfig::default(),
        };
        if let Some(v) = a.adv_eps {
            p.eps = v;
        }
        if let Some(v) = a.adv_step {
            p.step = v;
        }
        if let Some(v) = a.adv_steps {
            p.steps = v;
        }
        cfg.adversarial = Adversarial::Pgd(p);
    } else if a.adv_eps.is_some() || a.adv_step.is_some() || a.adv_steps.is_some() {
        bail!("--adv-eps/--adv-step/--adv-steps need --adv pgd");
    }
    cfg.validate()?;
    Ok(cfg)
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

fn train(a: TrainArgs) -> Result<ExitCode> {
    check_out_path(a.out.as_deref(), a.resume.as_ref().unwrap_or(&a.checkpoint))?;
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    let (mut trainer, checkpoint_path) = match &a.resume {
        Some(p) => {
            let t = Trainer::resume(p, a.epochs, &dev)
                .with_context(|| format!("resuming from {}", p.display()))?;
            if t.state.data.train_sha256 != data.identity.train_sha256 && a.fraction.is_none() {
                tracing::warn!("resuming on data that differs from the run's original data");
            }
            (t, p.clone())
        }
        None => {
            let cfg = train_config(&a)?;
            (
                Trainer::new(cfg, data.identity.clone(), 0, &dev)?,
                a.checkpoint.clone(),
            )
        }
    };
    let seed = trainer.state.config.seed;
    let train_set = train_subset(&data, a.fraction, a.train_count, seed)?;
    if train_set.is_empty() {
        bail!("the data set has no training images");
    }
    if trainer.state.n_train == 0 {
        trainer.state.n_train = train_set.len();
    }
    let train_dev = DeviceData::new(&train_set, &dev)?;
    let test_dev = DeviceData::new(&data.test, &dev)?;
    tracing::info!(
        "training on {} images, {} epochs, device {}",
        train_set.len(),
        trainer.state.config.epochs,
        device::name(&dev)
    );
    let mut bar = Bar { bar: None };
    if !trainer.fit(&train_dev, &test_dev, Some(&checkpoint_path), &mut bar)? {
        tracing::warn!(
            "stopped on SIGTERM after epoch {}/{}; continue with `train --resume {}`",
            trainer.state.epoch,
            trainer.state.config.epochs,
            checkpoint_path.display()
        );
        return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
    }
    let result = json!({
        "checkpoint": checkpoint_path,
        "manifest": trainer.manifest()?,
        "history": trainer.state.history,
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

fn eval(a: EvalArgs) -> Result<ExitCode> {
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    let model = checkpoint::load(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let split = match a.split {
        SplitArg::Train => &data.train,
        SplitArg::Test => &data.test,
    };
    if let Some(n) = a.n {
        if n == 0 || n > split.len() {
            bail!(
                "--n {n}: the {:?} split has {} images",
                a.split,
                split.len()
            );
        }
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be ≥ 1");
    }
    let dd = DeviceData::new(split, &dev)?;
    let t = Instant::now();
    let idx = quant_robust::eval::eval_indices(&dd, a.n, a.seed)?;
    let acc = clean_accuracy(&model, &dd, &idx, a.batch_size)?;
    device::synchronize(&dev)?;
    let wall = t.elapsed().as_secs_f64();
    let mut m = quant_robust::manifest::Manifest::new("eval", &dev);
    m.data = Some(data.identity.clone());
    m.config = json!({
        "checkpoint": a.checkpoint,
        "split": format!("{:?}", a.split).to_lowercase(),
        "n": acc.total,
        "subset_seed": a.n.map(|_| a.seed),
        "batch_size": a.batch_size,
    });
    m.add_timing("eval", wall, &dev);
    m.metrics.insert("accuracy".into(), acc.fraction());
    let result = json!({
        "checkpoint": a.checkpoint,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "images_per_s": acc.total as f64 / wall.max(1e-9),
        "checkpoint_manifest": side_manifest(&a.checkpoint),
        "manifest": m,
    });
    tracing::info!(
        "accuracy {:.2}% ({}/{}) in {:.1}s",
        acc.percent(),
        acc.correct,
        acc.total,
        wall
    );
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

/// Exit status of a run stopped early by --time-budget or --max-stages (BSD EX_TEMPFAIL).
pub const EXIT_STOPPED_EARLY: u8 = 75;

fn reproduce(a: ReproduceArgs) -> Result<ExitCode> {
    use quant_robust::study::{run, StudyConfig};
    let mut cfg = match &a.config {
        Some(p) => StudyConfig::from_file(p)
            .with_context(|| format!("reading the study configuration {}", p.display()))?,
        None => StudyConfig::preset(&a.preset)?,
    };
    if let Some(d) = &a.data {
        cfg.data = d.clone();
    }
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(ExitCode::SUCCESS);
    }
    let shard = a
        .shard
        .as_deref()
        .map(|s| -> Result<(usize, usize)> {
            let (k, n) = s
                .split_once('/')
                .with_context(|| format!("--shard {s}: expected K/N, e.g. 2/4"))?;
            let k: usize = k.trim().parse().with_context(|| format!("--shard {s}"))?;
            let n: usize = n.trim().parse().with_context(|| format!("--shard {s}"))?;
            if k == 0 || n == 0 || k > n {
                bail!("--shard {s}: expected K/N with 1 ≤ K ≤ N");
            }
            Ok((k, n))
        })
        .transpose()?;
    if let Some(t) = a.time_budget {
        if !(t > 0.0 && t.is_finite()) {
            bail!("--time-budget {t}: must be a positive number of seconds");
        }
    }
    let out = a.out.clone().unwrap_or_else(|| cfg.default_out());
    let dev = device::select(a.device)?;
    let t = Instant::now();
    let data = run::load_data(&cfg).context("loading the study's data")?;
    tracing::info!(
        "study `{}`: data {} ({} train / {} test), {} models, device {}, directory {}",
        cfg.name,
        data.identity.name,
        data.train.len(),
        data.test.len(),
        quant_robust::study::plan::models(&cfg).len(),
        device::name(&dev),
        out.display()
    );
    let opts = run::RunOptions {
        shard,
        max_stages: a.max_stages,
        deadline: a
            .time_budget
            .map(|s| t + std::time::Duration::from_secs_f64(s)),
        progress: true,
        models_only: a.models_only,
    };
    match run::run(&cfg, &data, &out, &dev, &opts)? {
        run::RunStatus::Interrupted {
            computed,
            remaining,
        } => {
            tracing::warn!(
                "stopped early after {computed} new stages ({remaining} models left, {:.0}s); run the same command again to continue",
                t.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
        }
        run::RunStatus::Complete { computed, cached } => {
            tracing::info!(
                "{computed} stages computed, {cached} models read from the cache, {:.0}s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    if a.models_only {
        tracing::info!("every model is made; run again without --models-only to evaluate them");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((k, n)) = shard {
        tracing::info!(
            "shard {k}/{n} done; `quant-robust merge --out DIR SHARD_DIRS...` when all are"
        );
        return Ok(ExitCode::SUCCESS);
    }
    finish(&cfg, &data.identity, &out, &dev)
}

/// Collects the results from the cache, writes them and the report, logs the verdicts.
fn finish(
    cfg: &quant_robust::study::StudyConfig,
    data: &data::DataIdentity,
    out: &Path,
    dev: &candle_core::Device,
) -> Result<ExitCode> {
    use quant_robust::study::{findings, results};
    let res = findings::judged(results::collect(cfg, data, out, dev)?);
    results::write(&res, out)?;
    quant_robust::report::study::write(&res, out)?;
    for v in &res.findings {
        tracing::info!(
            "{} {}: {}{}",
            v.id,
            v.status,
            v.claim,
            v.margin
                .map(|m| format!(" (margin {:+.1} pp)", 100.0 * m))
                .unwrap_or_default()
        );
    }
    tracing::info!(
        "wrote {}, {} and {}",
        out.join("results.json").display(),
        out.join("report.md").display(),
        out.join("plots").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn merge(a: MergeArgs) -> Result<ExitCode> {
    let cfg = quant_robust::study::run::merge(&a.out, &a.shards)?;
    let data = quant_robust::study::run::load_data(&cfg).context("loading the study's data")?;
    finish(&cfg, &data.identity, &a.out, &candle_core::Device::Cpu)
}

fn golden_update(a: GoldenUpdateArgs) -> Result<ExitCode> {
    let g = quant_robust::study::golden::update(
        &a.study,
        &a.golden,
        &a.name,
        &a.device_label,
        &a.command,
        Path::new("."),
    )?;
    tracing::info!(
        "wrote {} ({} models, study code {}, device {} / {}, data {}); now run `cargo insta test --review` and `QR_SLOW=1 cargo insta test --review`",
        a.golden.join(&a.name).display(),
        g.models.len(),
        g.code.git_commit,
        g.device,
        g.device_label,
        g.data.name
    );
    Ok(ExitCode::SUCCESS)
}

fn golden_check(a: GoldenCheckArgs) -> Result<ExitCode> {
    use quant_robust::attack::{fgsm::Fgsm, Attack, Norm};
    use quant_robust::eval::robust::{evaluate, RobustnessConfig};
    use quant_robust::study::golden;
    let g = golden::read(&a.dir)?;
    let res: quant_robust::study::StudyResults =
        quant_robust::io::read_json(&a.dir.join("results.json"))?;
    let dev = device::select(a.device)?;
    let source = match &a.data {
        Some(d) => d.clone(),
        None => quant_robust::study::run::data_source(&res.config)?,
    };
    let data = data::load(&source)?;
    if data.identity.test_sha256 != g.data.test_sha256 {
        bail!(
            "the data's test split ({}) is not the golden study's ({}, sha256 {})",
            data.identity.name,
            g.data.name,
            g.data.test_sha256
        );
    }
    let test = DeviceData::new(&data.test, &dev)?;
    let n = match a.n.as_deref() {
        None => res.config.eval.n,
        Some("all") => None,
        Some(v) => Some(v.parse().with_context(|| format!("--n {v}"))?),
    };
    let idx = quant_robust::eval::eval_indices(&test, n, res.config.eval.seed)?;
    let mut rows = Vec::new();
    let mut failed = 0;
    let t = Instant::now();
    for m in &g.models {
        let model = checkpoint::load(&golden::checkpoint_path(&a.dir, m), &dev, false)?;
        let attacks: Vec<Box<dyn Attack>> = vec![Box::new(Fgsm)];
        let rcfg = RobustnessConfig {
            norm: Norm::Linf,
            eps: res.config.eval.eps.clone(),
            batch_size: res.config.eval.batch_size,
            seed: res.config.eval.seed.wrapping_add(m.spec.seed()),
            ..RobustnessConfig::default()
        };
        let r = evaluate(&model, &test, &idx, &attacks, &rcfg, &mut |_, _, _, _| {})?;
        let golden_model = res
            .model(&m.spec)
            .with_context(|| format!("{} is not in results.json", m.id))?;
        let mut cmp = vec![(
            "clean".to_string(),
            r.clean.correct,
            r.clean.total,
            Some(golden_model.clean.clone()),
        )];
        for e in &r.attacks[0].per_eps {
            cmp.push((
                format!("fgsm {:.2}/255", e.eps * 255.0),
                e.correct,
                e.total,
                golden_model.attack_at("fgsm", e.eps).cloned(),
            ));
        }
        for (what, k, total, gold) in cmp {
            let Some(gold) = gold else { continue };
            // Same images: compare counts; other sizes: compare rates via the intervals.
            let ok = if gold.total == total {
                k.abs_diff(gold.correct) <= a.tolerance
            } else {
                let (lo, hi) = quant_robust::eval::wilson95(k, total);
                gold.ci95.0 <= hi && lo <= gold.ci95.1
            };
            if !ok {
                failed += 1;
                tracing::error!(
                    "{} {what}: {k}/{total} now, golden {}/{}",
                    m.id,
                    gold.correct,
                    gold.total
                );
            }
            rows.push(
                json!({"model": m.id, "measure": what, "correct": k, "total": total,
                "golden_correct": gold.correct, "golden_total": gold.total, "agrees": ok}),
            );
        }
    }
    tracing::info!(
        "{} models, {} comparisons, {failed} disagree (tolerance {} images, {} test images, device {}, {:.0}s)",
        g.models.len(),
        rows.len(),
        a.tolerance,
        idx.len(),
        device::name(&dev),
        t.elapsed().as_secs_f64()
    );
    let mut man = quant_robust::manifest::Manifest::new("golden-check", &dev);
    man.data = Some(data.identity.clone());
    man.config = json!({"dir": a.dir, "n": idx.len(), "tolerance": a.tolerance});
    write_result(
        a.out.as_deref(),
        &json!({"golden": g.name, "disagreements": failed, "comparisons": rows, "manifest": man}),
    )?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn report(a: ReportArgs) -> Result<ExitCode> {
    let p = a.dir.join("results.json");
    let res: quant_robust::study::StudyResults = quant_robust::io::read_json(&p)
        .with_context(|| format!("reading {} (run `reproduce` first)", p.display()))?;
    quant_robust::report::study::write(&res, &a.dir)?;
    tracing::info!("wrote {}", a.dir.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

fn make_sample(a: MakeSampleArgs) -> Result<ExitCode> {
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

fn export_bin(a: ExportBinArgs) -> Result<ExitCode> {
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

fn parse_list(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| parse_number(t.trim()).map_err(|e| anyhow::anyhow!("--eps: {e}")))
        .collect()
}

fn build_attacks(
    a: &AttackArgs,
    dev: &candle_core::Device,
) -> Result<Vec<Box<dyn quant_robust::attack::Attack>>> {
    use quant_robust::attack::{pgd::Pgd, transfer::Transfer, AttackSettings};
    let settings = AttackSettings {
        pgd_steps: a.steps,
        pgd_step_fraction: a.step_fraction,
        restarts: a.restarts,
        apgd_iterations: a.apgd_iterations,
        square_queries: a.square_queries,
        fab_iterations: a.fab_iterations,
    };
    let mut out: Vec<Box<dyn quant_robust::attack::Attack>> = Vec::new();
    for name in a
        .attacks
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let attack: Box<dyn quant_robust::attack::Attack> =
            if let Some(src) = name.strip_prefix("transfer:") {
                let src = PathBuf::from(src);
                let source = checkpoint::load(&src, dev, false)
                    .with_context(|| format!("loading the transfer source {}", src.display()))?;
                Box::new(Transfer {
                    source: Box::new(source),
                    source_name: src.display().to_string(),
                    pgd: Pgd {
                        restarts: 1,
                        ..settings.pgd()
                    },
                })
            } else if let (Some(stages), "autoattack") = (&a.autoattack_stages, name) {
                let aa = quant_robust::attack::autoattack::AutoAttack {
                    stages: stages.clone(),
                    ..Default::default()
                };
                aa.validate().context("--autoattack-stages")?;
                Box::new(aa)
            } else {
                quant_robust::attack::build(name, &settings, a.norm)
                    .with_context(|| "--attacks (transfer is written transfer:CHECKPOINT)")?
            };
        if !attack.supports(a.norm) {
            bail!("attack `{name}` does not support the {} norm", a.norm);
        }
        out.push(attack);
    }
    if out.is_empty() {
        bail!("--attacks names no attack");
    }
    Ok(out)
}

fn attack(a: AttackArgs) -> Result<ExitCode> {
    use quant_robust::eval::robust::{self, RobustnessConfig};
    let eps = parse_list(&a.eps)?;
    for &e in &eps {
        quant_robust::attack::check_eps(a.norm, e)?;
    }
    let dev = device::select(a.data.device)?;
    let attacks = build_attacks(&a, &dev)?;
    let data = load_data(&a.data)?;
    if a.n == 0 || a.n > data.test.len() {
        bail!("--n {}: the test split has {} images", a.n, data.test.len());
    }
    let quantize = a
        .quantize
        .map(quant_robust::quant::seam::UniformConfig::from);
    let model = checkpoint::load(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let mut ranges = None;
    let model = match &quantize {
        None => quant_robust::quant::seam::with_gradient_mode(&model, a.gradient),
        Some(q) => {
            let calib_set = calibration_set(&data, a.calib, a.seed, &dev)?;
            let all: Vec<u32> = (0..calib_set.len() as u32).collect();
            let r = quant_robust::quant::seam::calibrate(&model, &calib_set, &all, a.batch_size)?;
            ranges = Some(r.clone());
            quant_robust::quant::seam::uniform_ptq(&model, q.clone(), r, a.gradient)
        }
    };
    let dd = DeviceData::new(&data.test, &dev)?;
    let idx = quant_robust::eval::eval_indices(&dd, Some(a.n), a.seed)?;
    let cfg = RobustnessConfig {
        norm: a.norm,
        eps: eps.clone(),
        batch_size: a.batch_size,
        seed: a.seed,
        ..RobustnessConfig::default()
    };
    let total = (attacks.len() * eps.len() * idx.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images ({elapsed}<{eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut finished = 0u64;
    let mut last = (String::new(), usize::MAX);
    let t = Instant::now();
    let report = robust::evaluate(
        &model,
        &dd,
        &idx,
        &attacks,
        &cfg,
        &mut |name, ei, done, n| {
            if (name.to_string(), ei) != last {
                if last.1 != usize::MAX {
                    finished += n as u64;
                }
                last = (name.to_string(), ei);
            }
            bar.set_prefix(format!("{name} eps {:.4}", eps[ei]));
            bar.set_position(finished + done as u64);
        },
    )?;
    bar.finish_and_clear();
    let wall = t.elapsed().as_secs_f64();
    for r in &report.attacks {
        for e in &r.per_eps {
            tracing::info!(
                "{:>12} eps {:.4} ({:>5.2}/255): robust {:.2}% ({}/{})",
                r.attack,
                e.eps,
                e.eps * 255.0,
                100.0 * e.accuracy,
                e.correct,
                e.total
            );
        }
        if let Some(st) = &r.stages {
            for (k, name) in st.names.iter().enumerate() {
                let after: Vec<String> = st.after[k]
                    .iter()
                    .map(|e| format!("{:.2}% at {:.4}", 100.0 * e.accuracy, e.eps))
                    .collect();
                tracing::info!(
                    "{:>12}   after {name}: {} ({} images attacked, {:.1} s)",
                    "",
                    after.join(", "),
                    st.images[k],
                    st.wall_s[k]
                );
            }
        }
    }
    for e in &report.worst_case {
        tracing::info!(
            "  worst case eps {:.4}: robust {:.2}% ({}/{}), clean {:.2}%",
            e.eps,
            100.0 * e.accuracy,
            e.correct,
            e.total,
            100.0 * report.clean.accuracy
        );
    }
    if let Some(p) = &a.save_examples {
        let k = idx.len().min(8);
        let pick: Vec<u32> = (0..k).map(|i| idx[i * idx.len() / k]).collect();
        let e = eps.iter().cloned().fold(0.0, f64::max);
        let ex = robust::examples(&model, &dd, &pick, attacks[0].as_ref(), a.norm, e, a.seed)?;
        quant_robust::report::examples::write_grid(p, &ex, e)?;
        tracing::info!("wrote {}", p.display());
    }
    let mut m = quant_robust::manifest::Manifest::new("attack", &dev);
    m.seed = Some(a.seed);
    m.data = Some(data.identity.clone());
    m.config = json!({
        "checkpoint": a.checkpoint,
        "attacks": attacks.iter().map(|x| x.name()).collect::<Vec<_>>(),
        "norm": a.norm,
        "eps": eps,
        "steps": a.steps,
        "step_fraction": a.step_fraction,
        "restarts": a.restarts,
        "apgd_iterations": a.apgd_iterations,
        "square_queries": a.square_queries,
        "fab_iterations": a.fab_iterations,
        "autoattack_stages": a.autoattack_stages,
        "n": a.n,
        "batch_size": a.batch_size,
        "model": model.seam().describe(),
        "quantize": quantize,
        "calib": quantize.as_ref().map(|_| a.calib),
        "activation_ranges": ranges,
        "gradient": a.gradient,
    });
    m.add_timing("attack", wall, &dev);
    m.metrics
        .insert("clean_accuracy".into(), report.clean.accuracy);
    let result = json!({
        "checkpoint": a.checkpoint,
        "report": report,
        "manifest": m,
        "checkpoint_manifest": side_manifest(&a.checkpoint),
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

fn ptq(a: PtqArgs) -> Result<ExitCode> {
    use quant_robust::quant::ptq::{post_training_quantize, PtqConfig, PtqOutcome};
    use quant_robust::quant::seam::CalibMethod;
    let bits = parse_bits(a.wbits, a.abits, a.first_last_bits)?;
    let calib_range = match a.calib_range.as_str() {
        "max" => CalibMethod::Max,
        p => CalibMethod::Percentile(
            parse_number(p).map_err(|e| anyhow::anyhow!("--calib-range: {e}"))?,
        ),
    };
    let cfg = PtqConfig {
        calib_range,
        method: a.method,
        bits,
        breakpoint: a.breakpoint,
        bias_correction: a.bias_correction,
        calib: a.calib,
    };
    if let Some(ck) = &a.out_checkpoint {
        check_out_path(a.out.as_deref(), ck)?;
    }
    let dev = device::select(a.data.device)?;
    let data = load_data(&a.data)?;
    if a.calib == 0 || a.calib > data.train.len() {
        bail!(
            "--calib {}: the training split has {} images",
            a.calib,
            data.train.len()
        );
    }
    let fp = checkpoint::load(&a.checkpoint, &dev, false)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    if fp.seam().persist().is_some() {
        bail!(
            "{} is already quantized; give a full-precision checkpoint",
            a.checkpoint.display()
        );
    }
    let t = Instant::now();
    let calib_set = calibration_set(&data, a.calib, a.seed, &dev)?;
    let PtqOutcome {
        model,
        breakpoint_ratios: ratios,
        activation_ranges: ranges,
    } = post_training_quantize(&fp, &cfg, &calib_set)?;
    let quant_s = t.elapsed().as_secs_f64();
    let dd = DeviceData::new(&data.test, &dev)?;
    let idx = quant_robust::eval::eval_indices(&dd, a.n, a.seed)?;
    let acc = clean_accuracy(&model, &dd, &idx, 500)?;
    let fp_acc = clean_accuracy(&fp, &dd, &idx, 500)?;
    let name = format!("ptq-{:?}-{}", a.method, cfg.bits.name()).to_lowercase();
    let out_ck = a.out_checkpoint.clone().unwrap_or_else(|| {
        let stem = a.checkpoint.with_extension("");
        PathBuf::from(format!("{}-{name}.safetensors", stem.display()))
    });
    check_out_path(a.out.as_deref(), &out_ck)?;
    let mut m = quant_robust::manifest::Manifest::new("checkpoint", &dev);
    m.seed = Some(a.seed);
    m.data = Some(data.identity.clone());
    m.config = json!({ "stage": "ptq", "source": a.checkpoint, "ptq": cfg });
    m.add_timing("ptq", quant_s, &dev);
    m.metrics.insert("test_accuracy".into(), acc.fraction());
    m.metrics
        .insert("fp_test_accuracy".into(), fp_acc.fraction());
    m.metrics.insert("test_images".into(), acc.total as f64);
    checkpoint::save(&model, &out_ck, &m)?;
    tracing::info!(
        "{name}: clean accuracy {:.2}% ({}/{}), full precision {:.2}%; wrote {}",
        acc.percent(),
        acc.correct,
        acc.total,
        fp_acc.percent(),
        out_ck.display()
    );
    let result = json!({
        "checkpoint": out_ck,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "fp_accuracy": fp_acc.fraction(),
        "breakpoint_ratio_p_over_m": ratios,
        "activation_ranges": ranges,
        "manifest": m,
    });
    write_result(a.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

fn qat(a: QatArgs) -> Result<ExitCode> {
    use quant_robust::quant::qat::{AlphaInit, QatConfig};
    use quant_robust::study::config::{Init, QatStage};
    use quant_robust::train::qat::{resume_settings, QatStart};
    // A resumed run writes where it was started; --checkpoint names a fresh run's output.
    let out_path = a.train.resume.clone().unwrap_or(a.train.checkpoint.clone());
    check_out_path(a.train.out.as_deref(), &out_path)?;
    let latent = out_path.with_extension("latent.safetensors");
    let dev = device::select(a.train.data.device)?;
    let data = load_data(&a.train.data)?;
    let (qcfg, tcfg, init_desc, model) = match &a.init {
        None => {
            let (state, tcfg) = resume_settings(&latent)
                .with_context(|| format!("resuming the QAT run of {}", out_path.display()))?;
            let mut tcfg = tcfg;
            if let Some(e) = a.train.epochs {
                tcfg.epochs = e;
            }
            (state.config, tcfg, state.init, None)
        }
        Some(init) => {
            let bits = parse_bits(a.wbits, a.abits, a.first_last_bits)?;
            let alpha_init = match a.alpha_init.as_deref() {
                None => QatStage::default().alpha_init_for(if init == "random" {
                    Init::Random
                } else {
                    Init::Natural
                }),
                Some("calibrated") => AlphaInit::Calibrated,
                Some(v) => AlphaInit::Fixed(
                    parse_number(v).map_err(|e| anyhow::anyhow!("--alpha-init: {e}"))?,
                ),
            };
            alpha_init.validate("--alpha-init")?;
            let qcfg = QatConfig {
                bits,
                alpha_init,
                ..QatConfig::default()
            };
            let mut tcfg = train_config(&a.train)?;
            if a.train.epochs.is_none() {
                tcfg.epochs = 5;
            }
            if a.train.lr.is_none() && init != "random" {
                tcfg.lr = 0.01;
            }
            tcfg.validate()?;
            let model = match init.split_once(':') {
                None if init == "random" => {
                    quant_robust::model::ResNet20::init(&mut Rng::new(tcfg.seed, "init"), &dev)?
                }
                Some((kind @ ("natural" | "robust"), path)) => {
                    checkpoint::load(Path::new(path), &dev, true)
                        .with_context(|| format!("loading the {kind} initialization {path}"))?
                }
                _ => {
                    bail!("--init {init}: expected random, natural:CHECKPOINT or robust:CHECKPOINT")
                }
            };
            if model.seam().persist().is_some() {
                bail!("--init must be a full-precision checkpoint");
            }
            (qcfg, tcfg, init.clone(), Some(model))
        }
    };
    // α from the full-precision activations of 512 seeded training images.
    let calib_set = calibration_set(&data, 512.min(data.train.len()), tcfg.seed, &dev)?;
    let train_set = train_subset(&data, a.train.fraction, a.train.train_count, tcfg.seed)?;
    let train_dev = DeviceData::new(&train_set, &dev)?;
    let test_dev = DeviceData::new(&data.test, &dev)?;
    tracing::info!(
        "QAT {} from {init_desc} on {} images, {} epochs",
        qcfg.bits.name(),
        train_set.len(),
        tcfg.epochs,
    );
    let start = match &model {
        Some(m) => QatStart::Fresh {
            model: m,
            init: init_desc.clone(),
        },
        None => QatStart::Resume,
    };
    let mut bar = Bar { bar: None };
    let out = quant_robust::train::qat::fine_tune(
        start,
        &qcfg,
        tcfg.clone(),
        &calib_set,
        &train_dev,
        &test_dev,
        data.identity.clone(),
        Some(&latent),
        &quant_robust::device::stop_requested,
        &mut bar,
        &dev,
    )?;
    let Some(out) = out else {
        tracing::warn!(
            "stopped on SIGTERM; continue with `qat --resume {}`",
            out_path.display()
        );
        return Ok(ExitCode::from(EXIT_STOPPED_EARLY));
    };
    let (exported, acc, alpha_log) = (out.model, out.test, out.alpha_per_epoch);
    let mut m = out.manifest;
    m.config = json!({ "stage": "qat", "init": init_desc, "qat": qcfg, "train": tcfg });
    m.metrics.insert("test_accuracy".into(), acc.fraction());
    m.metrics.insert("test_images".into(), acc.total as f64);
    checkpoint::save(&exported, &out_path, &m)?;
    tracing::info!(
        "QAT {}: clean accuracy {:.2}% ({}/{}); wrote {}",
        qcfg.bits.name(),
        acc.percent(),
        acc.correct,
        acc.total,
        out_path.display()
    );
    let result = json!({
        "checkpoint": out_path,
        "latent_checkpoint": latent,
        "accuracy": acc.fraction(),
        "correct": acc.correct,
        "total": acc.total,
        "alpha_per_epoch": alpha_log,
        "history": out.history,
        "manifest": m,
    });
    write_result(a.train.out.as_deref(), &result)?;
    Ok(ExitCode::SUCCESS)
}

/// A seeded, class-stratified calibration set of `n` training images, on the device.
fn calibration_set(
    data: &data::CifarData,
    n: usize,
    seed: u64,
    dev: &candle_core::Device,
) -> Result<DeviceData> {
    Ok(DeviceData::new(
        &subset::calibration(&data.train, n, seed)?,
        dev,
    )?)
}

/// The training images of a run: a seeded, stratified fraction or count, or all.
fn train_subset(
    data: &data::CifarData,
    fraction: Option<f64>,
    count: Option<usize>,
    seed: u64,
) -> Result<data::Dataset> {
    let size = match (fraction, count) {
        (Some(f), _) => Some(subset::SubsetSize::Fraction(f)),
        (None, Some(n)) => Some(subset::SubsetSize::Count(n)),
        (None, None) => None,
    };
    Ok(subset::training(&data.train, size, seed)?)
}

/// Weight and activation bits (32 = full precision) and the first/last layers' weight bits.
fn parse_bits(
    wbits: u32,
    abits: u32,
    first_last: u32,
) -> Result<quant_robust::quant::seam::UniformConfig> {
    let bits = quant_robust::quant::Bits::new(wbits, abits).context("--wbits / --abits")?;
    quant_robust::quant::uniform::code_range(
        first_last,
        quant_robust::quant::uniform::Signedness::Symmetric,
    )
    .context("--first-last-bits")?;
    Ok(quant_robust::quant::seam::UniformConfig {
        first_last_bits: first_last,
        ..bits.into()
    })
}

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

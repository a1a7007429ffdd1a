//! The command line's arguments and their help texts.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use quant_robust::data::DataSource;
use quant_robust::device::DeviceChoice;

pub use super::study_args::*;
use super::*;

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
    /// Submit the study to Slurm: the full-precision models, then the grid as a job array
    /// (`afterok`), then the merge and report (`afterok`), in one folder on the shared
    /// filesystem. --dry-run prints the scripts.
    #[command(after_help = SLURM_EXAMPLES)]
    Slurm(Box<SlurmArgs>),
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
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().pgd_steps)]
    pub steps: usize,
    /// PGD step size as a fraction of ε.
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().pgd_step_fraction)]
    pub step_fraction: f64,
    /// Random restarts of PGD and APGD.
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().restarts)]
    pub restarts: usize,
    /// APGD iterations.
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().apgd_iterations)]
    pub apgd_iterations: usize,
    /// Square attack query budget.
    #[arg(long, default_value_t = quant_robust::attack::AttackSettings::default().square_queries)]
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
    #[arg(long, default_value_t = quant_robust::eval::robust::RobustnessConfig::default().batch_size)]
    pub batch_size: usize,
    /// Write a PNG grid of 8 examples (the first attack at the largest ε).
    #[arg(long)]
    pub save_examples: Option<PathBuf>,
    /// Attack the checkpoint uniformly post-training-quantized to these bits, e.g. w4a4
    /// (32 = full precision; first conv and last linear keep 8-bit weights).
    #[arg(long)]
    pub quantize: Option<quant_robust::quant::Bits>,
    /// Training images that calibrate the activation ranges of --quantize (seeded, stratified).
    #[arg(long, default_value_t = quant_robust::quant::ptq::PtqConfig::default().calib)]
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
    #[arg(long, value_enum, default_value_t = quant_robust::quant::ptq::PtqConfig::default().method)]
    pub method: quant_robust::quant::ptq::PtqMethod,
    /// Weight bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 8)]
    pub wbits: u32,
    /// Activation bits (2-16; 32 = full precision).
    #[arg(long, default_value_t = 8)]
    pub abits: u32,
    /// Weight bits of the first conv and the last linear layer.
    #[arg(long, default_value_t = quant_robust::quant::seam::UniformConfig::default().first_last_bits)]
    pub first_last_bits: u32,
    /// PWLQ breakpoint.
    #[arg(long, value_enum, default_value_t = quant_robust::quant::ptq::PtqConfig::default().breakpoint)]
    pub breakpoint: quant_robust::quant::pwlq::Breakpoint,
    /// PWLQ bias correction.
    #[arg(long)]
    pub bias_correction: bool,
    /// Training images that calibrate the activation ranges (seeded, stratified).
    #[arg(long, default_value_t = quant_robust::quant::ptq::PtqConfig::default().calib)]
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
    #[arg(long, default_value_t = quant_robust::quant::seam::UniformConfig::default().first_last_bits)]
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

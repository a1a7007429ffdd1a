//! The command line's arguments and their help texts.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use quant_robust::data::DataSource;
use quant_robust::device::DeviceChoice;

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

const SLURM_EXAMPLES: &str = "\
Examples:
  # the smoke study as 3 array tasks + merge; print the scripts first
  quant-robust slurm --preset smoke --out /shared/studies/smoke --tasks 3 --dry-run
  quant-robust slurm --preset smoke --out /shared/studies/smoke --tasks 3
  # the fast study on GPU nodes, 8 tasks, 4 at a time, 4-hour jobs that requeue themselves
  quant-robust slurm --preset fast --out /shared/studies/fast --tasks 8 --throttle 4 \\
      --partition gpu --gres gpu:1 --cpus 8 --time 4:00:00 --device cuda
  # after a failure (a cancelled task, a spent requeue count): the same command again;
  # every finished stage is read from the study folder's cache";

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
    pub shard: Option<quant_robust::study::shard::Shard>,
    /// Stop cleanly (resumable) once this many seconds have passed: checked between stages,
    /// between training epochs and between evaluation units. Exit status 75 means "stopped early, run again".
    #[arg(long)]
    pub time_budget: Option<f64>,
    /// Inside a Slurm job with a time limit and no --time-budget: stop cleanly this many
    /// seconds before the job's end (`SLURM_JOB_END_TIME`). A stage still running at the
    /// end is lost and redone by the next run.
    #[arg(long, default_value_t = quant_robust::study::slurm::END_MARGIN_S as f64)]
    pub end_margin: f64,
    /// Stop cleanly (resumable) after computing this many stages.
    #[arg(long)]
    pub max_stages: Option<usize>,
    /// Make the models only (training, PTQ, QAT), not their evaluations; a later run
    /// without it evaluates them from the cache.
    #[arg(long, conflicts_with = "fp_only")]
    pub models_only: bool,
    /// Make the full-precision models only (the checkpoints every other cell starts from):
    /// a cluster's first job, before the grid's array.
    #[arg(long)]
    pub fp_only: bool,
    /// Compute nothing: write an interim results.json, report.md and plots of the models
    /// finished so far (verdicts included, the unfinished models named) into DIR/interim/,
    /// while the study runs or between its chunks.
    #[arg(long, conflicts_with_all = ["fp_only", "models_only", "shard"])]
    pub interim: bool,
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
pub struct SlurmArgs {
    /// A preset: smoke, cpu, fast, full (as `reproduce`).
    #[arg(long, default_value = "smoke")]
    pub preset: String,
    /// A study configuration file (JSON). Overrides --preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data path (overrides the configuration's `data`; relative paths are read from the
    /// directory of the submission).
    #[arg(long)]
    pub data: Option<String>,
    /// The study folder, on a filesystem every node sees. Default: the configuration's
    /// `out`, else runs/study-<name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tasks of the grid's job array (the models are split over them).
    #[arg(long, default_value_t = 4)]
    pub tasks: usize,
    /// Run at most this many of the array's tasks at once (`--array=1-N%K`).
    #[arg(long)]
    pub throttle: Option<usize>,
    /// Slurm partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// Each job's time limit (Slurm's forms: M, H:M:S, D-H:M:S). The run stops cleanly
    /// --end-margin seconds before it and the job requeues itself to go on.
    #[arg(long)]
    pub time: Option<quant_robust::study::slurm::TimeLimit>,
    /// CPUs per task (the run's threads).
    #[arg(long, default_value_t = 2)]
    pub cpus: usize,
    /// Generic resources per job, e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// Memory per node, e.g. 8G.
    #[arg(long)]
    pub mem: Option<String>,
    /// Seconds before the time limit at which a run stops cleanly (a stage still running
    /// then is redone by the requeued job).
    #[arg(long, default_value_t = quant_robust::study::slurm::END_MARGIN_S)]
    pub end_margin: u64,
    /// How often a job stopped at its time limit requeues itself before it fails.
    #[arg(long, default_value_t = 3)]
    pub requeues: u32,
    /// The jobs' name prefix. Default: qr-<study name>.
    #[arg(long)]
    pub job_name: Option<String>,
    /// The quant-robust binary the jobs run (on the shared filesystem). Default: this one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The sbatch program.
    #[arg(long, default_value = "sbatch")]
    pub sbatch: PathBuf,
    /// Device of every run: cpu, cuda, or auto.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Print the scripts and the submission commands; write and submit nothing.
    #[arg(long)]
    pub dry_run: bool,
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

//! The arguments of the study's commands: `reproduce`, `merge`, `slurm`, `report`, `golden`.

use std::path::PathBuf;

use clap::Subcommand;

use quant_robust::data::DataSource;
use quant_robust::device::DeviceChoice;

pub(super) const STUDY_EXAMPLES: &str = "\
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

pub(super) const SLURM_EXAMPLES: &str = "\
Examples:
  # the smoke study as 3 array tasks + merge; print the scripts first
  quant-robust slurm --preset smoke --out /shared/studies/smoke --tasks 3 --dry-run
  quant-robust slurm --preset smoke --out /shared/studies/smoke --tasks 3
  # the fast study on GPU nodes, 8 tasks, 4 at a time, 4-hour jobs that requeue themselves
  quant-robust slurm --preset fast --out /shared/studies/fast --tasks 8 --throttle 4 \\
      --partition gpu --gres gpu:1 --cpus 8 --time 4:00:00 --device cuda
  # after a failure (a cancelled task, a spent requeue count): the same command again;
  # every finished stage is read from the study folder's cache";

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
    /// with golden.json (command, device, data, code, snapshot settings). Refuses a dirty
    /// tree. Then write the snapshots (golden/README.md: `INSTA_UPDATE=always cargo test
    /// --release golden_models_match`, and again with `QR_SLOW=1`) and commit both with a
    /// message naming the command, device, seed and commit.
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
    /// Test images each golden model is re-measured on by the default tier of the snapshot
    /// tests. Default 32.
    #[arg(long)]
    pub snapshot_n: Option<usize>,
    /// The same for the slow tier (`QR_SLOW=1`). Default 256.
    #[arg(long)]
    pub snapshot_n_slow: Option<usize>,
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

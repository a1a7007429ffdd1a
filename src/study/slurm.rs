//! The study as Slurm jobs: the batch scripts (full-precision stage, the grid as a job array,
//! the merge) and their submission with `sbatch`, and what a run reads from Slurm's
//! environment besides its shard ([`super::shard`]): when the job must end.
//!
//! Every job works in one study folder on the cluster's shared filesystem: the stage cache
//! is safe for concurrent processes (each stage is claimed by a lock in its folder), so the
//! array's tasks share the full-precision checkpoints and the merge only collects.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use crate::{Error, Result};

/// Seconds left before a run should stop cleanly inside a Slurm job whose end time
/// (`SLURM_JOB_END_TIME`, Unix seconds, read through `var`; set by Slurm 23.02 and later)
/// is known: the time to the end less `margin_s`, never below zero. `None` outside such a
/// job.
pub fn seconds_left(
    var: impl Fn(&str) -> Option<String>,
    now_unix: f64,
    margin_s: f64,
) -> Result<Option<f64>> {
    let Some(end) = var("SLURM_JOB_END_TIME") else {
        return Ok(None);
    };
    let end: f64 = end
        .trim()
        .parse::<u64>()
        .map_err(|_| Error::config("SLURM_JOB_END_TIME", &end, "not Unix seconds"))?
        as f64;
    Ok(Some((end - now_unix - margin_s).max(0.0)))
}

/// A Slurm time limit (`--time`), in whole seconds. Parsed from Slurm's own forms:
/// `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimit(u64);

impl TimeLimit {
    pub fn seconds(self) -> u64 {
        self.0
    }
}

impl FromStr for TimeLimit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "--time",
                s,
                "expected a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S",
            )
        };
        let num = |x: &str| -> Result<u64> {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            x.parse().map_err(|_| bad())
        };
        let (days, rest) = match s.split_once('-') {
            Some((d, r)) => (Some(num(d)?), r),
            None => (None, s),
        };
        let parts = rest.split(':').map(num).collect::<Result<Vec<u64>>>()?;
        let secs = match (days, parts.as_slice()) {
            (None, [m]) => m * 60,
            (None, [m, s]) => m * 60 + s,
            (None, [h, m, s]) | (Some(_), [h, m, s]) => h * 3600 + m * 60 + s,
            (Some(_), [h]) => h * 3600,
            (Some(_), [h, m]) => h * 3600 + m * 60,
            _ => return Err(bad()),
        } + days.unwrap_or(0) * 86_400;
        if secs == 0 {
            return Err(Error::config("--time", s, "a time limit must be > 0"));
        }
        Ok(TimeLimit(secs))
    }
}

impl fmt::Display for TimeLimit {
    /// `D-HH:MM:SS`, a form `sbatch --time` reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(
            f,
            "{}-{:02}:{:02}:{:02}",
            s / 86_400,
            s % 86_400 / 3600,
            s % 3600 / 60,
            s % 60
        )
    }
}

/// How the jobs ask Slurm for resources and how the runs inside them behave.
/// Seconds before a Slurm job's time limit at which a run stops cleanly (resumable), by
/// default: `slurm --end-margin`, and `reproduce --end-margin` inside a job.
pub const END_MARGIN_S: u64 = 300;

#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    /// The name's prefix of every job (`<prefix>-fp`, `-grid`, `-merge`).
    pub name: String,
    /// Tasks of the grid's array: the study's models are split over them as `--shard K/N`.
    pub tasks: usize,
    /// At most this many of the array's tasks at once (`--array=1-N%K`).
    pub throttle: Option<usize>,
    pub partition: Option<String>,
    /// Each job's time limit. The run inside stops cleanly (resumable) `end_margin_s` before
    /// it, and the job requeues itself to go on (at most `requeues` times).
    pub time: Option<TimeLimit>,
    pub cpus_per_task: usize,
    /// Generic resources per job (`--gres`, e.g. `gpu:1`).
    pub gres: Option<String>,
    /// Memory per node (`--mem`, e.g. `8G`).
    pub mem: Option<String>,
    pub end_margin_s: u64,
    /// How often a job that stopped at its time limit requeues itself before it fails.
    pub requeues: u32,
}

impl JobOptions {
    /// Checks what would otherwise reach `sbatch` malformed: names and resource strings
    /// with characters that would break a `#SBATCH` line, counts of zero, a time limit
    /// that leaves no time after the margin.
    pub fn validate(&self) -> Result<()> {
        let token = |what: &'static str, v: &str| -> Result<()> {
            let ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:,=+/".contains(c));
            if ok {
                Ok(())
            } else {
                Err(Error::config(
                    what,
                    v,
                    "only letters, digits and -_.:,=+/ are allowed",
                ))
            }
        };
        token("--job-name", &self.name)?;
        for (what, v) in [
            ("--partition", &self.partition),
            ("--gres", &self.gres),
            ("--mem", &self.mem),
        ] {
            if let Some(v) = v {
                token(what, v)?;
            }
        }
        if self.tasks == 0 {
            return Err(Error::config("--tasks", 0, "the array needs ≥ 1 task"));
        }
        if self.throttle == Some(0) {
            return Err(Error::config("--throttle", 0, "must be ≥ 1"));
        }
        if self.cpus_per_task == 0 {
            return Err(Error::config("--cpus", 0, "must be ≥ 1"));
        }
        if let Some(t) = self.time {
            if t.seconds() <= self.end_margin_s {
                return Err(Error::config(
                    "--time",
                    t,
                    format!(
                        "leaves no time to run: the run stops {} s (--end-margin) before the limit",
                        self.end_margin_s
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Where the jobs run and what they run.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The `quant-robust` binary, on the shared filesystem.
    pub binary: PathBuf,
    /// The jobs' working directory (relative data paths are read from it).
    pub workdir: PathBuf,
    /// The study folder on the shared filesystem: cache, results, report, and `slurm/` (the
    /// scripts, the frozen configuration, the jobs' logs).
    pub out: PathBuf,
    /// `--device` of every run: cpu, cuda or auto.
    pub device: String,
}

impl Layout {
    /// The folder of the scripts, the configuration every job reads, and the logs.
    pub fn slurm_dir(&self) -> PathBuf {
        self.out.join("slurm")
    }

    /// The study configuration the jobs read (written at submission, so that an edit of the
    /// original file cannot make the jobs disagree).
    pub fn config_path(&self) -> PathBuf {
        self.slurm_dir().join("study.json")
    }
}

/// The three batch scripts of a study.
#[derive(Debug, Clone, PartialEq)]
pub struct Scripts {
    /// The full-precision models (an array over them, as they are independent).
    pub fp: String,
    /// The grid: every model and its evaluation, sharded over the array's tasks.
    pub grid: String,
    /// Collects the results and writes the report; refuses, listing them, if cells are
    /// missing.
    pub merge: String,
}

/// Quotes `s` for a POSIX shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::config("path", p.display(), "not valid UTF-8"))
}

/// The batch scripts for a study with `n_fp` full-precision models.
pub fn scripts(opts: &JobOptions, layout: &Layout, n_fp: usize) -> Result<Scripts> {
    opts.validate()?;
    let bin = sh(path_str(&layout.binary)?);
    let out = sh(path_str(&layout.out)?);
    let cfg = sh(path_str(&layout.config_path())?);
    let logs = layout.slurm_dir().join("logs");
    let logs = path_str(&logs)?;
    let budget = opts
        .time
        .map(|t| format!(" --time-budget {}", t.seconds() - opts.end_margin_s))
        .unwrap_or_default();
    let header = |stage: &str, log: &str, extra: &[String]| -> Result<String> {
        let mut h = vec![
            "#!/bin/bash".to_string(),
            format!("#SBATCH --job-name={}-{stage}", opts.name),
            format!("#SBATCH --output={logs}/{log}"),
            format!("#SBATCH --chdir={}", path_str(&layout.workdir)?),
            format!("#SBATCH --cpus-per-task={}", opts.cpus_per_task),
            "#SBATCH --ntasks=1".to_string(),
            "#SBATCH --open-mode=append".to_string(),
        ];
        h.extend(extra.iter().cloned());
        if let Some(t) = opts.time {
            h.push(format!("#SBATCH --time={t}"));
        }
        if let Some(p) = &opts.partition {
            h.push(format!("#SBATCH --partition={p}"));
        }
        if let Some(m) = &opts.mem {
            h.push(format!("#SBATCH --mem={m}"));
        }
        if let Some(g) = &opts.gres {
            h.push(format!("#SBATCH --gres={g}"));
        }
        for l in &h {
            let option = l.strip_prefix("#SBATCH ").unwrap_or_default();
            if l.contains('\n') || option.contains(char::is_whitespace) {
                return Err(Error::config("sbatch option", l, "contains white space"));
            }
        }
        h.push(String::new());
        h.push("set -u".to_string());
        h.push(format!(
            "export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-{}}}\"",
            opts.cpus_per_task
        ));
        Ok(h.join("\n") + "\n")
    };
    // A run that stopped at its time budget exits 75: the job requeues itself (the stages it
    // finished are in the cache) until `requeues` is spent, then fails.
    let requeue = |id: &str| {
        format!(
            "rc=$?\n\
             if [ \"$rc\" -eq 75 ] && [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {n} ]; then\n\
             \x20 echo \"quant-robust: stopped at the time budget; requeueing {id} (restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of {n})\"\n\
             \x20 scontrol requeue \"{id}\" && exit 0\n\
             fi\n\
             exit \"$rc\"\n",
            n = opts.requeues,
        )
    };
    let array_id = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}";
    let reproduce = format!(
        "{bin} reproduce --config {cfg} --out {out} --device {}{budget}",
        layout.device
    );
    let throttle = opts.throttle.map(|t| format!("%{t}")).unwrap_or_default();
    let fp = header(
        "fp",
        "fp-%A_%a.out",
        &[
            format!("#SBATCH --array=1-{}", n_fp.max(1)),
            "#SBATCH --requeue".into(),
        ],
    )? + &format!("{reproduce} --fp-only\n")
        + &requeue(array_id);
    let grid = header(
        "grid",
        "grid-%A_%a.out",
        &[
            format!("#SBATCH --array=1-{}{throttle}", opts.tasks),
            "#SBATCH --requeue".into(),
        ],
    )? + &format!("{reproduce}\n")
        + &requeue(array_id);
    let merge =
        header("merge", "merge-%j.out", &[])? + &format!("exec {bin} merge --out {out} {out}\n");
    Ok(Scripts { fp, grid, merge })
}

/// The jobs of a submitted study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub fp: String,
    pub grid: String,
    pub merge: String,
}

/// Writes the scripts into the layout's `slurm/` folder and submits them with `sbatch`
/// (the program `sbatch`, found on `PATH` unless given): the full-precision array, the grid
/// array after it (`afterok`), the merge after the grid (`afterok`); a job whose dependency
/// can no longer be met is cancelled by Slurm (`--kill-on-invalid-dep=yes`) rather than left
/// pending, so a failed study can simply be submitted again.
pub fn submit(scripts: &Scripts, layout: &Layout, sbatch: &Path) -> Result<Submitted> {
    let dir = layout.slurm_dir();
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| Error::io(&dir, e))?;
    let mut ids = Vec::new();
    for (stage, text) in [
        ("fp", &scripts.fp),
        ("grid", &scripts.grid),
        ("merge", &scripts.merge),
    ] {
        let path = dir.join(format!("{stage}.sbatch"));
        crate::io::write_bytes_atomic(&path, text.as_bytes())?;
        let mut c = Command::new(sbatch);
        c.arg("--parsable");
        if let Some(prev) = ids.last() {
            c.arg(format!("--dependency=afterok:{prev}"))
                .arg("--kill-on-invalid-dep=yes");
        }
        c.arg(&path);
        let o = c.output().map_err(|e| Error::io(Path::new(sbatch), e))?;
        if !o.status.success() {
            return Err(Error::config(
                "sbatch",
                path.display(),
                format!(
                    "refused the {stage} job ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ));
        }
        // `--parsable` prints `<id>` or `<id>;<cluster>`.
        let id = String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::config(
                "sbatch",
                id,
                format!("printed no job id for the {stage} job"),
            ));
        }
        ids.push(id);
    }
    let [fp, grid, merge]: [String; 3] = ids
        .try_into()
        .map_err(|_| Error::config("sbatch", "jobs", "expected three job ids"))?;
    Ok(Submitted { fp, grid, merge })
}

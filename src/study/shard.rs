//! Which part of the study a process runs: shard K of N, from `--shard K/N` or from a Slurm
//! job array's variables.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Shard `index` (1-based) of `count`: the jobs whose plan index is ≡ `index` − 1 (mod
/// `count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// Shard `index` of `count`, 1 ≤ `index` ≤ `count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if index == 0 || count == 0 || index > count {
            return Err(Error::config(
                "shard",
                format!("{index}/{count}"),
                "expected K/N with 1 ≤ K ≤ N",
            ));
        }
        Ok(Shard { index, count })
    }

    pub fn index(self) -> usize {
        self.index
    }

    pub fn count(self) -> usize {
        self.count
    }

    /// Whether the job at (0-based) plan position `i` is this shard's.
    pub fn owns(self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// The shard of a Slurm array task, read through `var` (the process environment in the
    /// CLI): task `SLURM_ARRAY_TASK_ID` of the array `SLURM_ARRAY_TASK_MIN` ..=
    /// `SLURM_ARRAY_TASK_MAX` with step `SLURM_ARRAY_TASK_STEP` (default 1), which must hold
    /// `SLURM_ARRAY_TASK_COUNT` tasks where that is set. `None` outside an array job; an
    /// error where the variables do not describe an evenly spaced array (`--array=1,3,7`:
    /// give `--shard` then).
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(id) = var("SLURM_ARRAY_TASK_ID") else {
            return Ok(None);
        };
        let num = |name: &'static str, v: String| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| Error::config(name, v.clone(), "not a whole number"))
        };
        let need = |name: &'static str| -> Result<usize> {
            let v = var(name).ok_or_else(|| {
                Error::config(
                    name,
                    "unset",
                    "SLURM_ARRAY_TASK_ID is set but this is not: give --shard K/N",
                )
            })?;
            num(name, v)
        };
        let id = num("SLURM_ARRAY_TASK_ID", id)?;
        let (min, max) = (need("SLURM_ARRAY_TASK_MIN")?, need("SLURM_ARRAY_TASK_MAX")?);
        let step = match var("SLURM_ARRAY_TASK_STEP") {
            Some(s) => num("SLURM_ARRAY_TASK_STEP", s)?,
            None => 1,
        };
        let uneven = || {
            Error::config(
                "SLURM_ARRAY_TASK_ID",
                format!("{id} (min {min}, max {max}, step {step})"),
                "not a task of an evenly spaced array: give --shard K/N",
            )
        };
        if step == 0 || id < min || id > max || (id - min) % step != 0 || (max - min) % step != 0 {
            return Err(uneven());
        }
        let count = (max - min) / step + 1;
        if let Some(c) = var("SLURM_ARRAY_TASK_COUNT") {
            let c = num("SLURM_ARRAY_TASK_COUNT", c)?;
            if c != count {
                return Err(Error::config(
                    "SLURM_ARRAY_TASK_COUNT",
                    c,
                    format!(
                        "the array {min}-{max}:{step} has {count} tasks: not an evenly spaced \
                         array (give --shard K/N)"
                    ),
                ));
            }
        }
        Shard::new((id - min) / step + 1, count).map(Some)
    }

    /// The shard to run, and where it came from (for the log): `--shard` if given, else a
    /// Slurm array's, else none. A `--shard` that contradicts the Slurm array is an error.
    pub fn resolve(
        flag: Option<Shard>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(Shard, &'static str)>> {
        let slurm = Shard::from_slurm(var)?;
        match (flag, slurm) {
            (Some(f), Some(s)) if f != s => Err(Error::config(
                "--shard",
                f,
                format!("contradicts the Slurm array task, which is shard {s}"),
            )),
            (Some(f), Some(_)) => Ok(Some((f, "--shard, as the Slurm array task"))),
            (Some(f), None) => Ok(Some((f, "--shard"))),
            (None, Some(s)) => Ok(Some((s, "the Slurm array (SLURM_ARRAY_TASK_*)"))),
            (None, None) => Ok(None),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// `K/N`, e.g. `2/4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::config("--shard", s, "expected K/N with 1 ≤ K ≤ N, e.g. 2/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        Shard::new(k, n).map_err(|_| bad())
    }
}

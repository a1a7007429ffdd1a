//! What a study run reads from Slurm's environment besides its shard ([`super::shard`]):
//! when the job must end.

use crate::{Error, Result};

/// Seconds left before a run should stop cleanly inside a Slurm job whose end time
/// (`SLURM_JOB_END_TIME`, Unix seconds, read through `var`) is known: the time to the end
/// less `margin_s`, never below zero. `None` outside such a job.
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

//! The study: a configuration grid of full-precision models and quantized cells
//! ([`config`], [`plan`]), its model stages ([`stages`]: shared with the command line), run
//! as a stage graph with a content-addressed cache, resumable
//! and shardable ([`run`]), collected into one results document ([`results`]) and judged
//! by the findings F1-F6 ([`findings`]). [`crate::report`] turns the results into
//! `report.md` and plots.

pub mod config;
pub mod findings;
pub mod golden;
pub mod plan;
pub mod results;
pub mod run;
pub mod shard;
pub mod slurm;
pub mod stages;
pub mod verdict;

pub use config::StudyConfig;
pub use results::StudyResults;

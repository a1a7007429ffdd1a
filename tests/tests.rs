//! The one integration-test binary; a module per area of the library.

mod common;

// Attacks: known answers, ε-ball invariants, worst case, masking diagnostics.
mod attack;
// CLI parsing and user-facing errors.
mod cli;
// Golden gates: snapshots of every golden model, consistency, findings, mutation checks.
mod golden;
// Loaders (archive, binary batches, image folders), bad input, subsets, augmentation.
mod data;
// CPU kernels equal candle's reference ops.
mod kernels;
// ResNet-20: parameter count, PyTorch names, shapes, checkpoints.
mod model;
// Quantizers: invariants (proptest), gradients, uniform PTQ.
mod quant;
// The study as Slurm jobs: scripts, options, and a real single-node Slurm cluster.
mod slurm;
// The study: configuration, plan and keys, cache, resume, shards, findings, report.
mod study;
// SGD update, schedules, training runs, resume, divergence.
mod train;

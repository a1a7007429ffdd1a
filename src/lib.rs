//! # quant-robust
//!
//! Does quantization make a neural network more or less robust to adversarial attacks, and
//! under which pipeline? This crate reproduces the study of Li et al. 2024 ("Investigating
//! the Impact of Quantization on Adversarial Robustness": ResNet-20 on CIFAR-10, PTQ with
//! PWLQ, QAT with PACT, robust/natural/random initialization, adversarial training, L_p
//! attacks) on candle, on the CPU and on CUDA.
//!
//! The pipeline, one module per concept, in the order a study uses them:
//!
//! ```text
//! rng, io, error, device     seeded streams; atomic writes; errors; cpu / cuda / auto
//! manifest                   what produced a result (code, data, configuration, timings)
//! kernels/                   CPU convolution (conv2d/: Winograd, direct SIMD, im2col + GEMM,
//!                            the candle ops), BatchNorm, ReLU, fake quantizers, PACT, each
//!                            with its gradients; round half to even (round.rs)
//! data/                      cifar10-jpeg archive, binary batches, image folders; subsets
//!                            (subset.rs); augmentation; device batches (batch.rs)
//! model/                     Classifier + QuantSeam (mod.rs), ResNet-20 (resnet20.rs),
//!                            BatchNorm folding (bn_fold.rs), safetensors checkpoints (their
//!                            weights; quant::load_checkpoint attaches stored quantizers)
//! quant/                     Bits (bits.rs); rounding; uniform quantizer; PWLQ and its
//!                            breakpoint (pwlq.rs); PACT + DoReFa (pact.rs); the uniform
//!                            seam and calibration (seam.rs); PTQ (ptq.rs); QAT export (qat.rs)
//! train/                     SGD, schedules, natural and PGD-AT training, resume; QAT (qat.rs)
//! attack/                    FGSM (fgsm.rs), PGD (pgd.rs), APGD-CE/DLR/T (apgd.rs), FAB
//!                            (fab.rs), Square (square.rs), transfer, AutoAttack (autoattack.rs)
//! eval/                      clean accuracy, Wilson intervals; robust.rs: many attacks and ε,
//!                            per-example worst case, masking diagnostics
//! study/                     config.rs: presets and the grid; plan.rs: cells and cache keys;
//!                            stages.rs: train FP, PTQ, QAT as the runner and the CLI both
//!                            run them; run.rs: the runner (cache, resume, shards); shard.rs and
//!                            slurm.rs: which shard and how long (flags or a Slurm job);
//!                            results.rs; verdict.rs + findings.rs: F1-F6 as verdicts;
//!                            golden.rs: pinned sets
//! report/                    report.md tables, SVG plots, adversarial-example grids
//! ```
//!
//! The command-line interface (`src/main.rs`, `src/cli/`: the arguments in args.rs, one
//! file per group of subcommands) parses arguments into these types and calls them: `train`,
//! `ptq` and `qat` run the stages of `study::stages`, `eval` and `attack` the evaluation of
//! `eval::robust`, `reproduce` the runner. Argument parsing, progress bars and the log
//! subscriber belong to the program (feature `cli`, on by default): the library reports
//! progress through traits (`train::Progress`, `study::run::RunProgress`) and needs none of
//! them (`default-features = false`).
//! `vendor/candle-core` is candle 0.11.1 with one change to its backward pass
//! (vendor/README.md).

pub mod attack;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod io;
pub mod kernels;
pub mod manifest;
pub mod model;
pub mod quant;
pub mod report;
pub mod rng;
pub mod study;
pub mod train;

pub use error::{Error, Result};

//! binllm-train: the libtorch engine (through `tch`). It owns the LLaMA-family model on
//! CPU and CUDA, the binarized linear layers and their weight forms, generation with a KV
//! cache, and the conversion itself (`docs/METHOD.md`): Stage 1, Stage 2, baselines,
//! distillation, data and checkpoints.
//!
//! | module | holds |
//! |---|---|
//! | [`model`] | the decoder on libtorch, top to bottom |
//! | [`linear`] | the block linear and its weight forms: `F(x, t)` ([`linear::progressive_sign`]), Stage 1's binarized form, the sign form, the baselines' |
//! | [`convert`] | a conversion run, start to finish |
//! | [`config`], [`plan`] | its settings and presets; how the budget maps onto steps and phases |
//! | [`trainer`] | the training loop: Stage 1, Stage 2, the metrics log, checkpoints in the background |
//! | [`method`], [`schedule`], [`loss`], [`optim`] | what each method trains, `t` and learning-rate schedules, losses, AdamW |
//! | [`data`], [`chat_data`], [`teacher`] | training text, teacher chat data, teacher samples |
//! | [`summary`], [`plot`], [`chat_score`] | what a finished run reports |
//! | [`sign_model`], [`checkpoint`], [`scorer`], [`generate`] | the packed sign model, checkpoints, the eval scorer, generation |
//! | [`parallel`] | data parallelism over several GPUs: the collective (NCCL), data shards, gradient buckets |
//! | [`device`], [`shim`], [`progress`] | CUDA and libtorch plumbing, progress bars |

pub mod device;
pub mod generate;
pub mod linear;
pub mod model;
pub mod shim;

pub use device::{load_cuda_backend, parse_device};
pub use linear::{BlockLinear, WeightForm};
pub use model::{KvCache, Llama};
pub mod chat_data;
pub mod chat_score;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod data;
pub mod loss;
pub mod method;
pub mod optim;
pub mod parallel;
pub mod plan;
pub mod plot;
pub mod profile;
pub mod schedule;
pub mod scorer;
pub mod sign_model;
pub mod summary;
pub mod teacher;
pub mod trainer;

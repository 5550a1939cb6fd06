//! binllm-train: the libtorch engine (through `tch`). It owns the LLaMA-family model on
//! CPU and CUDA, the binarized linear layers and their weight forms, generation with a KV
//! cache, and (in later modules) the conversion itself: Stage 1, Stage 2, baselines,
//! distillation, data and checkpoints.

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
pub mod plan;
pub mod plot;
pub mod profile;
pub mod schedule;
pub mod scorer;
pub mod sign_model;
pub mod summary;
pub mod teacher;
pub mod trainer;

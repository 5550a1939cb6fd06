//! The packed 1-bit model (`docs/FORMAT.md`): a safetensors file that standard tools can
//! open, holding per block linear the sign bits, one scale per output row and an optional
//! input-scale vector; everything else (embeddings, norms, head, biases) dense, the head
//! optionally q8_0 or q4_0; and the config, tokenizer, chat template and provenance in the
//! metadata.
//!
//! One container serves two stages: `binllm convert` writes the *sign model* (f32 scales,
//! Stage-1 input scales kept separate, exactly the trained function) and `binllm export`
//! rewrites it for deployment (f16 scales, input scales folded where exact).
//!
//! - [`container`]: the file as a whole, [`PackedModel`]: metadata, versions, checks, reading
//!   and writing (the packed writer is [`PackedModel::write_with_quantized`]).
//! - [`blocks`]: how each block is stored: sign bits in the kernels' layout, q8_0 / q4_0
//!   dense matrices as payload plus f16 scales.
//! - [`mod@export`]: folding the input scales and choosing the head's format.

pub mod blocks;
pub mod container;
pub mod export;

/// Sniffing a path lives with the other formats' in [`crate::detect`].
pub use crate::detect::is_packed_file;
pub use binllm_kernels::{BlockScales, Q4Matrix, Q8Matrix};
pub use blocks::{
    pack_signs, q4_bits_per_weight, q8_bits_per_weight, unpack_signs, words_per_row, PackedLinear,
    QuantTensor, QuantTensors, Q4_BLOCK, Q4_BLOCK_BYTES, Q4_SCALE_SUFFIX, Q4_STORED_AS, Q4_SUFFIX,
    Q8_BLOCK, Q8_SCALE_SUFFIX, Q8_STORED_AS, Q8_SUFFIX,
};
pub use container::{
    BitsPerWeight, PackedModel, Precision, Provenance, FORMAT_NAME, FORMAT_VERSION,
    FORMAT_VERSION_WITHOUT_Q4, READABLE_VERSIONS,
};
pub use export::{export, fold_input_scales, ExportOptions, Exported, FoldReport, HeadFormat};

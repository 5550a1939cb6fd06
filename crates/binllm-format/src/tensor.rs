//! Host-side tensors as the readers produce them.

use std::collections::BTreeMap;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
}

/// Element storage. Floating-point sources keep their own precision; quantised GGUF
/// types are dequantised to f32 exactly as ggml does.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A dense tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
    /// The type the tensor had in its file ("F32", "BF16", "Q4_1", ...), for `inspect`.
    pub stored_as: String,
}

/// Tensors by canonical (Hugging Face) name, in a stable order.
pub type TensorMap = BTreeMap<String, HostTensor>;

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        HostTensor {
            shape,
            data: TensorData::F32(values),
            stored_as: "F32".into(),
        }
    }

    /// The index and value of the first NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        match &self.data {
            TensorData::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
            TensorData::F16(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, v[i].to_f32())),
            TensorData::BF16(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, v[i].to_f32())),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Raw little-endian bytes of the elements (for handing to another engine).
    pub fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: f32/f16/bf16 are plain old data with no padding.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
        }
        match &self.data {
            TensorData::F32(v) => bytes(v),
            TensorData::F16(v) => bytes(v),
            TensorData::BF16(v) => bytes(v),
        }
    }
}

/// Reorders the rows of a q or k projection (or its bias: `cols == 1`) from Meta's
/// interleaved RoPE pairs (2i, 2i+1) to the rotate-half pairs (i, i + head_dim/2) of the
/// Hugging Face layout: transformers' `permute` undone, as its GGUF loader's
/// `reverse_permute_weights` does. llama2.c checkpoints and llama.cpp's GGUF conversions
/// both store q/k in the interleaved order.
pub(crate) fn interleaved_to_rotate_half<T: Copy>(
    w: &[T],
    heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<T> {
    debug_assert_eq!(w.len(), heads * head_dim * cols);
    let half = head_dim / 2;
    let mut out = w.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for (j, new_row) in [(0, i), (1, half + i)] {
                let old_row = h * head_dim + 2 * i + j;
                let new_row = h * head_dim + new_row;
                out[new_row * cols..(new_row + 1) * cols]
                    .copy_from_slice(&w[old_row * cols..(old_row + 1) * cols]);
            }
        }
    }
    out
}

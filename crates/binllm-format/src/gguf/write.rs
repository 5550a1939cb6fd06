//! Writing a GGUF v3 file ([`GgufWriter`]): the counterpart of [`super::file`]'s reader.
//!
//! Layout (little-endian): magic `GGUF`, version 3, tensor count (u64), metadata count (u64);
//! the metadata entries (key string, value type u32, value); the tensor infos (name, dimension
//! count u32, dimensions u64 innermost first, ggml type id u32, data offset u64 relative to the
//! data section); padding to the alignment; the tensor data, each tensor starting at a multiple
//! of the alignment (32, ggml's default, so `general.alignment` is not written).

use std::path::Path;

use anyhow::{ensure, Context, Result};

use super::dequant::GgmlType;
use super::file::{MetaArray, MetaValue};

const ALIGNMENT: usize = 32;
pub const GGUF_VERSION: u32 = 3;

struct PendingTensor {
    name: String,
    /// ggml order: `dims[0]` is the contiguous dimension.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    bytes: Vec<u8>,
}

/// A GGUF file being assembled in memory: metadata in insertion order, then tensors.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one metadata entry.
    pub fn set(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    pub fn set_str(&mut self, key: &str, value: &str) {
        self.set(key, MetaValue::String(value.to_string()));
    }

    pub fn set_u32(&mut self, key: &str, value: u32) {
        self.set(key, MetaValue::U32(value));
    }

    pub fn set_f32(&mut self, key: &str, value: f32) {
        self.set(key, MetaValue::F32(value));
    }

    /// Adds a tensor of row-major `shape` (`[rows, cols]` for a matrix), stored as `ggml_type`
    /// in `bytes`; the byte count is checked against the type's block geometry.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let row = shape.last().copied().unwrap_or(1);
        ensure!(
            row.is_multiple_of(ggml_type.block_size),
            "tensor '{name}': rows of {row} elements are not a whole number of {ggml_type} blocks \
             of {}",
            ggml_type.block_size
        );
        let expected = ggml_type.byte_size(numel);
        ensure!(
            expected == Some(bytes.len() as u64),
            "tensor '{name}': {shape:?} of {ggml_type} needs {expected:?} bytes, got {}",
            bytes.len()
        );
        ensure!(
            self.tensors.iter().all(|t| t.name != name),
            "tensor '{name}' added twice"
        );
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type,
            bytes,
        });
        Ok(())
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend_from_slice(&value_type(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.bytes.len()).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    /// Writes the file atomically (a temporary beside it, then a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::atomic::write_atomically(path, &self.to_bytes())
            .with_context(|| format!("{}: cannot write the GGUF file", path.display()))
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids (`gguf_type`).
fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn array_element_type(a: &MetaArray) -> u32 {
    match a {
        MetaArray::U8(_) => 0,
        MetaArray::I8(_) => 1,
        MetaArray::U16(_) => 2,
        MetaArray::I16(_) => 3,
        MetaArray::U32(_) => 4,
        MetaArray::I32(_) => 5,
        MetaArray::F32(_) => 6,
        MetaArray::Bool(_) => 7,
        MetaArray::String(_) => 8,
        MetaArray::Array(_) => 9,
        MetaArray::U64(_) => 10,
        MetaArray::I64(_) => 11,
        MetaArray::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&array_element_type(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn all<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], bytes: impl Fn(T) -> [u8; N]) {
        v.iter().for_each(|&x| out.extend_from_slice(&bytes(x)));
    }
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => all(out, v, |x: i8| [x as u8]),
        MetaArray::U16(v) => all(out, v, u16::to_le_bytes),
        MetaArray::I16(v) => all(out, v, i16::to_le_bytes),
        MetaArray::U32(v) => all(out, v, u32::to_le_bytes),
        MetaArray::I32(v) => all(out, v, i32::to_le_bytes),
        MetaArray::U64(v) => all(out, v, u64::to_le_bytes),
        MetaArray::I64(v) => all(out, v, i64::to_le_bytes),
        MetaArray::F32(v) => all(out, v, f32::to_le_bytes),
        MetaArray::F64(v) => all(out, v, f64::to_le_bytes),
        MetaArray::Bool(v) => all(out, v, |x: bool| [u8::from(x)]),
        MetaArray::String(v) => v.iter().for_each(|s| put_string(out, s)),
        MetaArray::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}

//! Reading a GGUF file: the header, the metadata (typed values, nested arrays), the tensor
//! infos and where each tensor's data lies ([`GgufFile`]).
//!
//! The file is memory-mapped and never trusted: every count, length and offset is checked
//! against the bytes that are actually there before anything is allocated or sliced, so a
//! damaged file gives an error naming the file and the problem, not a panic.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::dequant::{self, GgmlType};
use crate::tensor::HostTensor;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Nested metadata arrays are legal but never deep in practice; the limit keeps a hostile
/// file from recursing the parser off the stack.
const MAX_ARRAY_NESTING: usize = 8;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

/// A metadata array, stored by element type so that vocabularies of 100k entries stay
/// compact (and so their memory is bounded by the file's size).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// Any integer value that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A one-line rendering for `inspect`: scalars in full, strings and arrays shortened.
    pub fn summary(&self) -> String {
        match self {
            MetaValue::U8(v) => v.to_string(),
            MetaValue::I8(v) => v.to_string(),
            MetaValue::U16(v) => v.to_string(),
            MetaValue::I16(v) => v.to_string(),
            MetaValue::U32(v) => v.to_string(),
            MetaValue::I32(v) => v.to_string(),
            MetaValue::U64(v) => v.to_string(),
            MetaValue::I64(v) => v.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            MetaValue::Bool(v) => v.to_string(),
            MetaValue::String(s) if s.chars().count() > 60 => {
                format!(
                    "{:?}… ({} bytes)",
                    s.chars().take(60).collect::<String>(),
                    s.len()
                )
            }
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) => format!("[{} × {}]", a.len(), a.element_type_name()),
        }
    }
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn element_type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F32(_) => "f32",
            MetaArray::F64(_) => "f64",
            MetaArray::Bool(_) => "bool",
            MetaArray::String(_) => "string",
            MetaArray::Array(_) => "array",
        }
    }

    /// Integer elements widened to i64 (for per-layer counts and token types).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            MetaArray::U8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I64(v) => v.clone(),
            MetaArray::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }
}

/// One tensor's entry in the file's tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape (ggml's dims reversed): `[out, in]` for a linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, memory-mapped GGUF file. Tensor data is read on demand.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`; errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open GGUF file", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        if len == 0 {
            bail!(
                "{}: not a valid GGUF file: the file is empty",
                path.display()
            );
        }
        // SAFETY: the map is read-only; like every reader of model files we assume nobody
        // truncates the file while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let header = parse_header(&mmap)
            .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor. Infos from this file were bounds-checked when it was
    /// opened; the check here guards against an info that came from elsewhere.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.mmap.len() as u64 => {
                Ok(&self.mmap[start as usize..end as usize])
            }
            _ => bail!(
                "{}: tensor '{}' lies outside the file",
                self.path.display(),
                info.name
            ),
        }
    }

    /// A tensor decoded to host memory in ggml's own layout (row-major shape = dims
    /// reversed), without renaming or permuting.
    pub fn read_tensor(&self, info: &TensorInfo) -> Result<HostTensor> {
        if !info.ggml_type.is_supported() {
            bail!(
                "{}: tensor '{}' has type {}, which binllm cannot dequantize (supported: {})",
                self.path.display(),
                info.name,
                info.ggml_type,
                dequant::SUPPORTED.join(", ")
            );
        }
        let data = dequant::dequantize(
            info.ggml_type,
            self.tensor_bytes(info)?,
            info.numel() as usize,
        )
        .with_context(|| format!("{}: tensor '{}'", self.path.display(), info.name))?;
        Ok(HostTensor {
            shape: info.shape(),
            data,
            stored_as: info.ggml_type.name.to_string(),
        })
    }

    /// How many tensors of each type, most common first ("210 Q4_1 / 61 F32 / 1 Q8_0").
    pub fn type_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(t.ggml_type.name).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts
    }
}

struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian cursor over the file.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            bail!(
                "truncated: {what} needs {n} bytes at offset {}, but the file ends at {}",
                self.pos,
                self.bytes.len()
            );
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what} is not valid UTF-8"))
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit in what is left,
    /// so that no count read from the file can make us allocate more than the file holds.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize> {
        let fits = self.remaining() as u64 / min_size;
        if count > fits {
            bail!(
                "{what}: the file claims {count}, but the {} bytes left can hold at most {fits} \
                 (the file is truncated or corrupt)",
                self.remaining()
            );
        }
        Ok(count as usize)
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<MetaValue> {
        Ok(match value_type {
            0 => MetaValue::U8(self.array::<1>("u8 value")?[0]),
            1 => MetaValue::I8(self.array::<1>("i8 value")?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array("u32 value")?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => MetaValue::Bool(self.array::<1>("bool value")?[0] != 0),
            8 => MetaValue::String(self.string("string value")?),
            9 => MetaValue::Array(self.meta_array(depth)?),
            10 => MetaValue::U64(u64::from_le_bytes(self.array("u64 value")?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }

    fn meta_array(&mut self, depth: usize) -> Result<MetaArray> {
        if depth >= MAX_ARRAY_NESTING {
            bail!("metadata arrays nested more than {MAX_ARRAY_NESTING} deep");
        }
        let element_type = self.u32("array element type")?;
        let count = self.u64("array length")?;
        // Smallest encoding of one element: strings carry an 8-byte length, arrays a 4-byte
        // type and an 8-byte length.
        let min_size = match element_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => bail!("unknown metadata array element type {other}"),
        };
        let n = self.check_count(count, min_size, "array length")?;
        fn fixed<const N: usize, T>(
            cur: &mut Cursor,
            n: usize,
            decode: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>> {
            let bytes = cur.take((n * N) as u64, "array elements")?;
            Ok(bytes
                .chunks_exact(N)
                .map(|c| decode(c.try_into().expect("N bytes")))
                .collect())
        }
        Ok(match element_type {
            0 => MetaArray::U8(fixed(self, n, |b: [u8; 1]| b[0])?),
            1 => MetaArray::I8(fixed(self, n, |b: [u8; 1]| b[0] as i8)?),
            2 => MetaArray::U16(fixed(self, n, u16::from_le_bytes)?),
            3 => MetaArray::I16(fixed(self, n, i16::from_le_bytes)?),
            4 => MetaArray::U32(fixed(self, n, u32::from_le_bytes)?),
            5 => MetaArray::I32(fixed(self, n, i32::from_le_bytes)?),
            6 => MetaArray::F32(fixed(self, n, f32::from_le_bytes)?),
            7 => MetaArray::Bool(fixed(self, n, |b: [u8; 1]| b[0] != 0)?),
            10 => MetaArray::U64(fixed(self, n, u64::from_le_bytes)?),
            11 => MetaArray::I64(fixed(self, n, i64::from_le_bytes)?),
            12 => MetaArray::F64(fixed(self, n, f64::from_le_bytes)?),
            8 => MetaArray::String(
                (0..n)
                    .map(|i| {
                        self.string("array string")
                            .with_context(|| format!("element {i}"))
                    })
                    .collect::<Result<_>>()?,
            ),
            9 => MetaArray::Array(
                (0..n)
                    .map(|i| {
                        self.meta_array(depth + 1)
                            .with_context(|| format!("element {i}"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => unreachable!("element type checked above"),
        })
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.take(4, "the magic number")?;
    if magic != MAGIC {
        bail!(
            "wrong magic {:02x?} ({:?}): a GGUF file starts with \"GGUF\"",
            magic,
            String::from_utf8_lossy(magic)
        );
    }
    let version = cur.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (versions 2 and 3 are); re-convert the model"),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            bail!("GGUF version {v} looks byte-swapped: big-endian GGUF files are not supported")
        }
        v => bail!("unsupported GGUF version {v} (versions 2 and 3 are supported)"),
    }
    let tensor_count = cur.u64("the tensor count")?;
    let kv_count = cur.u64("the metadata count")?;
    // The smallest metadata entry: 8-byte key length, 4-byte type, 1-byte value; the
    // smallest tensor info: 8-byte name length, 4-byte n_dims, 4-byte type, 8-byte offset.
    cur.check_count(kv_count, 13, "metadata entry count")?;
    cur.check_count(tensor_count, 24, "tensor count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = cur
            .string("metadata key")
            .with_context(|| format!("metadata entry {i}"))?;
        let value_type = cur
            .u32("metadata value type")
            .with_context(|| format!("metadata entry {i} ('{key}')"))?;
        let value = cur
            .value(value_type, 0)
            .with_context(|| format!("metadata entry {i} ('{key}')"))?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("metadata key '{key}' appears twice");
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => bail!(
            "general.alignment must be a power-of-two u32, got {} {}",
            other.type_name(),
            other.summary()
        ),
    };

    cur.check_count(tensor_count, 24, "tensor count")?;
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut seen = HashSet::new();
    for i in 0..tensor_count {
        let info = tensor_info(&mut cur).with_context(|| format!("tensor info {i}"))?;
        if !seen.insert(info.name.clone()) {
            bail!("tensor '{}' appears twice", info.name);
        }
        tensors.push(info);
    }

    let data_offset = (cur.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    // ggml writes the tensors back to back in the order of their infos, each padded to the
    // alignment, and llama.cpp refuses any other layout. Checking it catches what no bound
    // can: a tensor type or shape changed to one of another byte size.
    let mut expected_offset = 0u64;
    for (index, t) in tensors.iter().enumerate() {
        if t.offset != expected_offset {
            bail!(
                "tensor '{}' (index {index}, {} {:?}) starts at data offset {}, but the tensors \
                 before it end at {expected_offset}: its type or shape does not match the bytes \
                 stored",
                t.name,
                t.ggml_type,
                t.dims,
                t.offset
            );
        }
        expected_offset = t
            .n_bytes
            .checked_next_multiple_of(alignment)
            .and_then(|padded| expected_offset.checked_add(padded))
            .with_context(|| format!("tensor '{}': data offsets overflow", t.name))?;
    }
    for t in &tensors {
        if t.offset % alignment != 0 {
            bail!(
                "tensor '{}' has data offset {}, which is not a multiple of the alignment {alignment}",
                t.name,
                t.offset
            );
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => bail!(
                "tensor '{}' ({} {:?}, {} bytes at file offset {}) runs past the end of the \
                 file ({file_len} bytes): the file is truncated or corrupt",
                t.name,
                t.ggml_type,
                t.dims,
                t.n_bytes,
                data_offset as u128 + t.offset as u128
            ),
        }
    }
    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

fn tensor_info(cur: &mut Cursor) -> Result<TensorInfo> {
    let name = cur.string("tensor name")?;
    let n_dims = cur
        .u32("tensor dimension count")
        .with_context(|| format!("tensor '{name}'"))?;
    if n_dims > MAX_DIMS {
        bail!("tensor '{name}' has {n_dims} dimensions; ggml allows at most {MAX_DIMS}");
    }
    let dims = (0..n_dims)
        .map(|_| cur.u64("tensor dimension"))
        .collect::<Result<Vec<u64>>>()
        .with_context(|| format!("tensor '{name}'"))?;
    let numel = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| anyhow!("tensor '{name}' has absurd dimensions {dims:?}"))?;
    let type_id = cur
        .u32("tensor type")
        .with_context(|| format!("tensor '{name}'"))?;
    let ggml_type = GgmlType::from_id(type_id)
        .ok_or_else(|| anyhow!("tensor '{name}' has unknown ggml type id {type_id}"))?;
    let offset = cur
        .u64("tensor data offset")
        .with_context(|| format!("tensor '{name}'"))?;
    let row = dims.first().copied().unwrap_or(1);
    if row % ggml_type.block_size as u64 != 0 {
        bail!(
            "tensor '{name}' has rows of {row} elements, not a multiple of the {ggml_type} block size {}",
            ggml_type.block_size
        );
    }
    let n_bytes = ggml_type
        .byte_size(numel)
        .ok_or_else(|| anyhow!("tensor '{name}' is too large ({dims:?} of {ggml_type})"))?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_bytes,
    })
}

/// llama.cpp's `llama_ftype` names, for `general.file_type`.
pub(super) fn file_type_name(id: u64) -> Option<&'static str> {
    Some(match id {
        0 => "ALL_F32",
        1 => "MOSTLY_F16",
        2 => "MOSTLY_Q4_0",
        3 => "MOSTLY_Q4_1",
        7 => "MOSTLY_Q8_0",
        8 => "MOSTLY_Q5_0",
        9 => "MOSTLY_Q5_1",
        10 => "MOSTLY_Q2_K",
        11 => "MOSTLY_Q3_K_S",
        12 => "MOSTLY_Q3_K_M",
        13 => "MOSTLY_Q3_K_L",
        14 => "MOSTLY_Q4_K_S",
        15 => "MOSTLY_Q4_K_M",
        16 => "MOSTLY_Q5_K_S",
        17 => "MOSTLY_Q5_K_M",
        18 => "MOSTLY_Q6_K",
        19 => "MOSTLY_IQ2_XXS",
        20 => "MOSTLY_IQ2_XS",
        21 => "MOSTLY_Q2_K_S",
        22 => "MOSTLY_IQ3_XS",
        23 => "MOSTLY_IQ3_XXS",
        24 => "MOSTLY_IQ1_S",
        25 => "MOSTLY_IQ4_NL",
        26 => "MOSTLY_IQ3_S",
        27 => "MOSTLY_IQ3_M",
        28 => "MOSTLY_IQ2_S",
        29 => "MOSTLY_IQ2_M",
        30 => "MOSTLY_IQ4_XS",
        31 => "MOSTLY_IQ1_M",
        32 => "MOSTLY_BF16",
        36 => "MOSTLY_TQ1_0",
        37 => "MOSTLY_TQ2_0",
        38 => "MOSTLY_MXFP4_MOE",
        39 => "MOSTLY_NVFP4",
        40 => "MOSTLY_Q1_0",
        41 => "MOSTLY_Q2_0",
        1024 => "GUESSED",
        _ => return None,
    })
}

//! A minimal GGUF v3 reader and writer, enough to generate test models for llama.cpp and to copy
//! metadata (such as a real tokenizer) out of existing GGUF files.
//!
//! Hand-written on purpose: the crates that can write GGUF come bundled with a whole ML framework,
//! and the format is small (a header, typed key/value metadata, tensor descriptors, then aligned
//! tensor data). The writer streams tensor data straight to its output, so a multi-gigabyte model
//! never has to sit in memory.
//!
//! Format reference: the GGUF section of the ggml documentation (`docs/gguf.md`); all integers
//! are little-endian.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, bail, ensure};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// Key that sets the data alignment; llama.cpp reads it as a `u32` and defaults to 32.
pub const ALIGNMENT_KEY: &str = "general.alignment";
const DEFAULT_ALIGNMENT: u32 = 32;
/// llama.cpp's `GGML_MAX_DIMS`: tensors have at most four dimensions.
const MAX_DIMS: usize = 4;

/// The type tag of a metadata value, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn code(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    fn from_code(code: u32) -> anyhow::Result<Self> {
        Ok(match code {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => bail!("unknown GGUF value type {code}"),
        })
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous array; the element type is explicit so that empty arrays keep their type.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    elem: ValueType,
    items: Vec<Value>,
}

impl Array {
    /// Fails when an item is not of type `elem`.
    pub fn new(elem: ValueType, items: Vec<Value>) -> anyhow::Result<Self> {
        if let Some(bad) = items.iter().find(|v| v.value_type() != elem) {
            bail!("array of {elem:?} holds a {:?}", bad.value_type());
        }
        Ok(Self { elem, items })
    }

    pub fn items(&self) -> &[Value] {
        &self.items
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(_) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    pub fn str(s: impl Into<String>) -> Self {
        Self::String(s.into())
    }

    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        let items = items.into_iter().map(|s| Self::String(s.into())).collect();
        Self::Array(Array {
            elem: ValueType::String,
            items,
        })
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        let items = items.into_iter().map(Self::I32).collect();
        Self::Array(Array {
            elem: ValueType::I32,
            items,
        })
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Self {
        let items = items.into_iter().map(Self::F32).collect();
        Self::Array(Array {
            elem: ValueType::F32,
            items,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    fn write_payload(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Self::U8(v) => w.write_all(&v.to_le_bytes()),
            Self::I8(v) => w.write_all(&v.to_le_bytes()),
            Self::U16(v) => w.write_all(&v.to_le_bytes()),
            Self::I16(v) => w.write_all(&v.to_le_bytes()),
            Self::U32(v) => w.write_all(&v.to_le_bytes()),
            Self::I32(v) => w.write_all(&v.to_le_bytes()),
            Self::F32(v) => w.write_all(&v.to_le_bytes()),
            Self::Bool(v) => w.write_all(&[u8::from(*v)]),
            Self::String(s) => write_string(w, s),
            Self::Array(a) => {
                w.write_all(&a.elem.code().to_le_bytes())?;
                w.write_all(&(a.items.len() as u64).to_le_bytes())?;
                a.items.iter().try_for_each(|item| item.write_payload(w))
            }
            Self::U64(v) => w.write_all(&v.to_le_bytes()),
            Self::I64(v) => w.write_all(&v.to_le_bytes()),
            Self::F64(v) => w.write_all(&v.to_le_bytes()),
        }
    }
}

/// A ggml tensor element type, by its numeric id in `ggml.h`. Kept open (not an enum) because the
/// reader must describe files that llama.cpp's quantizer wrote, whatever types they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q8_0: Self = Self(8);

    /// Bytes per element, for the unquantized types this writer can produce.
    pub fn element_size(self) -> Option<u64> {
        match self {
            Self::F32 => Some(4),
            Self::F16 => Some(2),
            _ => None,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::F32 => f.write_str("F32"),
            Self::F16 => f.write_str("F16"),
            Self::Q4_0 => f.write_str("Q4_0"),
            Self::Q8_0 => f.write_str("Q8_0"),
            Self(other) => write!(f, "ggml type {other}"),
        }
    }
}

/// A tensor descriptor. `dims` are in ggml order: `dims[0]` is the row length (the fastest-moving
/// index), so a `[n_embd, n_vocab]` matrix has `n_vocab` rows of `n_embd` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the data in bytes, where the writer knows the type.
    pub fn byte_len(&self) -> Option<u64> {
        Some(self.ty.element_size()? * self.n_elements())
    }
}

fn align_up(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Collects metadata and tensor descriptors, then writes the file in one pass, asking the caller
/// for each tensor's bytes in turn.
#[derive(Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// Starts with `general.alignment` = 32, which llama.cpp also assumes when the key is absent;
    /// writing it makes the files self-describing.
    pub fn new() -> Self {
        Self {
            metadata: vec![(ALIGNMENT_KEY.to_owned(), Value::U32(DEFAULT_ALIGNMENT))],
            tensors: Vec::new(),
        }
    }

    /// Sets a key, replacing an earlier value in place so that key order stays stable.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn alignment(&self) -> anyhow::Result<u64> {
        match self.get(ALIGNMENT_KEY) {
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            other => bail!("{ALIGNMENT_KEY} must be a u32 power of two, not {other:?}"),
        }
    }

    /// Declares a tensor; its data is asked for, in declaration order, by [`Self::write`].
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
    ) -> anyhow::Result<()> {
        let name = name.into();
        ensure!(
            (1..=MAX_DIMS).contains(&dims.len()),
            "tensor {name}: {} dimensions",
            dims.len()
        );
        ensure!(
            ty.element_size().is_some(),
            "tensor {name}: cannot write type {ty:?}"
        );
        ensure!(
            self.tensors.iter().all(|t| t.name != name),
            "tensor {name} declared twice"
        );
        self.tensors.push(TensorInfo {
            name,
            dims: dims.to_vec(),
            ty,
            offset: 0,
        });
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Total bytes of tensor data, without padding.
    pub fn tensor_data_len(&self) -> u64 {
        self.tensors.iter().filter_map(TensorInfo::byte_len).sum()
    }

    /// Writes the whole file. `fill` must write exactly `tensor.byte_len()` bytes for each tensor
    /// (little-endian values, rows of `dims[0]` elements); the writer checks the count and adds
    /// the alignment padding.
    pub fn write<W: Write>(
        mut self,
        out: W,
        mut fill: impl FnMut(&TensorInfo, &mut dyn Write) -> anyhow::Result<()>,
    ) -> anyhow::Result<W> {
        let alignment = self.alignment()?;
        let mut offset = 0;
        for t in &mut self.tensors {
            t.offset = offset;
            offset = align_up(
                offset + t.byte_len().expect("checked in add_tensor"),
                alignment,
            );
        }

        let mut out = CountingWriter {
            inner: out,
            written: 0,
        };
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            write_string(&mut out, key)?;
            out.write_all(&value.value_type().code().to_le_bytes())?;
            value.write_payload(&mut out)?;
        }
        for t in &self.tensors {
            write_string(&mut out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.ty.0.to_le_bytes())?;
            out.write_all(&t.offset.to_le_bytes())?;
        }
        out.pad_to(alignment)?;

        for t in &self.tensors {
            let start = out.written;
            fill(t, &mut out).with_context(|| format!("writing tensor {}", t.name))?;
            let wrote = out.written - start;
            let want = t.byte_len().expect("checked in add_tensor");
            ensure!(
                wrote == want,
                "tensor {}: wrote {wrote} bytes, expected {want}",
                t.name
            );
            out.pad_to(alignment)?;
        }
        out.flush()?;
        Ok(out.inner)
    }
}

/// Counts bytes so that padding and per-tensor sizes can be checked without seeking.
struct CountingWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn pad_to(&mut self, alignment: u64) -> io::Result<()> {
        let pad = align_up(self.written, alignment) - self.written;
        self.write_all(&vec![0; pad as usize])
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The parsed head of a GGUF file: all metadata and tensor descriptors (tensor data is left on
/// disk; `data_offset + tensor.offset` locates it).
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

/// Arrays of arrays are legal GGUF; the cap only keeps a corrupt file from recursing forever.
const MAX_ARRAY_NESTING: usize = 4;

impl GgufFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        Self::read(BufReader::new(file), len).with_context(|| format!("reading {}", path.display()))
    }

    /// Parses from the start of `input`, which holds `len` bytes. Every length field is checked
    /// against what is left, so a corrupt file fails instead of exhausting memory.
    pub fn read(input: impl Read, len: u64) -> anyhow::Result<Self> {
        let mut r = Reader {
            inner: input,
            pos: 0,
            len,
        };
        let mut magic = [0; 4];
        r.bytes(&mut magic)?;
        ensure!(&magic == MAGIC, "not a GGUF file (magic {magic:02x?})");
        let version = r.u32()?;
        // v1 had 32-bit counts; v2 and v3 share this layout.
        ensure!(
            matches!(version, 2 | 3),
            "unsupported GGUF version {version}"
        );
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        r.check_count(n_kv)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = ValueType::from_code(r.u32()?)?;
            let value = r.value(ty, 0).with_context(|| format!("value of {key}"))?;
            metadata.push((key, value));
        }
        r.check_count(n_tensors)?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            ensure!(
                (1..=MAX_DIMS).contains(&n_dims),
                "tensor {name}: {n_dims} dimensions"
            );
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<io::Result<Vec<_>>>()?;
            let ty = GgmlType(r.u32()?);
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => u64::from(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, other)) => bail!("bad {ALIGNMENT_KEY}: {other:?}"),
        };
        Ok(Self {
            version,
            metadata,
            tensors,
            data_offset: align_up(r.pos, alignment),
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's raw bytes (F32/F16 only, whose size is known here).
    pub fn read_tensor_data(
        &self,
        file: &mut (impl Read + Seek),
        name: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let t = self
            .tensor(name)
            .with_context(|| format!("no tensor {name}"))?;
        let len = t
            .byte_len()
            .with_context(|| format!("tensor {name} has type {:?}", t.ty))?;
        file.seek(SeekFrom::Start(self.data_offset + t.offset))?;
        let mut data = vec![0; len as usize];
        file.read_exact(&mut data)?;
        Ok(data)
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut buf = [0; N];
        self.bytes(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> io::Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> io::Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Every counted item takes at least one byte, so a count beyond the bytes left is corrupt.
    fn check_count(&self, count: u64) -> anyhow::Result<()> {
        let left = self.len.saturating_sub(self.pos);
        ensure!(
            count <= left,
            "count {count} exceeds the {left} bytes left in the file"
        );
        Ok(())
    }

    fn string(&mut self) -> anyhow::Result<String> {
        let n = self.u64()?;
        self.check_count(n)?;
        let mut buf = vec![0; n as usize];
        self.bytes(&mut buf)?;
        String::from_utf8(buf).context("string is not UTF-8")
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> anyhow::Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array()?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [b] => bail!("bool byte {b}"),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                ensure!(depth < MAX_ARRAY_NESTING, "arrays nested too deeply");
                let elem = ValueType::from_code(self.u32()?)?;
                let n = self.u64()?;
                self.check_count(n)?;
                let items = (0..n)
                    .map(|_| self.value(elem, depth + 1))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Value::Array(Array { elem, items })
            }
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
        })
    }
}

/// Converts to IEEE 754 half precision, rounding to nearest even, as ggml stores F16 tensors.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        let nan_bit = if man != 0 { 0x200 } else { 0 };
        return sign | 0x7c00 | nan_bit;
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    // Both branches round by the bits shifted out; a carry out of the mantissa correctly bumps
    // the exponent (subnormal to normal, or the largest finite value to infinity).
    let (kept, dropped, shift) = if half_exp > 0 {
        (((half_exp as u32) << 10) | (man >> 13), man & 0x1fff, 13)
    } else {
        let shift = (126 - exp) as u32;
        if shift > 24 {
            return sign;
        }
        let full = man | 0x80_0000;
        (full >> shift, full & ((1 << shift) - 1), shift)
    };
    let halfway = 1 << (shift - 1);
    let round_up = dropped > halfway || (dropped == halfway && kept & 1 == 1);
    sign | (kept + u32::from(round_up)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let man = f32::from(h & 0x3ff);
        sign * match exp {
            0 => man * 2f32.powi(-24),
            0x1f if man == 0.0 => f32::INFINITY,
            0x1f => f32::NAN,
            _ => (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
        }
    }

    fn every_value_type() -> Vec<(String, Value)> {
        let nested = Array::new(
            ValueType::Array,
            vec![Value::i32s([1, -2]), Value::strings(["x"]), Value::f32s([])],
        )
        .unwrap();
        [
            ("u8", Value::U8(200)),
            ("i8", Value::I8(-100)),
            ("u16", Value::U16(60000)),
            ("i16", Value::I16(-30000)),
            ("u32", Value::U32(4_000_000_000)),
            ("i32", Value::I32(-2_000_000_000)),
            ("f32", Value::F32(1e-5)),
            ("bool.t", Value::Bool(true)),
            ("bool.f", Value::Bool(false)),
            ("string", Value::str("héllo ▁wörld 🦙")),
            ("string.empty", Value::str("")),
            ("u64", Value::U64(u64::MAX - 1)),
            ("i64", Value::I64(i64::MIN + 1)),
            ("f64", Value::F64(-1.5e300)),
            ("arr.str", Value::strings(["<s>", "", "▁the"])),
            ("arr.i32", Value::i32s([1, 2, 3, -4])),
            ("arr.f32", Value::f32s([0.0, -1000.0, f32::MIN_POSITIVE])),
            (
                "arr.u8",
                Value::Array(Array::new(ValueType::U8, vec![Value::U8(7)]).unwrap()),
            ),
            (
                "arr.bool",
                Value::Array(Array::new(ValueType::Bool, vec![Value::Bool(true)]).unwrap()),
            ),
            ("arr.empty", Value::strings(Vec::<String>::new())),
            ("arr.nested", Value::Array(nested)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn writer_round_trips_through_reader() {
        let mut w = GgufWriter::new();
        for (k, v) in every_value_type() {
            w.set(k, v);
        }
        w.set("u8", Value::U8(201)); // replaces in place
        w.add_tensor("a", &[3], GgmlType::F32).unwrap();
        w.add_tensor("b", &[5, 3], GgmlType::F16).unwrap();
        w.add_tensor("c", &[2, 1, 1, 2], GgmlType::F32).unwrap();
        assert_eq!(w.tensor_data_len(), 12 + 30 + 16);
        let data = |t: &TensorInfo| -> Vec<u8> {
            (0..t.byte_len().unwrap())
                .map(|i| (i as u8) ^ t.name.as_bytes()[0])
                .collect()
        };
        let bytes = w
            .write(Vec::new(), |t, out| Ok(out.write_all(&data(t))?))
            .unwrap();

        let f = GgufFile::read(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(f.version, 3);
        let mut want = vec![(ALIGNMENT_KEY.to_owned(), Value::U32(32))];
        want.extend(every_value_type());
        want[1].1 = Value::U8(201);
        assert_eq!(f.metadata, want);
        assert_eq!(f.data_offset % 32, 0);
        let names: Vec<_> = f
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.offset))
            .collect();
        assert_eq!(names, [("a", 0), ("b", 32), ("c", 64)]);
        assert_eq!(f.tensor("b").unwrap().dims, [5, 3]);
        assert_eq!(f.tensor("b").unwrap().ty, GgmlType::F16);
        assert_eq!(
            bytes.len() as u64,
            f.data_offset + 96,
            "last tensor is padded too"
        );
        for t in &f.tensors {
            assert_eq!(
                f.read_tensor_data(&mut Cursor::new(&bytes), &t.name)
                    .unwrap(),
                data(t)
            );
        }
    }

    #[test]
    fn writer_checks_tensor_sizes_and_declarations() {
        let mut w = GgufWriter::new();
        w.add_tensor("t", &[4], GgmlType::F32).unwrap();
        assert!(w.add_tensor("t", &[4], GgmlType::F32).is_err());
        assert!(w.add_tensor("q", &[32], GgmlType::Q4_0).is_err());
        assert!(w.add_tensor("d", &[1, 1, 1, 1, 1], GgmlType::F32).is_err());
        let err = w
            .write(Vec::new(), |_, out| Ok(out.write_all(&[0; 15])?))
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("wrote 15 bytes, expected 16"),
            "{err:#}"
        );

        let mut w = GgufWriter::new();
        w.set(ALIGNMENT_KEY, Value::U32(24));
        assert!(w.write(Vec::new(), |_, _| Ok(())).is_err());
    }

    #[test]
    fn reader_honours_custom_alignment_and_rejects_corruption() {
        let mut w = GgufWriter::new();
        w.set(ALIGNMENT_KEY, Value::U32(64));
        w.add_tensor("a", &[1], GgmlType::F32).unwrap();
        w.add_tensor("b", &[1], GgmlType::F32).unwrap();
        let bytes = w
            .write(Vec::new(), |_, out| Ok(out.write_all(&1f32.to_le_bytes())?))
            .unwrap();
        let f = GgufFile::read(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!((f.data_offset % 64, f.tensor("b").unwrap().offset), (0, 64));

        for cut in [3, 10, 30, 60] {
            assert!(
                GgufFile::read(Cursor::new(&bytes[..cut]), cut as u64).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(GgufFile::read(Cursor::new(&bad), bad.len() as u64).is_err());
        // A key length of ~2^63 must fail cleanly, not try to allocate.
        let mut huge = bytes.clone();
        huge[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = GgufFile::read(Cursor::new(&huge), huge.len() as u64).unwrap_err();
        assert!(format!("{err:#}").contains("exceeds"), "{err:#}");
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        for (x, h) in [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.1, 0x2e66),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),
            (1.5 * 2f32.powi(-25), 0x0001),
            (2f32.powi(-14), 0x0400),
            (1.0 + 2f32.powi(-11), 0x3c00),
            (1.0 + 3.0 * 2f32.powi(-11), 0x3c02),
        ] {
            assert_eq!(f32_to_f16(x), h, "{x:e}");
        }
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        for i in 0..20_000 {
            let x = (i as f32 - 10_000.0) * 1.37e-5;
            let back = f16_to_f32(f32_to_f16(x));
            assert!(
                (back - x).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                "{x} -> {back}"
            );
        }
    }
}

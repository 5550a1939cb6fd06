//! NCCL as a [`Collective`], through a minimal hand-written binding of `libnccl.so.2`
//! loaded with `dlopen` at run time: the binary builds and runs everywhere, and only a
//! multi-GPU run needs the library (CUDA builds of torch ship it, in the `nvidia-nccl`
//! wheel: `site-packages/nvidia/nccl/lib`, which `libtorch_cuda.so` itself loads).
//!
//! Operations are queued on the legacy default CUDA stream (the null stream), which is
//! the stream libtorch runs its kernels on unless told otherwise, so they are ordered
//! after the backward pass and before the optimizer without explicit synchronisation.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use super::{check_kind, Collective};

/// Size of `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES` in nccl.h).
pub const UNIQUE_ID_BYTES: usize = 128;
/// Set to a path to load NCCL from there and nowhere else.
pub const LIBRARY_VAR: &str = "BINLLM_NCCL_LIBRARY";
const SONAME: &str = "libnccl.so.2";

/// The id rank 0 creates and every rank passes to `ncclCommInitRank`.
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({}...)", &self.to_hex()[..16])
    }
}

impl UniqueId {
    /// A fresh id from NCCL (rank 0 only; it opens the bootstrap socket the others join).
    pub fn create() -> Result<UniqueId> {
        let lib = Library::get()?;
        let mut raw = RawUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `raw` is a valid, writable ncclUniqueId.
        lib.check(unsafe { (lib.get_unique_id)(&mut raw) }, "ncclGetUniqueId")?;
        Ok(UniqueId(raw.internal.map(|c| c as u8)))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Result<UniqueId> {
        ensure!(
            hex.len() == 2 * UNIQUE_ID_BYTES && hex.is_ascii(),
            "expected {} hex digits, got {} characters",
            2 * UNIQUE_ID_BYTES,
            hex.len()
        );
        let mut bytes = [0u8; UNIQUE_ID_BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .with_context(|| format!("bad hex digits at {}", 2 * i))?;
        }
        Ok(UniqueId(bytes))
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type Stream = *mut c_void;

// ncclDataType_t and ncclRedOp_t values from nccl.h (stable since NCCL 2.0 / 2.10).
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;

type GetUniqueIdFn = unsafe extern "C" fn(*mut RawUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, RawUniqueId, c_int) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(Comm) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type AllReduceFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;

/// The functions of `libnccl.so.2` binllm calls.
struct Library {
    path: String,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    /// ncclBroadcast(send, recv, count, datatype, root, comm, stream): same signature.
    broadcast: AllReduceFn,
    comm_destroy: CommDestroyFn,
    get_error_string: GetErrorStringFn,
}

/// Where to look for NCCL, in order: only `override_path` when given; else the soname
/// (the loader's search path, or the copy `libtorch_cuda.so` already loaded), then each
/// `LD_LIBRARY_PATH` folder and the wheel layout beside it (`torch/lib` ->
/// `nvidia/nccl/lib`).
pub fn candidate_paths(override_path: Option<&str>, ld_library_path: Option<&str>) -> Vec<String> {
    if let Some(path) = override_path.filter(|p| !p.is_empty()) {
        return vec![path.to_string()];
    }
    let mut paths = vec![SONAME.to_string()];
    for dir in ld_library_path
        .unwrap_or("")
        .split(':')
        .filter(|d| !d.is_empty())
    {
        paths.push(format!("{dir}/{SONAME}"));
        paths.push(format!("{dir}/../../nvidia/nccl/lib/{SONAME}"));
    }
    paths
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns null or a valid C string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Library {
    fn get() -> Result<&'static Library> {
        static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
        LIBRARY
            .get_or_init(|| Library::load().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn load() -> Result<Library> {
        crate::device::load_cuda_backend();
        let candidates = candidate_paths(
            std::env::var(LIBRARY_VAR).ok().as_deref(),
            std::env::var("LD_LIBRARY_PATH").ok().as_deref(),
        );
        let mut errors = Vec::new();
        for path in &candidates {
            let c_path = CString::new(path.as_str()).context("library path holds a NUL byte")?;
            // SAFETY: dlopen with a valid C string; the handle is intentionally leaked (the
            // library stays loaded for the life of the process).
            let handle =
                unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                errors.push(dlerror_text());
                continue;
            }
            let symbol = |name: &str| -> Result<*mut c_void> {
                let c_name = CString::new(name).expect("symbol names hold no NUL");
                // SAFETY: a valid handle and C string.
                let f = unsafe { libc::dlsym(handle, c_name.as_ptr()) };
                ensure!(!f.is_null(), "{path}: has no symbol {name} (not NCCL 2?)");
                Ok(f)
            };
            // SAFETY: each symbol is transmuted to the signature nccl.h declares for it.
            return unsafe {
                Ok(Library {
                    path: path.clone(),
                    get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueIdFn>(symbol(
                        "ncclGetUniqueId",
                    )?),
                    comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRankFn>(symbol(
                        "ncclCommInitRank",
                    )?),
                    all_reduce: std::mem::transmute::<*mut c_void, AllReduceFn>(symbol(
                        "ncclAllReduce",
                    )?),
                    broadcast: std::mem::transmute::<*mut c_void, AllReduceFn>(symbol(
                        "ncclBroadcast",
                    )?),
                    comm_destroy: std::mem::transmute::<*mut c_void, CommDestroyFn>(symbol(
                        "ncclCommDestroy",
                    )?),
                    get_error_string: std::mem::transmute::<*mut c_void, GetErrorStringFn>(symbol(
                        "ncclGetErrorString",
                    )?),
                })
            };
        }
        bail!(
            "cannot load NCCL for a multi-GPU run: looked for {SONAME} at {} ({}). CUDA builds of torch ship it in site-packages/nvidia/nccl/lib (the nvidia-nccl wheel): put that folder on LD_LIBRARY_PATH or set {LIBRARY_VAR} to the file",
            candidates.join(", "),
            errors.join("; ")
        )
    }

    fn check(&self, result: c_int, call: &str) -> Result<()> {
        if result == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(result)) };
        bail!(
            "{call} failed ({}): {} [NCCL from {}]",
            result,
            text.to_string_lossy(),
            self.path
        )
    }
}

/// Makes `index` the calling thread's current CUDA device, which is the device
/// `ncclCommInitRank` binds the communicator to. tch does not expose `cudaSetDevice`; the
/// CUDA runtime that libtorch loaded does.
fn set_current_cuda_device(index: usize) -> Result<()> {
    crate::device::load_cuda_backend();
    let mut function = std::ptr::null_mut();
    for name in [c"libcudart.so.13", c"libcudart.so.12"] {
        // SAFETY: RTLD_NOLOAD only returns a library that is already loaded.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if !handle.is_null() {
            // SAFETY: a valid handle and C string.
            function = unsafe { libc::dlsym(handle, c"cudaSetDevice".as_ptr()) };
            if !function.is_null() {
                break;
            }
        }
    }
    ensure!(
        !function.is_null(),
        "cannot find cudaSetDevice: the CUDA runtime (libcudart.so.13) is not loaded"
    );
    // SAFETY: cudaSetDevice(int) -> cudaError_t, as cuda_runtime_api.h declares.
    let set_device: unsafe extern "C" fn(c_int) -> c_int = unsafe { std::mem::transmute(function) };
    // SAFETY: any device index is accepted; a bad one returns an error code.
    let code = unsafe { set_device(index as c_int) };
    ensure!(
        code == 0,
        "cudaSetDevice({index}) failed with CUDA error {code}"
    );
    Ok(())
}

/// One rank of an NCCL communicator, on one CUDA device.
pub struct NcclGroup {
    lib: &'static Library,
    comm: Comm,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl NcclGroup {
    /// Joins the communicator of `id` as `rank` of `world_size` on `device` (made the
    /// thread's current CUDA device). Blocks until every rank has joined.
    pub fn new(id: &UniqueId, rank: usize, world_size: usize, device: Device) -> Result<NcclGroup> {
        ensure!(device.is_cuda(), "NCCL needs a CUDA device, not {device:?}");
        let lib = Library::get()?;
        if let Device::Cuda(index) = device {
            set_current_cuda_device(index)?;
        }
        // Creates the CUDA context on the device before NCCL looks for it.
        let _ = Tensor::zeros([1], (Kind::Float, device)).double_value(&[0]);
        let mut comm: Comm = std::ptr::null_mut();
        let raw = RawUniqueId {
            internal: id.0.map(|b| b as c_char),
        };
        // SAFETY: `comm` is writable; the id is passed by value as nccl.h declares.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world_size as c_int, raw, rank as c_int) },
            &format!("ncclCommInitRank (rank {rank} of {world_size})"),
        )?;
        Ok(NcclGroup {
            lib,
            comm,
            rank,
            world_size,
            device,
        })
    }

    fn buffer(&self, tensor: &Tensor, what: &str) -> Result<(c_int, usize)> {
        check_kind(tensor.kind(), what)?;
        ensure!(
            tensor.device() == self.device,
            "{what}: tensor on {:?}, the communicator on {:?}",
            tensor.device(),
            self.device
        );
        ensure!(
            tensor.is_contiguous(),
            "{what}: the tensor is not contiguous"
        );
        let dtype = match tensor.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Double => NCCL_FLOAT64,
            Kind::BFloat16 => NCCL_BFLOAT16,
            _ => NCCL_FLOAT16,
        };
        Ok((dtype, tensor.numel()))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let (dtype, count) = self.buffer(tensor, "all-reduce")?;
        let ptr = tensor.data_ptr();
        // SAFETY: a contiguous buffer of `count` elements of `dtype` on the comm's device,
        // reduced in place on the null stream.
        let result = unsafe {
            (self.lib.all_reduce)(
                ptr,
                ptr,
                count,
                dtype,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.lib.check(result, "ncclAllReduce")
    }

    fn broadcast_from_root(&self, tensor: &mut Tensor) -> Result<()> {
        let (dtype, count) = self.buffer(tensor, "broadcast")?;
        let ptr = tensor.data_ptr();
        // SAFETY: as for all-reduce; root 0.
        let result = unsafe {
            (self.lib.broadcast)(ptr, ptr, count, dtype, 0, self.comm, std::ptr::null_mut())
        };
        self.lib.check(result, "ncclBroadcast")
    }

    fn barrier(&self) -> Result<()> {
        let mut token = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce_sum(&mut token)?;
        // Reading the value back waits for the all-reduce, hence for every rank.
        let _ = token.double_value(&[0]);
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
        unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_hex_round_trips_and_rejects_bad_text() {
        let mut bytes = [0u8; UNIQUE_ID_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let id = UniqueId(bytes);
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(UniqueId::from_hex(&hex).unwrap(), id);
        assert!(UniqueId::from_hex(&hex[..254]).is_err());
        let mut bad = hex.clone();
        bad.replace_range(10..12, "zz");
        assert!(UniqueId::from_hex(&bad).is_err());
    }

    #[test]
    fn candidates_follow_the_override_then_the_wheel_layout() {
        assert_eq!(
            candidate_paths(Some("/x/libnccl.so.2"), Some("/a")),
            vec!["/x/libnccl.so.2"]
        );
        assert_eq!(
            candidate_paths(None, Some("/site/torch/lib::/b")),
            vec![
                "libnccl.so.2",
                "/site/torch/lib/libnccl.so.2",
                "/site/torch/lib/../../nvidia/nccl/lib/libnccl.so.2",
                "/b/libnccl.so.2",
                "/b/../../nvidia/nccl/lib/libnccl.so.2",
            ]
        );
    }

    #[test]
    fn a_missing_library_is_a_clear_error_naming_the_path() {
        // Library::get caches the first outcome: call load() directly with an override.
        let missing = "/nonexistent/binllm-test/libnccl.so.2";
        std::env::set_var(LIBRARY_VAR, missing);
        let err = Library::load().err().map(|e| format!("{e:#}"));
        std::env::remove_var(LIBRARY_VAR);
        let err = err.expect("loading a missing file must fail");
        assert!(err.contains(missing), "{err}");
        assert!(err.contains("nvidia/nccl/lib"), "{err}");
    }

    /// The binding against a real `libnccl.so.2` (no GPU needed): every symbol resolves and
    /// `ncclGetUniqueId` answers. Run with `BINLLM_NCCL_LIBRARY=/path/libnccl.so.2` and
    /// `--ignored`.
    #[test]
    #[ignore = "needs libnccl.so.2 named by BINLLM_NCCL_LIBRARY"]
    fn the_library_loads_and_makes_unique_ids() {
        let path = std::env::var(LIBRARY_VAR).expect("BINLLM_NCCL_LIBRARY names the library");
        let lib = Library::get().unwrap();
        assert_eq!(lib.path, path);
        let (a, b) = (UniqueId::create().unwrap(), UniqueId::create().unwrap());
        assert_ne!(a, b, "two ids of two bootstrap sockets");
        assert_ne!(a.0, [0u8; UNIQUE_ID_BYTES]);
        // An error code comes back as NCCL's own text.
        let err = lib.check(4, "ncclTest").unwrap_err().to_string();
        assert!(
            err.contains("ncclTest failed (4)") && err.contains(&path),
            "{err}"
        );
    }

    /// Two ranks on two GPUs sum through NCCL (run with `--ignored` on a 2-GPU machine).
    #[test]
    #[ignore = "needs 2 CUDA GPUs and libnccl.so.2"]
    fn two_ranks_sum_through_nccl() {
        crate::device::load_cuda_backend();
        assert!(tch::Cuda::device_count() >= 2, "needs 2 GPUs");
        let id = UniqueId::create().unwrap();
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let id = id.clone();
                    s.spawn(move || {
                        let device = Device::Cuda(rank);
                        tch::Cuda::synchronize(rank as i64);
                        let group = NcclGroup::new(&id, rank, 2, device).unwrap();
                        let mut t =
                            Tensor::from_slice(&[rank as f32 + 1.0, 10.0]).to_device(device);
                        group.all_reduce_sum(&mut t).unwrap();
                        group.barrier().unwrap();
                        Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
    }
}

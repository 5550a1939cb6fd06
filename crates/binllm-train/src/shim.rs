//! Safe wrappers over `csrc/shim.cpp`: bf16 autocast, fused AdamW, gradients to None, and
//! accelerator peak-memory statistics.

use std::ffi::CStr;
use std::os::raw::c_char;

use anyhow::{bail, Result};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn binllm_free_error(msg: *mut c_char);
    fn binllm_set_autocast_bf16() -> *mut c_char;
    fn binllm_autocast_enter() -> bool;
    fn binllm_autocast_exit(was_enabled: bool);
    fn binllm_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn binllm_set_grads_to_none(params: *const *mut C_tensor, n: usize);
    fn binllm_accelerator_peak_bytes(device_index: i32) -> i64;
    fn binllm_accelerator_reset_peak(device_index: i32);
}

fn check(err: *mut c_char, what: &str) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed right after copying.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { binllm_free_error(err) };
    bail!("{what}: {msg}")
}

fn pointers(tensors: &[&Tensor]) -> Vec<*mut C_tensor> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *mut C_tensor)
        .collect()
}

/// Makes autocast use bf16 (tch enables autocast at fp16 only).
pub fn set_autocast_bf16() -> Result<()> {
    check(
        unsafe { binllm_set_autocast_bf16() },
        "setting autocast to bf16",
    )
}

/// Runs `f` under CUDA autocast (bf16 after [`set_autocast_bf16`]).
pub fn with_autocast_bf16<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    /// Leaves the region also when `f` unwinds.
    struct Region(bool);
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: pairs with the enter below; plain libtorch state calls.
            unsafe { binllm_autocast_exit(self.0) }
        }
    }
    // SAFETY: plain libtorch state calls, no pointers.
    let _region = Region(unsafe { binllm_autocast_enter() });
    f()
}

/// State tensors of one parameter for [`fused_adamw`].
pub struct AdamState<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub step: &'a Tensor,
}

/// One fused AdamW update (PyTorch's `_fused_adamw_`) over all `states`.
pub fn fused_adamw(
    states: &[AdamState],
    lr: f64,
    betas: (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    fn collect<'a>(
        states: &'a [AdamState<'a>],
        f: fn(&AdamState<'a>) -> &'a Tensor,
    ) -> Vec<*mut C_tensor> {
        states
            .iter()
            .map(|s| f(s).as_ptr() as *mut C_tensor)
            .collect()
    }
    let (p, g, m, v, s) = (
        collect(states, |s| s.param),
        collect(states, |s| s.grad),
        collect(states, |s| s.exp_avg),
        collect(states, |s| s.exp_avg_sq),
        collect(states, |s| s.step),
    );
    // SAFETY: every pointer is a live tch tensor borrowed for the duration of the call.
    let err = unsafe {
        binllm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            states.len(),
            lr,
            betas.0,
            betas.1,
            weight_decay,
            eps,
        )
    };
    check(err, "fused AdamW step")
}

/// Drops the gradients of `params` (rather than zero-filling them).
pub fn set_grads_to_none(params: &[&Tensor]) {
    let p = pointers(params);
    // SAFETY: live tensors, borrowed for the call.
    unsafe { binllm_set_grads_to_none(p.as_ptr(), p.len()) }
}

/// Peak bytes the CUDA caching allocator handed out since the last reset (None on CPU).
pub fn cuda_peak_bytes(device_index: usize) -> Option<u64> {
    let bytes = unsafe { binllm_accelerator_peak_bytes(device_index as i32) };
    u64::try_from(bytes).ok()
}

pub fn cuda_reset_peak(device_index: usize) {
    unsafe { binllm_accelerator_reset_peak(device_index as i32) }
}

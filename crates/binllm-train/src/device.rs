//! Choosing the device, and making CUDA visible to libtorch.

use anyhow::{bail, Result};
use tch::Device;

/// libtorch decides once, at the first question about CUDA, whether CUDA exists; and our
/// binary does not link `libtorch_cuda.so` (nothing references it). So load it before
/// anything asks. On a machine without it this quietly does nothing.
pub fn load_cuda_backend() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        {
            let name = c"libtorch_cuda.so";
            // SAFETY: dlopen with a valid C string; the handle is intentionally leaked.
            unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        }
    });
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
pub fn parse_device(spec: &str) -> Result<Device> {
    load_cuda_backend();
    let device = match spec {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        s if s.starts_with("cuda:") => match s[5..].parse() {
            Ok(i) => Device::Cuda(i),
            Err(_) => bail!("bad device '{spec}': expected cpu, cuda, cuda:N or auto"),
        },
        _ => bail!("bad device '{spec}': expected cpu, cuda, cuda:N or auto"),
    };
    if let Device::Cuda(i) = device {
        if !tch::Cuda::is_available() {
            bail!("device '{spec}' requested but libtorch sees no CUDA device (is libtorch_cuda.so on LD_LIBRARY_PATH?)");
        }
        if i >= tch::Cuda::device_count() as usize {
            bail!(
                "device '{spec}' requested but only {} CUDA devices exist",
                tch::Cuda::device_count()
            );
        }
    }
    Ok(device)
}

pub fn device_label(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

//! Where tensors live. A GPU is opened with one CUDA stream that every thread shares.
//!
//! candle's `Device::new_cuda` issues each host thread's work on that thread's own default
//! stream (`CU_STREAM_PER_THREAD`) and, with no second stream created, cudarc records no
//! events between them. A tensor made on one thread and used on another (rayon's pool, a
//! library user's worker threads) is then read before it is written, or after its memory went
//! back to the pool: on an H200 that showed up as token ids that were float bits and
//! illegal-address faults. On one explicit stream every thread's work runs in the order it was
//! issued, which is what the code relies on, so the per-use events cudarc would otherwise record
//! are not needed.

use candle_core::{Device, Result};

/// The device a name stands for: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(name: &str) -> crate::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()),
        None => None,
    }
    .ok_or_else(|| {
        crate::error::invalid(format!("device '{name}': expected cpu, cuda or cuda:N"))
    })?;
    cuda(ordinal).map_err(|e| {
        crate::error::invalid(format!(
            "device {name}: {e} (GPUs need a build with the `cuda` feature, on a machine with the \
             CUDA toolkit)"
        ))
    })
}

/// GPU `ordinal`, with one stream shared by every thread (see the module doc).
#[cfg(feature = "cuda")]
pub fn cuda(ordinal: usize) -> Result<Device> {
    let dev = candle_core::CudaDevice::new_with_stream(ordinal)?;
    // SAFETY: every tensor of this device is used on its one stream, so no use needs to wait
    // for another stream (cudarc's event tracking only orders work across streams).
    unsafe { dev.disable_event_tracking() };
    Ok(Device::Cuda(dev))
}

/// GPU `ordinal`: this build has no CUDA backend, so candle's error says so.
#[cfg(not(feature = "cuda"))]
pub fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
}

/// Kept alive over a model call on `device`: candle then uploads each distinct shape-and-stride
/// list that its kernels take once and reuses it, where it would otherwise allocate and copy
/// one for every strided op (a bias add, a mask product), several hundred per decoding step.
/// The lists are few (they depend on the batch and the sequence length alone), so the cache
/// stays small. Small uploads of data made meanwhile are kept too, by content, so the call must
/// upload nothing unbounded (the token ids come in already on the device). `None` on the CPU.
pub fn reuse_small_uploads(device: &Device) -> Option<Box<dyn std::any::Any>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Some(Box::new(d.enable_cuda_graph_htod_cache())),
        _ => None,
    }
}

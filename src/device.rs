//! Device choice: `cpu`, `cuda` or `auto`.
//!
//! With the CUDA build, cudarc opens libcuda at run time and panics when it is missing;
//! that panic is caught here and turned into an error (or, for `auto`, a fall-back to the
//! CPU), so a CUDA binary started on a machine without a GPU says so plainly.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU backend.
    Cpu,
    /// CUDA device 0 (needs the binary built with the `cuda` feature).
    Cuda,
    /// CUDA if this binary has it and a GPU is present, else the CPU.
    #[default]
    Auto,
}

/// Opens the device the user asked for.
pub fn select(choice: DeviceChoice) -> crate::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => open_cuda(),
        DeviceChoice::Auto => match open_cuda() {
            Ok(d) => Ok(d),
            Err(e) => {
                tracing::info!("using the CPU ({e})");
                Ok(Device::Cpu)
            }
        },
    }
}

fn open_cuda() -> crate::Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(crate::Error::Device(
            "this binary was built without CUDA support (build it with scripts/build-cuda.sh)"
                .into(),
        ));
    }
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Device::new_cuda(0));
    std::panic::set_hook(prev);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(crate::Error::Device(format!(
            "cannot open CUDA device 0: {e}"
        ))),
        Err(_) => Err(crate::Error::Device(
            "cannot open CUDA device 0: the CUDA driver library (libcuda.so) could not be loaded"
                .into(),
        )),
    }
}

/// A short name for manifests: `cpu` or `cuda:0`.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Waits for queued work to finish, so that a clock read afterwards measures it.
pub fn synchronize(device: &Device) -> crate::Result<()> {
    Ok(device.synchronize()?)
}

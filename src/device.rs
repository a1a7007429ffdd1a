//! Device choice: `cpu`, `cuda` or `auto`.
//!
//! With the CUDA build, cudarc opens libcuda at run time and panics when it is missing;
//! that panic is caught here and turned into an error (or, for `auto`, a fall-back to the
//! CPU), so a CUDA binary started on a machine without a GPU says so plainly.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorSetting {
    /// glibc's malloc now keeps freed memory in the process.
    Kept,
    /// The user set glibc's malloc variables (or `QR_KEEP_FREED_MEMORY=0`): left as they are.
    LeftToUser,
    /// Not glibc: nothing to do.
    NotGlibc,
}

/// glibc's own malloc settings; when any is set, [`keep_freed_memory`] leaves malloc alone.
pub const GLIBC_MALLOC_VARIABLES: [&str; 4] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Makes glibc's malloc keep freed memory for reuse instead of handing it back to the
/// operating system at once.
///
/// Each operation of a ResNet-20 batch allocates its output afresh (8 MB per activation at
/// batch 128). With glibc's defaults, blocks that size are mapped and unmapped per operation
/// (or the heap is trimmed after them), so every operation pays page faults and the kernel's
/// zeroing of fresh pages: measured on 2 cores, that is ~30% of an evaluation forward pass
/// and ~35% of an attack step. This turns off mmap for large blocks (`M_MMAP_MAX = 0`) and
/// heap trimming (`M_TRIM_THRESHOLD` = 2 GiB), so the process holds on to its peak heap.
///
/// Default on (the CLI, the benchmarks and the heavy tests call it once at start). It leaves
/// glibc alone when `QR_KEEP_FREED_MEMORY=0`, or when any of `MALLOC_MMAP_MAX_`,
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` is set (the user's
/// own malloc settings win). Idempotent.
pub fn keep_freed_memory() -> AllocatorSetting {
    static DONE: std::sync::OnceLock<AllocatorSetting> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        let user = std::env::var("QR_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0")
            || GLIBC_MALLOC_VARIABLES
                .iter()
                .any(|v| std::env::var_os(v).is_some());
        if user {
            return AllocatorSetting::LeftToUser;
        }
        glibc_keep()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_keep() -> AllocatorSetting {
    // SAFETY: mallopt only changes malloc's parameters; it is called once, before the
    // program's heavy allocation starts, and glibc serializes it against other malloc calls.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    };
    if ok {
        tracing::debug!("glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD max)");
        AllocatorSetting::Kept
    } else {
        tracing::warn!("glibc's mallopt refused the settings; allocation stays as it was");
        AllocatorSetting::LeftToUser
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_keep() -> AllocatorSetting {
    AllocatorSetting::NotGlibc
}

/// CPU seconds (user + system, all threads) this process has used so far; `None` where the
/// platform's counter is not read (only Linux/glibc is).
pub fn process_cpu_seconds() -> Option<f64> {
    process_cpu_seconds_impl()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn process_cpu_seconds_impl() -> Option<f64> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given and reports
    // failure by its return value; the value is read only after success.
    let u = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) != 0 {
            return None;
        }
        u.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn process_cpu_seconds_impl() -> Option<f64> {
    None
}

/// CPU seconds spent since `start` (a [`process_cpu_seconds`] reading), 0 where unread.
pub fn cpu_seconds_since(start: Option<f64>) -> f64 {
    match (start, process_cpu_seconds()) {
        (Some(a), Some(b)) => (b - a).max(0.0),
        _ => 0.0,
    }
}

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once a stop was asked for from outside (SIGTERM, after [`stop_on_sigterm`]): long
/// runs then stop at their next safe point (between epochs and stages), resumable.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Makes SIGTERM, what Slurm and most schedulers send before they kill a job, a request to
/// stop at the next safe point instead of an immediate death; a second SIGTERM ends the
/// process at once (exit status 143, as the default action's).
pub fn stop_on_sigterm() {
    stop_on_sigterm_impl();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn on_sigterm(_: libc::c_int) {
    if STOP_REQUESTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe; nothing else runs in the handler.
        unsafe { libc::_exit(143) }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn stop_on_sigterm_impl() {
    let handler: extern "C" fn(libc::c_int) = on_sigterm;
    // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn stop_on_sigterm_impl() {}

// SPDX-License-Identifier: MPL-2.0
//! Device selection: `auto`, `cpu`, `cuda`, `cuda:N`, and the one-time run-time load of
//! libtorch's CUDA library (never linked, so one build runs on CPU-only hosts).

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use std::sync::LazyLock;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "aipipeline-device",
        gst::DebugColorFlags::empty(),
        Some("aipipeline device handling"),
    )
});

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when CUDA is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N; an error at start when CUDA or that device is not there.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "invalid device '{s}': use auto, cpu, cuda or cuda:N (N a device index)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Result of the one-time attempt to load libtorch_cuda.so: `Ok(path)` or why not.
static CUDA_LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static TORCH_THREADS: OnceLock<()> = OnceLock::new();

/// Directory of libtorch_cpu.so: baked in at build time, else found in this process's maps.
fn libtorch_dir() -> Option<PathBuf> {
    if let Some(dir) = option_env!("RIVULET_LIBTORCH_LIB").map(PathBuf::from)
        && dir.join("libtorch_cpu.so").exists()
    {
        return Some(dir);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

fn load_cuda_library() -> Result<PathBuf, String> {
    let dir = libtorch_dir().ok_or("libtorch_cpu.so location unknown")?;
    let path = dir.join("libtorch_cuda.so");
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid NUL-terminated path; the handle is intentionally never closed
    // (libtorch registers its CUDA hooks from static constructors and must stay loaded).
    let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a valid C string owned by libc, copied at once.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_owned()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("dlopen {} failed: {why}", path.display()));
    }
    Ok(path)
}

/// Loads libtorch_cuda.so once per process (before any device query) and sets torch's
/// thread count. Returns whether the CUDA library is loaded, or why not.
pub fn init_runtime() -> &'static Result<PathBuf, String> {
    TORCH_THREADS.get_or_init(|| {
        let n = std::env::var("RIVULET_TORCH_THREADS")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get().min(8) as i32)
                    .unwrap_or(1)
            });
        tch::set_num_threads(n);
        gst::info!(CAT, "torch intra-op threads: {n}");
    });
    CUDA_LIB.get_or_init(|| {
        let r = load_cuda_library();
        match &r {
            Ok(p) => gst::info!(CAT, "loaded {}", p.display()),
            Err(e) => gst::info!(CAT, "CUDA not available, using the CPU: {e}"),
        }
        r
    })
}

/// Whether CUDA can be used in this process (loads the CUDA library first).
pub fn cuda_available() -> bool {
    init_runtime().is_ok() && tch::Cuda::is_available()
}

/// Resolves what the user asked for to a tch device, or a message saying why not.
pub fn resolve(spec: DeviceSpec) -> Result<tch::Device, String> {
    let loaded = init_runtime();
    match spec {
        DeviceSpec::Cpu => Ok(tch::Device::Cpu),
        DeviceSpec::Auto => Ok(if cuda_available() {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        }),
        DeviceSpec::Cuda(n) => {
            if let Err(why) = loaded {
                return Err(format!(
                    "device={spec} requested but CUDA is not available ({why}); \
                     use device=auto or device=cpu, or install libtorch's CUDA libraries"
                ));
            }
            if !tch::Cuda::is_available() {
                return Err(format!(
                    "device={spec} requested but no CUDA GPU is usable; use device=auto or device=cpu"
                ));
            }
            let count = tch::Cuda::device_count();
            if n as i64 >= count {
                return Err(format!(
                    "device={spec} requested but only {count} CUDA device(s) exist"
                ));
            }
            Ok(tch::Device::Cuda(n))
        }
    }
}

/// Human-readable device name for logs and benchmarks.
pub fn describe(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => format!("cpu ({} torch threads)", tch::get_num_threads()),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }
}

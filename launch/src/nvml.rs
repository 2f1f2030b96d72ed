// SPDX-License-Identifier: MPL-2.0
//! GPU facts for `/hardware/info` and `/hardware/stats` from NVML (docs/runner.md, "HTTP API").
//!
//! `libnvidia-ml.so.1` comes with the NVIDIA driver, so it is loaded at run time (never linked):
//! where it is missing (CPU hosts, CI) every query answers an empty map, as the runner does
//! without NVML.

use serde_json::{Map, Value, json};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

type Device = *mut c_void;
type Ret = c_int;

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

type InitFn = unsafe extern "C" fn() -> Ret;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> Ret;
type HandleFn = unsafe extern "C" fn(c_uint, *mut Device) -> Ret;
type TextFn = unsafe extern "C" fn(Device, *mut c_char, c_uint) -> Ret;
type MemoryFn = unsafe extern "C" fn(Device, *mut Memory) -> Ret;
type CapabilityFn = unsafe extern "C" fn(Device, *mut c_int, *mut c_int) -> Ret;
type UtilizationFn = unsafe extern "C" fn(Device, *mut Utilization) -> Ret;

struct Nvml {
    count: CountFn,
    handle: HandleFn,
    name: TextFn,
    uuid: TextFn,
    memory: MemoryFn,
    capability: CapabilityFn,
    utilization: UtilizationFn,
}

// SAFETY: the table holds plain function pointers into a library that stays loaded for the
// life of the process; NVML's functions are thread-safe once initialised.
unsafe impl Send for Nvml {}
unsafe impl Sync for Nvml {}

fn load() -> Option<Nvml> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so the
    // function pointers stay valid; each symbol is transmuted to the signature NVML documents.
    unsafe {
        let lib = libc::dlopen(
            c"libnvidia-ml.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        );
        if lib.is_null() {
            tracing::info!("NVML not available: GPU details are reported empty");
            return None;
        }
        let sym = |name: &CStr| {
            let p = libc::dlsym(lib, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        let init = std::mem::transmute::<*mut c_void, InitFn>(sym(c"nvmlInit_v2")?);
        if init() != 0 {
            tracing::info!("nvmlInit failed: GPU details are reported empty");
            return None;
        }
        Some(Nvml {
            count: std::mem::transmute::<*mut c_void, CountFn>(sym(c"nvmlDeviceGetCount_v2")?),
            handle: std::mem::transmute::<*mut c_void, HandleFn>(sym(
                c"nvmlDeviceGetHandleByIndex_v2",
            )?),
            name: std::mem::transmute::<*mut c_void, TextFn>(sym(c"nvmlDeviceGetName")?),
            uuid: std::mem::transmute::<*mut c_void, TextFn>(sym(c"nvmlDeviceGetUUID")?),
            memory: std::mem::transmute::<*mut c_void, MemoryFn>(sym(c"nvmlDeviceGetMemoryInfo")?),
            capability: std::mem::transmute::<*mut c_void, CapabilityFn>(sym(
                c"nvmlDeviceGetCudaComputeCapability",
            )?),
            utilization: std::mem::transmute::<*mut c_void, UtilizationFn>(sym(
                c"nvmlDeviceGetUtilizationRates",
            )?),
        })
    }
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(load).as_ref()
}

/// Per GPU index: `{id, name, memory_total, memory_free}` plus `major`/`minor` (`info`) or
/// `utilization_compute`/`utilization_memory` (stats). Empty without NVML.
fn gpus(stats: bool) -> Value {
    let mut out = Map::new();
    let Some(n) = nvml() else {
        return Value::Object(out);
    };
    // SAFETY: NVML is initialised; every out-pointer refers to a live local of the documented
    // type and every string buffer's length is passed.
    unsafe {
        let mut count: c_uint = 0;
        if (n.count)(&mut count) != 0 {
            return Value::Object(out);
        }
        for i in 0..count {
            let mut dev: Device = std::ptr::null_mut();
            if (n.handle)(i, &mut dev) != 0 {
                continue;
            }
            let text = |f: TextFn| {
                let mut buf = [0 as c_char; 128];
                if f(dev, buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
                    CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                } else {
                    String::new()
                }
            };
            let mut mem = Memory::default();
            let _ = (n.memory)(dev, &mut mem);
            let mut g = json!({
                "id": text(n.uuid), "name": text(n.name),
                "memory_total": mem.total, "memory_free": mem.free,
            });
            if stats {
                let mut u = Utilization::default();
                let _ = (n.utilization)(dev, &mut u);
                g["utilization_compute"] = u.gpu.into();
                g["utilization_memory"] = u.memory.into();
            } else {
                let (mut major, mut minor) = (0, 0);
                let _ = (n.capability)(dev, &mut major, &mut minor);
                g["major"] = major.into();
                g["minor"] = minor.into();
            }
            out.insert(i.to_string(), g);
        }
    }
    Value::Object(out)
}

/// `gpu_info` of `/hardware/info`.
pub fn gpu_info() -> Value {
    gpus(false)
}

/// `gpu_stats` of `/hardware/stats`.
pub fn gpu_stats() -> Value {
    gpus(true)
}

// SPDX-License-Identifier: MPL-2.0
//! The child side: the child's main loop ([`run`]), loading the pipeline and running frames
//! out of shared memory.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::shm::Shm;
use super::wire::{
    BatchItem, FrameReq, InputLayout, LoadSpec, Recv, Reply, Request, recv_msg, send_msg,
};
use super::{BIN_NAME, CTRL_FD, ENV_INPUT_FD, ENV_PARENT, INPUT_FD, SHM_FD};
use crate::device::{self, DeviceSpec};
use crate::frame::{self, PixelLayout, YuvMatrix};
use crate::model::{self, Runner};
use crate::pipeline::{Params, PipelineDef, Registry, SearchPath};

/// Watchdog period in the child.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(250);

fn say(msg: &str) {
    eprintln!("{BIN_NAME}[{}]: {msg}", std::process::id());
}

struct Loaded {
    def: PipelineDef,
    runner: Runner,
    device: tch::Device,
    /// The model failed a batched forward that it then ran frame by frame: it takes one
    /// frame at a time, and this child no longer stacks frames for it.
    one_at_a_time: std::cell::Cell<bool>,
}

fn load(spec: &LoadSpec) -> Result<(Loaded, Duration), String> {
    let dspec = spec
        .device
        .parse::<DeviceSpec>()
        .map_err(|e| e.to_string())?;
    let device = device::resolve(dspec)?;
    let half = spec.fp16 && device.is_cuda();
    // The parent hands over the search path it resolved (its default when it has none).
    let search = match spec.pipelines_dir.as_deref() {
        Some(list) => SearchPath::parse(list),
        None => SearchPath::from_env(),
    };
    let registry = Registry::scan(&search);
    let def = registry
        .resolve(&spec.pipeline, spec.model.as_ref().map(PathBuf::from))
        .ok_or_else(|| registry.unknown_message(&spec.pipeline))?;
    let params = match &spec.resolved {
        Some(w) => Params::from(w.clone()),
        None => def.parse_params(&spec.params).map_err(|e| {
            format!(
                "Invalid params {} for pipeline '{}': {e}",
                spec.params, def.name
            )
        })?,
    };
    say(&format!(
        "loading pipeline '{}' on {} ({}x{})",
        def.name,
        device::describe(device),
        params.width,
        params.height
    ));
    let t0 = Instant::now();
    let runner = Runner::load(&def, &params, device, half).map_err(|e| e.to_string())?;
    say(&format!(
        "pipeline '{}' loaded in {:?}",
        def.name,
        t0.elapsed()
    ));
    let warm = runner.warmup_time();
    Ok((
        Loaded {
            def,
            runner,
            device,
            one_at_a_time: std::cell::Cell::new(false),
        },
        warm,
    ))
}

fn frame_in_child(
    loaded: &Loaded,
    staging: &mut frame::Staging,
    shm: &mut Shm,
    input_area: &mut Option<Shm>,
    req: &FrameReq,
) -> Result<(), String> {
    if req.shm_size as usize != shm.len {
        shm.map(req.shm_size as usize)
            .map_err(|e| format!("cannot map shared memory: {e}"))?;
    }
    if req.planes.len() > 3 || req.planes.is_empty() {
        return Err("1 to 3 planes expected".into());
    }
    let out_len = req.out_w as usize * req.out_h as usize * 3;
    if let Some(size) = req.input_size {
        // The planes are where upstream wrote them: in the input area (fd 5).
        let area = input_area
            .as_mut()
            .ok_or("the frame names the input area, but this child has none")?;
        let size = usize::try_from(size).map_err(|e| e.to_string())?;
        if size > area.len {
            area.map_read_only(size)
                .map_err(|e| format!("cannot map the input area: {e}"))?;
        }
        let (planes, strides) = planes_in(area, &req.planes, "the input area")?;
        let out_start = req.out_offset as usize;
        let output = shm.region_mut(out_start..out_start.saturating_add(out_len));
        if output.len() != out_len {
            return Err("output slot outside shared memory".into());
        }
        return run_planes(loaded, staging, req, &planes, &strides, output);
    }
    let mem = shm.bytes_mut();
    let out_end = (req.out_offset as usize)
        .checked_add(out_len)
        .filter(|e| *e <= mem.len())
        .ok_or("output slot outside shared memory")?;
    // The output slot and the planes must not overlap: the slots come first (see
    // `shm`), so split after the slot (or before it, for a layout with the output last).
    let out_start = req.out_offset as usize;
    let plane_start = req
        .planes
        .iter()
        .map(|(o, _, _)| *o as usize)
        .min()
        .unwrap_or(0);
    let plane_end = (req.planes.iter())
        .map(|(o, l, _)| o.saturating_add(*l) as usize)
        .max()
        .unwrap_or(0);
    if plane_end > mem.len() {
        return Err("input plane outside shared memory".into());
    }
    let (output, input, base) = if out_end <= plane_start {
        let (head, tail) = mem.split_at_mut(out_end);
        (&mut head[out_start..], &*tail, out_end)
    } else if plane_end <= out_start {
        let (head, tail) = mem.split_at_mut(out_start);
        (&mut tail[..out_end - out_start], &*head, 0)
    } else {
        return Err("input plane overlaps the output slot".into());
    };
    let mut planes: [&[u8]; 3] = [&[]; 3];
    let mut strides = [0usize; 3];
    for (i, (o, l, s)) in req.planes.iter().enumerate() {
        let o = *o as usize - base;
        planes[i] = &input[o..o + *l as usize];
        strides[i] = *s as usize;
    }
    run_planes(loaded, staging, req, &planes, &strides, output)
}

/// The planes a request describes as (offset, length, stride) in `mem` (1 to 3 of them), with
/// their strides; `area` names `mem` in the error for a plane outside it.
fn planes_in<'a>(
    mem: &'a Shm,
    descr: &[(u64, u64, u64)],
    area: &str,
) -> Result<([&'a [u8]; 3], [usize; 3]), String> {
    if descr.is_empty() || descr.len() > 3 {
        return Err("1 to 3 planes expected".into());
    }
    let mut planes: [&[u8]; 3] = [&[]; 3];
    let mut strides = [0usize; 3];
    for (i, (o, l, s)) in descr.iter().enumerate() {
        let (o, l) = (*o as usize, *l as usize);
        planes[i] = mem.region(o..o.saturating_add(l));
        if planes[i].len() != l {
            return Err(format!("input plane outside {area}"));
        }
        strides[i] = *s as usize;
    }
    Ok((planes, strides))
}

/// Converts the frame `req` describes (its planes at hand), runs the pipeline and writes the
/// output into `output`.
fn run_planes(
    loaded: &Loaded,
    staging: &mut frame::Staging,
    req: &FrameReq,
    planes: &[&[u8]; 3],
    strides: &[usize; 3],
    output: &mut [u8],
) -> Result<(), String> {
    let n = req.planes.len().min(3);
    let input = frame::FrameIn {
        planes: &planes[..n],
        strides: &strides[..n],
        width: req.width,
        height: req.height,
        format: in_format(req.layout),
    };
    let out = model::FrameOut {
        data: output,
        stride: req.out_w as usize * 3,
        width: req.out_w,
        height: req.out_h,
        bpp: 3,
    };
    model::run_frame(&loaded.runner, staging, &input, loaded.device, out)
        .map_err(|e| format!("Pipeline '{}' failed on a frame: {e}", loaded.def.name))
}

/// A batch ([`Request::Batch`]): every item's frame converted; items of equal size whose
/// params are equal apart from per-sample inputs ([`PipelineDef::batchable`]) stacked into one
/// (B, H, W, 3) forward, their per-sample inputs stacked in the same order and the other extra
/// inputs shared; each output written into its item's slot. Returns one error per item (None:
/// done) and the number of forwards run.
///
/// A model that takes one frame at a time fails its first stacked forward: those frames are
/// then run one by one (with the unbatched inputs a frame alone gets), and when that works
/// the child stops stacking frames for this model (logged once), so the group keeps every
/// frame rather than failing each batch.
fn batch_in_child(
    loaded: &Loaded,
    stagings: &mut Vec<frame::Staging>,
    shm: &mut Shm,
    items: &[BatchItem],
) -> (Vec<Option<String>>, u32) {
    let mut errors: Vec<Option<String>> = vec![None; items.len()];
    let Runner::Torch(m) = &loaded.runner else {
        // noop: nothing to stack, no forward.
        let staging = stagings.first_mut();
        let mut own = frame::Staging::default();
        let staging = staging.unwrap_or(&mut own);
        for (e, it) in errors.iter_mut().zip(items) {
            *e = frame_in_child(loaded, staging, shm, &mut None, &it.frame).err();
        }
        return (errors, 0);
    };
    if let Some(it) = items.first()
        && it.frame.shm_size as usize != shm.len
        && let Err(e) = shm.map(it.frame.shm_size as usize)
    {
        return (
            vec![Some(format!("cannot map shared memory: {e}")); items.len()],
            0,
        );
    }
    if stagings.len() < items.len() {
        stagings.resize_with(items.len(), Default::default);
    }
    let mut groups: Vec<SubBatch> = Vec::new();
    for (i, (it, staging)) in items.iter().zip(stagings.iter_mut()).enumerate() {
        let f = &it.frame;
        let converted = (|| -> Result<tch::Tensor, String> {
            let (planes, strides) = planes_in(shm, &f.planes, "shared memory")?;
            let n = f.planes.len();
            let input = frame::FrameIn {
                planes: &planes[..n],
                strides: &strides[..n],
                width: f.width,
                height: f.height,
                format: in_format(f.layout),
            };
            input
                .to_frame(staging, f.out_w, f.out_h, loaded.device)
                .map_err(|e| e.to_string())
        })();
        match converted {
            Ok(t) => {
                let p = Params::from(it.params.clone());
                let size = (f.out_w, f.out_h);
                let stack = !loaded.one_at_a_time.get();
                match groups
                    .iter_mut()
                    .find(|g| stack && g.size == size && loaded.def.batchable(&g.params[0], &p))
                {
                    Some(g) => {
                        g.members.push((i, t));
                        g.params.push(p);
                    }
                    None => groups.push(SubBatch {
                        size,
                        members: vec![(i, t)],
                        params: vec![p],
                    }),
                }
            }
            Err(e) => errors[i] = Some(e),
        }
    }
    let mut forwards = 0u32;
    let len_of = |(w, h): (u32, u32)| w as usize * h as usize * 3;
    // Writes sample `k` of `y` into item `i`'s output slot.
    let mut write = |i: usize, y: &tch::Tensor, k: i64, (w, h): (u32, u32)| {
        let off = items[i].frame.out_offset as usize;
        let len = len_of((w, h));
        y.f_narrow(0, k, 1)
            .map_err(|e| e.to_string())
            .and_then(|yi| {
                let out = shm.region_mut(off..off + len);
                if out.len() != len {
                    return Err("output slot outside shared memory".to_string());
                }
                frame::write_frame(&yi, out, w as usize * 3, w, h, 3).map_err(|e| e.to_string())
            })
            .err()
    };
    for SubBatch {
        size,
        members,
        params,
    } in groups
    {
        forwards += 1;
        let stacked = || -> Result<tch::Tensor, String> {
            let samples: Vec<&Params> = params.iter().collect();
            let extra = m.extras_for_batch(&samples)?;
            let frames: Vec<&tch::Tensor> = members.iter().map(|(_, t)| t).collect();
            let x = tch::Tensor::f_cat(&frames, 0).map_err(|e| e.to_string())?;
            m.forward_with(&x, &extra).map_err(|e| e.to_string())
        };
        let batch_error = match stacked() {
            Ok(y) => {
                for (k, (i, _)) in members.iter().enumerate() {
                    errors[*i] = write(*i, &y, k as i64, size);
                }
                continue;
            }
            Err(e) => e,
        };
        if members.len() == 1 {
            let msg = format!(
                "Pipeline '{}' failed on a batch: {batch_error}",
                loaded.def.name
            );
            errors[members[0].0] = Some(msg);
            continue;
        }
        // Frame by frame, as each would run alone.
        let mut all_ok = true;
        forwards += members.len() as u32;
        for (k, (i, t)) in members.iter().enumerate() {
            let alone = m
                .extras_for(&params[k])
                .and_then(|extra| m.forward_with(t, &extra).map_err(|e| e.to_string()));
            errors[*i] = match alone {
                Ok(y) => write(*i, &y, 0, size),
                Err(e) => {
                    all_ok = false;
                    Some(format!(
                        "Pipeline '{}' failed on a frame: {e}",
                        loaded.def.name
                    ))
                }
            };
        }
        if all_ok {
            loaded.one_at_a_time.set(true);
            say(&format!(
                "pipeline '{}' cannot run a batch of {} frames ({batch_error}); its batch group now runs frames one at a time",
                loaded.def.name,
                members.len()
            ));
        }
    }
    (errors, forwards)
}

/// Items that share one forward: their output size, (item index, frame) and params, in
/// sample order.
struct SubBatch {
    size: (u32, u32),
    members: Vec<(usize, tch::Tensor)>,
    params: Vec<Params>,
}

fn in_format(layout: InputLayout) -> frame::InFormat {
    match layout {
        InputLayout::Packed { bpp, first, bgr } => {
            frame::InFormat::Packed(PixelLayout { bpp, first, bgr })
        }
        InputLayout::Yuv420 {
            nv12,
            kr,
            kb,
            full_range,
        } => frame::InFormat::Yuv420 {
            nv12,
            matrix: YuvMatrix { kr, kb, full_range },
        },
    }
}

/// The child's main function: serves requests on fd 3 until `shutdown` or EOF. Returns the
/// exit status.
pub fn run() -> i32 {
    let parent: Option<u32> = std::env::var(ENV_PARENT).ok().and_then(|p| p.parse().ok());
    let Some(parent) = parent else {
        eprintln!(
            "{BIN_NAME} is started by the aipipeline element (isolation=process), not by hand"
        );
        return 2;
    };
    // SAFETY: plain syscalls. PDEATHSIG is also set before exec; setting it again is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() as u32 != parent {
            return 1;
        }
    }
    for fd in [CTRL_FD, SHM_FD] {
        // SAFETY: F_GETFD only queries the fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("{BIN_NAME}: fd {fd} is not open: started without the aipipeline element?");
            return 2;
        }
    }
    let watchdog = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WATCHDOG_PERIOD);
                // SAFETY: getppid has no preconditions.
                if unsafe { libc::getppid() } as u32 != parent {
                    say("parent process gone: exiting");
                    // SAFETY: immediate exit without running destructors (the main thread may
                    // be inside libtorch).
                    unsafe { libc::_exit(1) };
                }
            }
        });
    if let Err(e) = watchdog {
        say(&format!("cannot start the watchdog: {e}"));
        return 1;
    }
    // SAFETY: fds 3 and 4 were set up by the parent for us (checked open above) and nothing
    // else in this process owns them.
    let ctrl = unsafe { OwnedFd::from_raw_fd(CTRL_FD) };
    // SAFETY: as above.
    let mut shm = Shm::from_fd(unsafe { OwnedFd::from_raw_fd(SHM_FD) });
    // The input area, when the parent handed one over (it says so in the environment).
    let mut input_area = match std::env::var(ENV_INPUT_FD) {
        Ok(v) if v == INPUT_FD.to_string() => {
            // SAFETY: F_GETFD only queries the fd.
            if unsafe { libc::fcntl(INPUT_FD, libc::F_GETFD) } < 0 {
                say("the input area (fd 5) is not open: every frame needs a copy");
                None
            } else {
                // SAFETY: the parent set fd 5 up for us (checked open above) and said so; nothing
                // else in this process owns it.
                Some(Shm::from_fd(unsafe { OwnedFd::from_raw_fd(INPUT_FD) }))
            }
        }
        _ => None,
    };
    let _no_grad = tch::no_grad_guard();
    let fd = ctrl.as_raw_fd();
    let mut loaded: Option<Loaded> = None;
    let mut staging = frame::Staging::default();
    let mut stagings: Vec<frame::Staging> = Vec::new();
    loop {
        let req = match recv_msg::<Request>(fd, None) {
            Ok(Recv::Msg(r)) => r,
            Ok(Recv::Eof) => return 0,
            Ok(Recv::Timeout) => continue,
            Err(e) => {
                say(&format!("bad control message: {e}"));
                return 1;
            }
        };
        let started = Instant::now();
        let reply = match req {
            Request::Shutdown => return 0,
            Request::Load(spec) => match load(&spec) {
                Ok((l, warm)) => {
                    let device = device::describe(l.device);
                    loaded = Some(l);
                    Reply::Loaded {
                        warmup_us: warm.as_micros() as u64,
                        device,
                    }
                }
                Err(msg) => {
                    say(&format!("load failed: {msg}"));
                    Reply::LoadFailed { msg }
                }
            },
            Request::Frame(f) => match &loaded {
                None => Reply::FrameError {
                    msg: "no pipeline loaded".into(),
                },
                Some(l) => match frame_in_child(l, &mut staging, &mut shm, &mut input_area, &f) {
                    Ok(()) => Reply::FrameDone {
                        compute_us: started.elapsed().as_micros() as u64,
                    },
                    Err(msg) => Reply::FrameError { msg },
                },
            },
            Request::Batch { items } => match &loaded {
                None => Reply::FrameError {
                    msg: "no pipeline loaded".into(),
                },
                Some(l) => {
                    let (errors, forwards) = batch_in_child(l, &mut stagings, &mut shm, &items);
                    Reply::BatchDone {
                        compute_us: started.elapsed().as_micros() as u64,
                        errors,
                        forwards,
                    }
                }
            },
            Request::Params { params } => match loaded.as_mut() {
                None => Reply::ParamsError {
                    msg: "no pipeline loaded".into(),
                },
                Some(l) => match l.runner.set_params(&Params::from(params)) {
                    Ok(()) => Reply::ParamsDone,
                    Err(msg) => Reply::ParamsError { msg },
                },
            },
        };
        if let Err(e) = send_msg(fd, &reply) {
            say(&format!("cannot reply: {e}"));
            return 1;
        }
    }
}

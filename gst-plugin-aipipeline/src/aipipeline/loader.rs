// SPDX-License-Identifier: MPL-2.0
//! The engines a pipeline runs in (this process or an inference child) and the background
//! loader that builds them for reloads and child restarts, with no lock held.

use std::sync::Arc;
use std::time::Duration;

use super::imp::{CAT, Ctrl, Shared, lock};
use crate::child::{ChildCommand, ChildProc, LoadSpec, Spawner};
use crate::model::Runner;
use crate::pipeline::{Params, PipelineDef};

/// The runner's load limit.
const LOAD_TIMEOUT: Duration = Duration::from_secs(180);

/// Where the pipeline runs: in this process, or in an inference child.
pub(super) enum Engine {
    Local(Runner),
    Child(Box<ChildProc>),
    /// The shared child of a batch group.
    Group(Member),
}

/// An element's place in a batch group: the group, and the child generation (losses) the
/// element is in step with.
pub(super) struct Member {
    pub(super) group: Arc<super::batch::Group>,
    pub(super) seen: u64,
}

/// A finished load: the engine and its warm-up time, or why it failed.
pub(super) type LoadResult = Result<(Engine, Duration), String>;

/// What a child needs to be (re)started and loaded (isolation=process).
pub(super) struct Iso {
    pub(super) spawner: Arc<Spawner>,
    pub(super) cmd: ChildCommand,
    /// Pipeline selection; `params` is filled per load.
    pub(super) spec: LoadSpec,
    pub(super) hang_timeout: Duration,
}

/// Starts a child and loads `json` in it; with `fallback`, a failed load is retried once
/// with `{}` (the runner's initialisation fallback). Returns the child, its warm-up time and
/// the params JSON it runs with.
pub(super) fn start_child(
    iso: &Iso,
    json: &str,
    resolved: Option<&Params>,
    fallback: bool,
    cancelled: &dyn Fn() -> bool,
) -> Result<(ChildProc, Duration, String), String> {
    let attempt =
        |json: &str, resolved: Option<&Params>| -> Result<(ChildProc, Duration), String> {
            let mut c = iso.spawner.spawn(&iso.cmd)?;
            let spec = LoadSpec {
                params: json.to_string(),
                resolved: resolved.map(Into::into),
                ..iso.spec.clone()
            };
            match c.load(&spec, LOAD_TIMEOUT, cancelled) {
                Ok(w) => Ok((c, w)),
                Err(e) => {
                    let fatal = e.is_fatal();
                    let logs = c.kill();
                    let tail = if fatal && !logs.is_empty() {
                        format!(" (last log lines: {})", logs.join(" | "))
                    } else {
                        String::new()
                    };
                    Err(format!("{e}{tail}"))
                }
            }
        };
    match attempt(json, resolved) {
        Ok((c, w)) => Ok((c, w, json.to_string())),
        Err(e) if fallback && !matches!(json.trim(), "" | "{}") && !cancelled() => {
            gst::warning!(CAT, "load with params {json} failed ({e}); trying {{}}");
            match attempt("{}", None) {
                Ok((c, w)) => Ok((c, w, "{}".to_string())),
                Err(e2) => Err(format!(
                    "{e}; the retry with default params {{}} failed too: {e2}"
                )),
            }
        }
        Err(e) => Err(e),
    }
}

/// The background loader: loads the newest requested model with no lock held, hands it over.
pub(super) fn loader(
    shared: Arc<Shared>,
    session: u64,
    def: Arc<PipelineDef>,
    device: tch::Device,
    half: bool,
    iso: Option<Arc<Iso>>,
) {
    loop {
        let (generation, params, json, restart) = {
            let mut ctrl = lock(&shared.ctrl);
            match ctrl.reload_req.take() {
                Some((g, p)) if ctrl.running && ctrl.session == session => {
                    (g, p, ctrl.params_json.clone(), ctrl.reload_restart)
                }
                _ => {
                    if ctrl.session == session {
                        ctrl.loader_running = false;
                    }
                    return;
                }
            }
        };
        if let Some(iso) = &iso {
            // A new child per (re)load: the one in service keeps running until it is replaced.
            let cancelled = || {
                let c = lock(&shared.ctrl);
                !c.running || c.session != session || c.reload_gen != generation
            };
            gst::info!(
                CAT,
                "starting an inference child for '{}' ({}x{})",
                def.name,
                params.width,
                params.height
            );
            let res = start_child(iso, &json, Some(&params), restart, &cancelled);
            let mut ctrl = lock(&shared.ctrl);
            if !ctrl.running || ctrl.session != session {
                return;
            }
            let res = res.map(|(c, warm, used)| {
                if used != json {
                    ctrl.fallback_json = Some(used);
                }
                (Engine::Child(Box::new(c)), warm)
            });
            ctrl.loaded = Some((generation, res));
            continue;
        }
        gst::info!(
            CAT,
            "loading '{}' in the background ({}x{})",
            def.name,
            params.width,
            params.height
        );
        let mut used = None;
        let mut res = Runner::load(&def, &params, device, half).map_err(|e| e.to_string());
        if let Err(e) = &res
            && restart
            && !matches!(json.trim(), "" | "{}")
        {
            // A restart (out of memory) falls back to the default params, as a child does.
            gst::warning!(CAT, "load with params {json} failed ({e}); trying {{}}");
            let retry = def
                .parse_params("{}")
                .map_err(|e| e.to_string())
                .and_then(|p| Runner::load(&def, &p, device, half).map_err(|e| e.to_string()));
            res = match retry {
                Ok(r) => {
                    used = Some("{}".to_string());
                    Ok(r)
                }
                Err(e2) => Err(format!(
                    "{e}; the retry with default params {{}} failed too: {e2}"
                )),
            };
        }
        let res = res.map(|r| {
            let w = r.warmup_time();
            (Engine::Local(r), w)
        });
        let mut ctrl = lock(&shared.ctrl);
        if !ctrl.running || ctrl.session != session {
            return;
        }
        if res.is_ok() && used.is_some() {
            ctrl.fallback_json = used;
        }
        ctrl.loaded = Some((generation, res));
    }
}

/// Starts the loader thread for the pending request unless it runs already.
pub(super) fn ensure_loader(shared: &Arc<Shared>, ctrl: &mut Ctrl) -> Result<(), String> {
    if ctrl.loader_running {
        return Ok(());
    }
    let Some(def) = ctrl.def.clone() else {
        return Err("not running".into());
    };
    ctrl.loader_running = true;
    let shared = shared.clone();
    let session = ctrl.session;
    let device = ctrl.device.unwrap_or(tch::Device::Cpu);
    let half = ctrl.half;
    let iso = ctrl.iso.clone();
    std::thread::Builder::new()
        .name("aipipeline-loader".into())
        .spawn(move || loader(shared, session, def, device, half, iso))
        .map(|_| ())
        .map_err(|e| {
            ctrl.loader_running = false;
            e.to_string()
        })
}

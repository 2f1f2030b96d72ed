// SPDX-License-Identifier: MPL-2.0
//! One stage of a graph: a bin `queue ! unit` whose unit (the provider in service: an
//! `aipipeline`, or `videoconvert ! element ! videoconvert`) can be replaced by the next
//! provider, at build time when one fails to load and while running when one keeps failing.

use super::build::{StageStats, make};
use super::{Provider, StageDef, post_event};
use crate::config::Config;
use crate::media::{AiSpec, aipipeline};
use gst::prelude::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Consecutive `aipipeline` stats intervals with errors and no output before failing over.
const FAIL_STREAK: u32 = 3;
/// How often a `stage_stats` event is posted while frames flow.
const STATS_PERIOD: Duration = Duration::from_secs(1);

struct Inner {
    provider: usize,
    unit: gst::Bin,
    /// The `aipipeline` of a pipeline unit.
    ai: Option<gst::Element>,
    failed: bool,
    bypassed: bool,
    running: bool,
    switching: bool,
    frames_in: u64,
    frames_out: u64,
    window_start: Instant,
    window_frames: u64,
    fps: f64,
    latency_ms: Option<f64>,
    /// Counters of earlier providers (an `aipipeline`'s own counters restart with it).
    base_misses: u64,
    base_errors: u64,
    misses: u64,
    errors: u64,
    last_error: Option<String>,
    /// The last `aipipeline` stats seen: (errors, frames-out).
    last_ai: (u64, u64),
    fail_streak: u32,
    last_stats_post: Instant,
    /// Events from before the bin was in a pipeline (build-time failovers).
    pending: Vec<Value>,
}

pub(super) struct Stage {
    def: StageDef,
    cfg: Config,
    providers: Vec<Provider>,
    bin: gst::Bin,
    queue: gst::Element,
    stream_params: Mutex<Value>,
    inner: Mutex<Inner>,
}

/// The stage's `aipipeline` params: its definition's, overridden by `params.<id>`.
fn merged_params(def: &StageDef, stream: &Value) -> Value {
    let mut p = def.params.clone();
    if let (Some(map), Some(Value::Object(over))) = (p.as_object_mut(), stream.get(&def.id)) {
        for (k, v) in over {
            map.insert(k.clone(), v.clone());
        }
    }
    p
}

/// A contract element stage's params JSON: its definition's (see
/// [`contract_params`](super::contract_params)), overridden by `params.<id>`.
fn element_params(def: &StageDef, stream: &Value) -> Value {
    let mut p = super::contract_params(&def.params);
    if let (Some(map), Some(Value::Object(over))) = (p.as_object_mut(), stream.get(&def.id)) {
        for (k, v) in over {
            map.insert(k.clone(), v.clone());
        }
    }
    p
}

/// Makes the unit of `provider`. With `check`, a pipeline is loaded once first (in a scratch
/// pipeline, to get the error), so that a provider that cannot load is skipped before the
/// stream starts; without (no provider after it), a load failure fails the stream's start.
fn make_unit(
    def: &StageDef,
    provider: &Provider,
    cfg: &Config,
    params: &Value,
    check: bool,
) -> Result<(gst::Bin, Option<gst::Element>), String> {
    let unit = gst::Bin::new();
    if let Some(name) = &provider.pipeline {
        let mut spec = AiSpec::from_config(cfg, name)
            .params(&merged_params(def, params))
            .device(provider.device.as_deref().unwrap_or(&cfg.device));
        if let Some(ms) = def.deadline_ms {
            spec = spec.max_latency_ms(ms, true);
        }
        // RIVULET_ISOLATION=process: the stage's inference runs in a child process, as the
        // single pipeline's (its restarts are counted by the session).
        let ai = aipipeline(&spec, Some(cfg))?;
        if check {
            check_loads(&ai)?;
        }
        unit.add(&ai).map_err(|e| e.to_string())?;
        ghost(&unit, &ai, &ai)?;
        Ok((unit, Some(ai)))
    } else if let Some(name) = &provider.element {
        let el = make(name, None)?;
        if super::takes_params_json(&el) {
            // The element contract: the stage params are its params JSON (live, see
            // `Stage::set_stream_params`).
            el.set_property("params", element_params(def, params).to_string());
        } else if let Some(obj) = def.params.as_object() {
            for (k, v) in obj {
                set_from_json(&el, k, v)?;
            }
        }
        // The element runs on its own queue's thread: when it fails (flow error), only that
        // queue stops, and frames into it are dropped (not refused) until the stage fails over
        // (`Stage::on_child_message`), so the stream upstream goes on.
        let q = make("queue", None)?;
        q.set_property("max-size-buffers", 1u32);
        q.set_property("max-size-bytes", 0u32);
        q.set_property("max-size-time", 0u64);
        if let (Some(sink), Some(src)) = (q.static_pad("sink"), q.static_pad("src")) {
            sink.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                match src.last_flow_result() {
                    Err(gst::FlowError::Eos | gst::FlowError::Flushing) | Ok(_) => {
                        gst::PadProbeReturn::Ok
                    }
                    Err(_) => gst::PadProbeReturn::Drop,
                }
            });
        }
        let c1 = make("videoconvert", None)?;
        let c2 = make("videoconvert", None)?;
        unit.add_many([&q, &c1, &el, &c2])
            .map_err(|e| e.to_string())?;
        gst::Element::link_many([&q, &c1, &el, &c2]).map_err(|e| e.to_string())?;
        ghost(&unit, &q, &c2)?;
        Ok((unit, None))
    } else {
        Err("a provider without pipeline or element".into())
    }
}

fn set_from_json(el: &gst::Element, key: &str, v: &Value) -> Result<(), String> {
    let text = super::property_text(el, key, v)?;
    el.set_property_from_str(key, &text);
    Ok(())
}

fn ghost(unit: &gst::Bin, first: &gst::Element, last: &gst::Element) -> Result<(), String> {
    let sink = gst::GhostPad::builder_with_target(&first.static_pad("sink").ok_or("no sink pad")?)
        .map_err(|e| e.to_string())?
        .name("sink")
        .build();
    let src = gst::GhostPad::builder_with_target(&last.static_pad("src").ok_or("no src pad")?)
        .map_err(|e| e.to_string())?
        .name("src")
        .build();
    unit.add_pad(&sink).map_err(|e| e.to_string())?;
    unit.add_pad(&src).map_err(|e| e.to_string())?;
    Ok(())
}

/// Loads `ai` in a scratch pipeline (READY → PAUSED runs `start()`, which loads the model),
/// then takes it out again; the error message says why a load failed.
fn check_loads(ai: &gst::Element) -> Result<(), String> {
    let scratch = gst::Pipeline::new();
    scratch.add(ai).map_err(|e| e.to_string())?;
    let res = ai.set_state(gst::State::Paused);
    let err = res.is_err().then(|| {
        scratch
            .bus()
            .and_then(|b| b.pop_filtered(&[gst::MessageType::Error]))
            .and_then(|m| match m.view() {
                gst::MessageView::Error(e) => Some(e.error().to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "the pipeline could not start".into())
    });
    let _ = ai.set_state(gst::State::Null);
    let _ = scratch.remove(ai);
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Stage {
    pub(super) fn new(def: &StageDef, cfg: &Config, params: &Value) -> Result<Arc<Stage>, String> {
        let providers = def.providers_in_order();
        let mut failures = Vec::new();
        let mut pending = Vec::new();
        let mut chosen = None;
        for (i, p) in providers.iter().enumerate() {
            // The last provider is checked too when others failed before it: the build then
            // fails with every provider's reason.
            let check = i + 1 < providers.len() || i > 0;
            match make_unit(def, p, cfg, params, check) {
                Ok(u) => {
                    chosen = Some((i, u));
                    break;
                }
                Err(e) => {
                    tracing::warn!("stage '{}': provider {} failed: {e}", def.id, p.describe());
                    if let Some(next) = providers.get(i + 1) {
                        pending.push(json!({
                            "type": "stage_failover", "stage": def.id,
                            "from": p.describe(), "to": next.describe(), "reason": e,
                        }));
                    }
                    failures.push(format!("{}: {e}", p.describe()));
                }
            }
        }
        let Some((index, (unit, ai))) = chosen else {
            return Err(format!(
                "stage '{}': no provider could start ({})",
                def.id,
                failures.join("; ")
            ));
        };
        let stage_bin =
            super::stagebin::StageBin::new(&format!("{}{}", super::STAGE_BIN_PREFIX, def.id));
        let bin: gst::Bin = stage_bin.clone().upcast();
        let queue = make("queue", None)?;
        queue.set_property("max-size-buffers", 3u32);
        queue.set_property("max-size-bytes", 0u32);
        queue.set_property("max-size-time", 0u64);
        bin.add_many([queue.upcast_ref::<gst::Element>(), unit.upcast_ref()])
            .map_err(|e| e.to_string())?;
        queue.link(&unit).map_err(|e| e.to_string())?;
        let sink = gst::GhostPad::builder_with_target(
            &queue.static_pad("sink").ok_or("queue without sink")?,
        )
        .map_err(|e| e.to_string())?
        .name("sink")
        .build();
        let src =
            gst::GhostPad::builder_with_target(&unit.static_pad("src").ok_or("unit without src")?)
                .map_err(|e| e.to_string())?
                .name("src")
                .build();
        bin.add_pad(&sink).map_err(|e| e.to_string())?;
        bin.add_pad(&src).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let stage = Arc::new(Stage {
            def: def.clone(),
            cfg: cfg.clone(),
            providers,
            bin,
            queue,
            stream_params: Mutex::new(params.clone()),
            inner: Mutex::new(Inner {
                provider: index,
                unit,
                ai: ai.clone(),
                failed: false,
                bypassed: false,
                running: false,
                switching: false,
                frames_in: 0,
                frames_out: 0,
                window_start: now,
                window_frames: 0,
                fps: 0.0,
                latency_ms: None,
                base_misses: 0,
                base_errors: 0,
                misses: 0,
                errors: 0,
                last_error: failures.last().cloned(),
                last_ai: (0, 0),
                fail_streak: 0,
                last_stats_post: now,
                pending,
            }),
        });
        if let Some(ai) = &ai {
            stage.watch_ai(ai);
        }
        let weak = Arc::downgrade(&stage);
        stage_bin.set_filter(Box::new(move |msg| {
            weak.upgrade().is_some_and(|s| s.on_child_message(msg))
        }));
        stage.install_probes(&sink, &src);
        Ok(stage)
    }

    pub(super) fn bin(&self) -> &gst::Bin {
        &self.bin
    }

    fn install_probes(self: &Arc<Self>, sink: &gst::GhostPad, src: &gst::GhostPad) {
        let weak = Arc::downgrade(self);
        sink.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if let Some(s) = weak.upgrade() {
                s.inner.lock().unwrap().frames_in += 1;
            }
            gst::PadProbeReturn::Ok
        });
        let weak = Arc::downgrade(self);
        src.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if let Some(s) = weak.upgrade() {
                s.on_output();
            }
            gst::PadProbeReturn::Ok
        });
    }

    fn on_output(&self) {
        let mut events = Vec::new();
        {
            let mut i = self.inner.lock().unwrap();
            i.frames_out += 1;
            i.window_frames += 1;
            let now = Instant::now();
            let span = now.duration_since(i.window_start);
            if span >= STATS_PERIOD {
                i.fps = i.window_frames as f64 / span.as_secs_f64();
                i.window_frames = 0;
                i.window_start = now;
            }
            if !i.running {
                i.running = true;
                events.append(&mut i.pending);
                events.push(json!({
                    "type": "stage_start", "stage": self.def.id,
                    "provider": self.providers.get(i.provider).map(Provider::describe),
                }));
            }
            if now.duration_since(i.last_stats_post) >= STATS_PERIOD {
                i.last_stats_post = now;
                drop(i);
                let mut ev = serde_json::to_value(self.stats()).unwrap_or_default();
                if let Some(o) = ev.as_object_mut() {
                    o.insert("type".into(), json!("stage_stats"));
                    o.insert("stage".into(), json!(self.def.id));
                }
                events.push(ev);
            }
        }
        for e in events {
            post_event(self.bin.upcast_ref(), e);
        }
    }

    /// Follows the `aipipeline`'s `stats` (latency, deadline misses, errors) and fails over
    /// when it keeps failing.
    fn watch_ai(self: &Arc<Self>, ai: &gst::Element) {
        let weak: Weak<Stage> = Arc::downgrade(self);
        ai.connect_notify(Some("stats"), move |ai, _| {
            let Some(stage) = weak.upgrade() else { return };
            let s = ai.property::<gst::Structure>("stats");
            stage.on_ai_stats(ai, &s);
        });
    }

    fn on_ai_stats(self: &Arc<Self>, ai: &gst::Element, s: &gst::StructureRef) {
        let get = |k: &str| s.get::<u64>(k).unwrap_or(0);
        let errors = get("errors");
        let out = get("frames-out");
        let misses = get("late-frames-passed");
        let fail_over = {
            let mut i = self.inner.lock().unwrap();
            if i.ai.as_ref() != Some(ai) {
                return;
            }
            if let Ok(p50) = s.get::<f64>("inference-latency-p50-ms")
                && p50 > 0.0
            {
                i.latency_ms = Some(p50);
            }
            i.misses = i.base_misses + misses;
            i.errors = i.base_errors + errors;
            let (last_err, last_out) = i.last_ai;
            if errors > last_err && out == last_out {
                i.fail_streak += 1;
            } else if out > last_out {
                i.fail_streak = 0;
            }
            i.last_ai = (errors, out);
            let can = i.provider + 1 < self.providers.len() && !i.switching;
            if i.fail_streak >= FAIL_STREAK && can {
                i.switching = true;
                i.last_error = Some(format!(
                    "{} failed on {} frames in a row",
                    self.providers
                        .get(i.provider)
                        .map(Provider::describe)
                        .unwrap_or_default(),
                    errors - last_err
                ));
                true
            } else {
                false
            }
        };
        if fail_over {
            // Not on the element's own thread: replacing it joins that thread.
            let stage = self.clone();
            let _ = std::thread::Builder::new()
                .name("stage-failover".into())
                .spawn(move || stage.fail_over("it keeps failing on frames"));
        }
    }

    /// A message from inside the stage, in the posting thread: an error from an element
    /// provider in service, when another provider follows, fails the stage over to it live
    /// (the error goes no further, so the stream goes on); true when handled so.
    fn on_child_message(self: &Arc<Self>, msg: &gst::Message) -> bool {
        let gst::MessageView::Error(e) = msg.view() else {
            return false;
        };
        let Some(src) = msg.src() else { return false };
        let reason = {
            let mut i = self.inner.lock().unwrap();
            let unit: &gst::Object = i.unit.upcast_ref();
            if i.ai.is_some() || !(src == unit || src.has_as_ancestor(unit)) {
                return false;
            }
            if i.switching {
                // The unit being replaced: its queue's own flow error after the element's.
                return true;
            }
            if i.provider + 1 >= self.providers.len() {
                return false;
            }
            i.switching = true;
            i.errors += 1;
            i.base_errors = i.errors;
            let reason = format!(
                "{}: {}",
                src.name(),
                e.debug()
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| e.error().to_string())
            );
            i.last_error = Some(reason.clone());
            reason
        };
        // Not on the failing element's thread: replacing the unit joins it.
        let stage = self.clone();
        let _ = std::thread::Builder::new()
            .name("stage-failover".into())
            .spawn(move || stage.fail_over(&reason));
        true
    }

    /// Replaces the unit in service by the next provider that loads, while running: the queue
    /// is blocked, the old unit taken out, the new one linked in and synced with the stage.
    fn fail_over(self: &Arc<Self>, reason: &str) {
        let (from_index, old) = {
            let i = self.inner.lock().unwrap();
            (i.provider, i.unit.clone())
        };
        let from = self
            .providers
            .get(from_index)
            .map(Provider::describe)
            .unwrap_or_default();
        post_event(
            self.bin.upcast_ref(),
            json!({"type": "stage_error", "stage": self.def.id, "provider": from, "error": reason}),
        );
        let params = self.stream_params.lock().unwrap().clone();
        let mut next = from_index + 1;
        let (index, unit, ai) = loop {
            let Some(p) = self.providers.get(next) else {
                let mut i = self.inner.lock().unwrap();
                i.switching = false;
                i.last_error = Some(format!("{reason}; no provider left"));
                return;
            };
            match make_unit(&self.def, p, &self.cfg, &params, true) {
                Ok((u, a)) => break (next, u, a),
                Err(e) => {
                    tracing::warn!(
                        "stage '{}': provider {} failed: {e}",
                        self.def.id,
                        p.describe()
                    );
                    next += 1;
                }
            }
        };
        let to = self
            .providers
            .get(index)
            .map(Provider::describe)
            .unwrap_or_default();
        let Some(qsrc) = self.queue.static_pad("src") else {
            return;
        };
        // Block the queue's output (wait for it when frames flow), then swap.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let probe = qsrc.add_probe(gst::PadProbeType::BLOCK_DOWNSTREAM, move |_, _| {
            let _ = tx.try_send(());
            gst::PadProbeReturn::Ok
        });
        let _ = rx.recv_timeout(Duration::from_secs(2));
        let _ = old.set_state(gst::State::Null);
        self.queue.unlink(&old);
        let _ = self.bin.remove(&old);
        let swapped = (|| -> Result<(), String> {
            self.bin.add(&unit).map_err(|e| e.to_string())?;
            self.queue.link(&unit).map_err(|e| e.to_string())?;
            let src = self
                .bin
                .static_pad("src")
                .and_then(|p| p.downcast::<gst::GhostPad>().ok())
                .ok_or("stage without ghost src")?;
            src.set_target(unit.static_pad("src").as_ref())
                .map_err(|e| e.to_string())?;
            unit.sync_state_with_parent().map_err(|e| e.to_string())?;
            Ok(())
        })();
        {
            let mut i = self.inner.lock().unwrap();
            i.switching = false;
            i.base_misses = i.misses;
            i.base_errors = i.errors;
            i.last_ai = (0, 0);
            i.fail_streak = 0;
            match &swapped {
                Ok(()) => {
                    i.provider = index;
                    i.unit = unit.clone();
                    i.ai = ai.clone();
                }
                Err(e) => {
                    i.failed = true;
                    i.last_error = Some(format!("failover to {to} failed: {e}"));
                }
            }
        }
        if let Some(ai) = &ai {
            self.watch_ai(ai);
        }
        if let Some(p) = probe {
            qsrc.remove_probe(p);
        }
        post_event(
            self.bin.upcast_ref(),
            json!({"type": "stage_failover", "stage": self.def.id, "from": from, "to": to,
                   "reason": reason, "ok": swapped.is_ok()}),
        );
    }

    pub(super) fn id(&self) -> &str {
        &self.def.id
    }

    pub(super) fn record_error(&self, error: &str) {
        self.inner.lock().unwrap().last_error = Some(error.to_string());
    }

    pub(super) fn set_bypassed(&self, bypassed: bool) {
        self.inner.lock().unwrap().bypassed = bypassed;
    }

    /// Hands the stage its params from new stream params: a pipeline stage's `aipipeline`
    /// and a contract element's `params` (its definition's params overridden by
    /// `params.<id>`), live. Other element stages' params are properties, fixed at build.
    pub(super) fn set_stream_params(&self, params: &Value) {
        let old = std::mem::replace(&mut *self.stream_params.lock().unwrap(), params.clone());
        let (ai, unit, provider) = {
            let i = self.inner.lock().unwrap();
            (i.ai.clone(), i.unit.clone(), i.provider)
        };
        if let Some(ai) = ai {
            let (new_p, old_p) = (
                merged_params(&self.def, params),
                merged_params(&self.def, &old),
            );
            if new_p != old_p {
                ai.set_property("params", new_p.to_string());
            }
            return;
        }
        let Some(name) = self.providers.get(provider).and_then(|p| p.element.clone()) else {
            return;
        };
        let (new_p, old_p) = (
            element_params(&self.def, params),
            element_params(&self.def, &old),
        );
        if new_p == old_p {
            return;
        }
        let el = unit.iterate_elements().into_iter().flatten().find(|e| {
            e.factory().is_some_and(|f| f.name() == name.as_str()) && super::takes_params_json(e)
        });
        if let Some(el) = el {
            el.set_property("params", new_p.to_string());
        }
    }

    pub(super) fn stats(&self) -> StageStats {
        let i = self.inner.lock().unwrap();
        let state = if i.failed {
            "failed"
        } else if i.bypassed {
            "bypassed"
        } else if i.running {
            "running"
        } else {
            "starting"
        };
        // A window that saw no frame for a while reads 0 fps.
        let fps = if i.window_start.elapsed() > 2 * STATS_PERIOD {
            0.0
        } else {
            i.fps
        };
        StageStats {
            id: self.def.id.clone(),
            state: state.into(),
            provider: self
                .providers
                .get(i.provider)
                .map(Provider::describe)
                .unwrap_or_default(),
            fps,
            latency_ms: i.latency_ms,
            frames_in: i.frames_in,
            frames_out: i.frames_out,
            deadline_misses: i.misses,
            errors: i.errors,
            last_error: i.last_error.clone(),
        }
    }
}

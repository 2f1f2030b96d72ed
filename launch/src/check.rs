// SPDX-License-Identifier: MPL-2.0
//! `rivulet check-pipeline NAME`: runs the Rivulet element contract
//! (gst-plugin-aipipeline/README.md, "Element contract for external pipeline elements") against
//! an `aipipeline` pipeline name or any GStreamer element, in a real pipeline:
//!
//! `videotestsrc is-live=true ! video/x-raw,format=RGB,640x480,30/1 ! ELEMENT ! fakesink`
//!
//! Every check is judged on what the element does (caps it sends, buffers, custom events,
//! bus messages), not on what it claims: a `params` change must show up as new output caps,
//! full replacement as the size going back to its default, a rejected params string as a bus
//! warning with the old params still in force and frames still flowing.

use crate::media::{AiSpec, aipipeline};
use gstaipipeline::pipeline::SearchPath;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

/// The contract's names for the loading/online custom downstream events (matched as strings,
/// as any consumer must).
pub const LOADING_EVENT: &str = "rivulet-loading";
pub const ONLINE_EVENT: &str = "rivulet-online";

/// Default output size of the contract's base params (an `aipipeline` manifest may set its
/// own).
const CONTRACT_DEFAULT_SIZE: (i32, i32) = (512, 512);
/// Input picture (not the default size, so an element ignoring params is caught).
const INPUT_SIZE: (i32, i32) = (640, 480);
/// Buffers that must come out after a change before it counts as in force.
const SETTLE_BUFFERS: usize = 3;

/// What is checked: an `aipipeline` pipeline by name, or an element by factory name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pipeline(String),
    Element(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pipeline(p) => write!(f, "aipipeline pipeline={p}"),
            Target::Element(e) => write!(f, "element {e}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    /// Where `aipipeline` looks for model manifests (the daemon's search path).
    pub pipelines: SearchPath,
    /// `aipipeline` device.
    pub device: String,
    /// `aipipeline`'s `model` property (the TorchScript file of `pipeline=torchscript`).
    pub model: Option<PathBuf>,
    /// Bound on each wait (first frame, a change taking effect).
    pub timeout: Duration,
}

/// Decides what NAME means: an `aipipeline` pipeline (`noop`, `torchscript`, a manifest in
/// `pipelines`) unless `force_element`, else a GStreamer element factory.
pub fn resolve(name: &str, force_element: bool, pipelines: &SearchPath) -> Result<Target, String> {
    if name.is_empty() {
        return Err("empty pipeline name".into());
    }
    let registry = gstaipipeline::pipeline::Registry::scan(pipelines);
    if !force_element && registry.resolve(name, None).is_some() {
        return Ok(Target::Pipeline(name.to_owned()));
    }
    if gst::ElementFactory::find(name).is_some() {
        return Ok(Target::Element(name.to_owned()));
    }
    Err(format!(
        "'{name}' is neither an aipipeline pipeline ({}) nor a GStreamer element \
         (GST_PLUGIN_PATH: {})",
        registry.unknown_message(name),
        std::env::var("GST_PLUGIN_PATH").unwrap_or_default()
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub target: Target,
    pub results: Vec<CheckResult>,
}

impl Report {
    /// No check failed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.outcome != Outcome::Fail)
    }

    pub fn outcome(&self, check: &str) -> Option<Outcome> {
        self.results
            .iter()
            .find(|r| r.name == check)
            .map(|r| r.outcome)
    }

    pub fn failed(&self) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|r| r.outcome == Outcome::Fail)
            .map(|r| r.name)
            .collect()
    }

    /// The pass/fail table printed by the command.
    pub fn table(&self) -> String {
        let mut s = format!("rivulet check-pipeline: {}\n", self.target);
        let w = self.results.iter().map(|r| r.name.len()).max().unwrap_or(5);
        s += &format!("{:<w$}  result  detail\n", "check");
        for r in &self.results {
            s += &format!("{:<w$}  {:<6}  {}\n", r.name, r.outcome.as_str(), r.detail);
        }
        let count = |o| self.results.iter().filter(|r| r.outcome == o).count();
        s += &format!(
            "{} passed, {} failed, {} skipped: {}\n",
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip),
            if self.passed() {
                "follows the element contract"
            } else {
                "does NOT follow the element contract"
            }
        );
        s
    }
}

/// What the probes and the bus saw, in order.
#[derive(Debug, Clone)]
enum Obs {
    Caps {
        width: i32,
        height: i32,
        format: String,
        raw: bool,
    },
    Buffer(Option<gst::ClockTime>),
    Loading(gst::Structure),
    Online(gst::Structure),
    Eos,
    Warning(String),
    Error(String),
}

#[derive(Default)]
struct Recorder {
    obs: Mutex<Vec<Obs>>,
    cond: Condvar,
    inputs: Mutex<std::collections::HashSet<u64>>,
}

impl Recorder {
    fn push(&self, o: Obs) {
        self.obs.lock().unwrap().push(o);
        self.cond.notify_all();
    }

    fn len(&self) -> usize {
        self.obs.lock().unwrap().len()
    }

    fn since(&self, mark: usize) -> Vec<Obs> {
        self.obs.lock().unwrap()[mark..].to_vec()
    }

    /// Waits until `pred` holds for what was seen since `mark` (or `timeout` passes).
    fn wait(&self, mark: usize, timeout: Duration, pred: impl Fn(&[Obs]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.obs.lock().unwrap();
        loop {
            if pred(&g[mark.min(g.len())..]) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

fn buffers_after_caps(obs: &[Obs], size: (i32, i32)) -> usize {
    // The last caps must be the expected ones.
    let Some(i) = obs.iter().rposition(|o| matches!(o, Obs::Caps { .. })) else {
        return 0;
    };
    if !matches!(&obs[i], Obs::Caps { width, height, .. } if (*width, *height) == size) {
        return 0;
    }
    obs[i + 1..]
        .iter()
        .filter(|o| matches!(o, Obs::Buffer(_)))
        .count()
}

fn last_caps(obs: &[Obs]) -> Option<(i32, i32, String, bool)> {
    obs.iter().rev().find_map(|o| match o {
        Obs::Caps {
            width,
            height,
            format,
            raw,
        } => Some((*width, *height, format.clone(), *raw)),
        _ => None,
    })
}

/// A loading event without its online event yet.
fn loading_open(obs: &[Obs]) -> bool {
    let last = |f: fn(&Obs) -> bool| obs.iter().rposition(f);
    match (
        last(|o| matches!(o, Obs::Loading(_))),
        last(|o| matches!(o, Obs::Online(_))),
    ) {
        (Some(l), Some(o)) => l > o,
        (Some(_), None) => true,
        _ => false,
    }
}

fn buffer_count(obs: &[Obs]) -> usize {
    obs.iter().filter(|o| matches!(o, Obs::Buffer(_))).count()
}

fn errors(obs: &[Obs]) -> Vec<String> {
    obs.iter()
        .filter_map(|o| match o {
            Obs::Error(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn warnings(obs: &[Obs]) -> Vec<String> {
    obs.iter()
        .filter_map(|o| match o {
            Obs::Warning(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

struct Checks {
    results: Vec<CheckResult>,
}

impl Checks {
    fn add(&mut self, name: &'static str, outcome: Outcome, detail: impl Into<String>) {
        self.results.push(CheckResult {
            name,
            outcome,
            detail: detail.into(),
        });
    }
    fn pass(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(name, Outcome::Pass, detail)
    }
    fn fail(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(name, Outcome::Fail, detail)
    }
    fn skip(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(name, Outcome::Skip, detail)
    }
    fn check(&mut self, name: &'static str, ok: bool, pass: String, fail: String) -> bool {
        if ok {
            self.pass(name, pass)
        } else {
            self.fail(name, fail)
        }
        ok
    }
}

/// Every check in the order they run; the ones not reached are reported as skipped.
pub const CHECKS: [&str; 13] = [
    "element",
    "pads",
    "params-property",
    "status-stats",
    "caps-in",
    "start",
    "caps-out",
    "pts",
    "params-applied",
    "full-replacement",
    "loading-events",
    "bad-params",
    "eos",
];

fn make_element(opts: &Options) -> Result<gst::Element, String> {
    match &opts.target {
        Target::Pipeline(name) => {
            let spec = AiSpec::new(name, &opts.device, &opts.pipelines)
                .named("checked")
                .model(opts.model.clone());
            aipipeline(&spec, None).map_err(|e| format!("cannot make aipipeline: {e}"))
        }
        Target::Element(name) => gst::ElementFactory::make(name)
            .name("checked")
            .build()
            .map_err(|e| format!("cannot make element {name}: {e}")),
    }
}

fn params_readback(e: &gst::Element) -> Option<Value> {
    let s: Option<String> = e.property("params");
    s.and_then(|s| serde_json::from_str(&s).ok())
}

/// Runs every check. Never panics on what the element does; a hang is bounded by `timeout`.
pub fn run(opts: &Options) -> Report {
    let mut c = Checks {
        results: Vec::new(),
    };
    run_checks(opts, &mut c);
    for name in CHECKS {
        if !c.results.iter().any(|r| r.name == name) {
            c.skip(name, "not reached");
        }
    }
    c.results
        .sort_by_key(|r| CHECKS.iter().position(|n| *n == r.name));
    Report {
        target: opts.target.clone(),
        results: c.results,
    }
}

/// The size the element must give with default params: the contract's 512×512, or an
/// `aipipeline` manifest's own.
fn default_size(opts: &Options) -> (i32, i32) {
    match &opts.target {
        Target::Pipeline(name) => gstaipipeline::pipeline::Registry::scan(&opts.pipelines)
            .resolve(name, None)
            .map(|d| {
                let p = d.initial_params();
                (p.width as i32, p.height as i32)
            })
            .unwrap_or(CONTRACT_DEFAULT_SIZE),
        Target::Element(_) => CONTRACT_DEFAULT_SIZE,
    }
}

fn run_checks(opts: &Options, c: &mut Checks) {
    let default_size = default_size(opts);
    let Some(element) = check_element(opts, c) else {
        return;
    };
    let pads = check_pads(&element, c);
    let has_params = check_params_property(&element, c);
    check_status_stats(&element, c);
    let Some((sinkpad, srcpad)) = pads else {
        return;
    };
    check_caps_in(&sinkpad, c);
    let t = opts.timeout;
    let Some((stop, rec, seen)) = start_pipeline(&element, &sinkpad, &srcpad, t, c) else {
        return;
    };
    let pipeline = &stop.0;
    check_caps_out(&seen, default_size, c);
    check_pts(&rec, &seen, c);
    if !has_params {
        for name in [
            "params-applied",
            "full-replacement",
            "loading-events",
            "bad-params",
        ] {
            c.skip(name, "needs a `params` property");
        }
        eos_check(c, pipeline, &rec, t);
        return;
    }
    let (ok1, mark1, p1) = check_params_applied(&element, &rec, default_size, t, c);
    let mark2 = check_full_replacement(&element, &rec, default_size, t, (ok1, &p1), c);
    check_loading_events(&rec, mark1, mark2, t, c);
    check_bad_params(&element, &rec, default_size, t, c);
    eos_check(c, pipeline, &rec, t);
}

/// The element under test, made.
fn check_element(opts: &Options, c: &mut Checks) -> Option<gst::Element> {
    match make_element(opts) {
        Ok(e) => {
            c.pass(
                "element",
                format!(
                    "made {}",
                    e.factory()
                        .map(|f| f.name().to_string())
                        .unwrap_or_default()
                ),
            );
            Some(e)
        }
        Err(e) => {
            c.fail("element", e);
            None
        }
    }
}

fn check_pads(element: &gst::Element, c: &mut Checks) -> Option<(gst::Pad, gst::Pad)> {
    // Pads: one always sink and one always src pad.
    let templates = element.pad_template_list();
    let always = |dir| {
        templates
            .iter()
            .filter(|t| t.direction() == dir && t.presence() == gst::PadPresence::Always)
            .count()
    };
    let (sinks, srcs) = (
        always(gst::PadDirection::Sink),
        always(gst::PadDirection::Src),
    );
    let (sinkpad, srcpad) = (element.static_pad("sink"), element.static_pad("src"));
    let pads = match (&sinkpad, &srcpad) {
        (Some(s), Some(r)) if sinks == 1 && srcs == 1 => Some((s.clone(), r.clone())),
        _ => None,
    };
    c.check(
        "pads",
        pads.is_some(),
        "one always `sink` and one always `src` pad".into(),
        format!(
            "needs one always `sink` and one always `src` pad; has {sinks} always sink and \
             {srcs} always src templates"
        ),
    );
    pads
}

fn check_params_property(element: &gst::Element, c: &mut Checks) -> bool {
    // The params property.
    match element.find_property("params") {
        None => {
            c.fail(
                "params-property",
                "no `params` property (a JSON object string, settable while PLAYING)",
            );
            false
        }
        Some(p) => {
            let f = p.flags();
            let mut problems = Vec::new();
            if p.value_type() != String::static_type() {
                problems.push(format!("is a {}, not a string", p.value_type().name()));
            }
            if !f.contains(gst::glib::ParamFlags::READABLE | gst::glib::ParamFlags::WRITABLE) {
                problems.push("is not readable and writable".to_string());
            }
            if !f.contains(gst::PARAM_FLAG_MUTABLE_PLAYING) {
                problems.push("is not flagged mutable in PLAYING".to_string());
            }
            c.check(
                "params-property",
                problems.is_empty(),
                "string, read/write, mutable in PLAYING".into(),
                format!("`params` {}", problems.join(", ")),
            )
        }
    }
}

fn check_status_stats(element: &gst::Element, c: &mut Checks) {
    // Optional: read-only `status` (an enum) and `stats` (a GstStructure), both with notify.
    {
        let mut problems = Vec::new();
        let mut present = Vec::new();
        for (name, want_enum) in [("status", true), ("stats", false)] {
            let Some(p) = element.find_property(name) else {
                continue;
            };
            present.push(name);
            let ok_type = if want_enum {
                p.value_type().is_a(gst::glib::Type::ENUM)
            } else {
                p.value_type() == gst::Structure::static_type()
            };
            if !ok_type {
                problems.push(format!(
                    "`{name}` is a {}, not {}",
                    p.value_type().name(),
                    if want_enum {
                        "an enum"
                    } else {
                        "a GstStructure"
                    }
                ));
            }
            if !p.flags().contains(gst::glib::ParamFlags::READABLE) {
                problems.push(format!("`{name}` is not readable"));
            }
        }
        if !problems.is_empty() {
            c.fail("status-stats", problems.join("; "));
        } else if present.is_empty() {
            c.skip(
                "status-stats",
                "optional `status`/`stats` properties not provided",
            );
        } else {
            c.pass(
                "status-stats",
                format!(
                    "{} readable, of the contract's types",
                    present.join(" and ")
                ),
            );
        }
    }
}

fn check_caps_in(sinkpad: &gst::Pad, c: &mut Checks) {
    // Raw video in: the packed RGB formats the contract names.
    let accepts: Vec<&str> = ["RGB", "RGBx", "RGBA"]
        .into_iter()
        .filter(|f| {
            let caps = gst::Caps::builder("video/x-raw")
                .field("format", *f)
                .field("width", INPUT_SIZE.0)
                .field("height", INPUT_SIZE.1)
                .field("framerate", gst::Fraction::new(30, 1))
                .build();
            sinkpad.query_caps(None).can_intersect(&caps)
        })
        .collect();
    c.check(
        "caps-in",
        accepts.len() == 3,
        "sink accepts video/x-raw RGB, RGBx, RGBA".into(),
        format!(
            "sink must accept video/x-raw RGB, RGBx and RGBA; accepts {:?}",
            accepts
        ),
    );
}

/// Sets the pipeline's state to NULL when dropped.
struct Stop(gst::Pipeline);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

/// The "start" check: `videotestsrc ! RGB ! element ! fakesink` in PLAYING with its frames and
/// events recorded, until [`SETTLE_BUFFERS`] frames came out. The pipeline (stopped when the
/// guard drops), the recorder and what it saw.
fn start_pipeline(
    element: &gst::Element,
    sinkpad: &gst::Pad,
    srcpad: &gst::Pad,
    t: Duration,
    c: &mut Checks,
) -> Option<(Stop, Arc<Recorder>, Vec<Obs>)> {
    // A real pipeline.
    let pipeline = gst::Pipeline::with_name("check-pipeline");
    let made = (|| -> Result<(gst::Element, gst::Element, gst::Element), String> {
        let src = gst::ElementFactory::make("videotestsrc")
            .property("is-live", true)
            .build()
            .map_err(|e| e.to_string())?;
        src.set_property_from_str("pattern", "smpte");
        let filter = gst::ElementFactory::make("capsfilter")
            .property(
                "caps",
                gst::Caps::builder("video/x-raw")
                    .field("format", "RGB")
                    .field("width", INPUT_SIZE.0)
                    .field("height", INPUT_SIZE.1)
                    .field("framerate", gst::Fraction::new(30, 1))
                    .build(),
            )
            .build()
            .map_err(|e| e.to_string())?;
        let sink = gst::ElementFactory::make("fakesink")
            .property("sync", false)
            .property("async", false)
            .build()
            .map_err(|e| e.to_string())?;
        Ok((src, filter, sink))
    })();
    let (src, filter, sink) = match made {
        Ok(v) => v,
        Err(e) => {
            c.fail("start", format!("cannot make the test pipeline: {e}"));
            return None;
        }
    };
    if let Err(e) = pipeline
        .add_many([&src, &filter, element, &sink])
        .and_then(|_| gst::Element::link_many([&src, &filter, element, &sink]))
    {
        c.fail(
            "start",
            format!("cannot link videotestsrc ! video/x-raw,format=RGB ! element ! fakesink: {e}"),
        );
        return None;
    }

    let rec = Arc::new(Recorder::default());
    {
        let rec = rec.clone();
        sinkpad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(gst::PadProbeData::Buffer(b)) = &info.data
                && let Some(pts) = b.pts()
            {
                rec.inputs.lock().unwrap().insert(pts.nseconds());
            }
            gst::PadProbeReturn::Ok
        });
    }
    {
        let rec = rec.clone();
        srcpad.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
            move |_, info| {
                match &info.data {
                    Some(gst::PadProbeData::Buffer(b)) => rec.push(Obs::Buffer(b.pts())),
                    Some(gst::PadProbeData::Event(ev)) => match ev.view() {
                        gst::EventView::Caps(caps) => {
                            let caps = caps.caps();
                            let s = caps.structure(0);
                            let get = |f: &str| s.and_then(|s| s.get::<i32>(f).ok()).unwrap_or(0);
                            rec.push(Obs::Caps {
                                width: get("width"),
                                height: get("height"),
                                format: s
                                    .and_then(|s| s.get::<String>("format").ok())
                                    .unwrap_or_default(),
                                raw: s.is_some_and(|s| s.name() == "video/x-raw"),
                            });
                        }
                        gst::EventView::CustomDownstream(cd) => {
                            if let Some(s) = cd.structure() {
                                if s.name() == LOADING_EVENT {
                                    rec.push(Obs::Loading(s.to_owned()));
                                } else if s.name() == ONLINE_EVENT {
                                    rec.push(Obs::Online(s.to_owned()));
                                }
                            }
                        }
                        gst::EventView::Eos(_) => rec.push(Obs::Eos),
                        _ => {}
                    },
                    _ => {}
                }
                gst::PadProbeReturn::Ok
            },
        );
    }
    let Some(bus) = pipeline.bus() else {
        c.fail("start", "pipeline has no bus");
        return None;
    };
    {
        let rec = rec.clone();
        bus.set_sync_handler(move |_, msg| {
            let text = |src: Option<&gst::Object>, err: &gst::glib::Error, dbg: Option<&str>| {
                format!(
                    "{}: {err}{}",
                    src.map(|s| s.name().to_string()).unwrap_or_default(),
                    dbg.map(|d| format!(" ({d})")).unwrap_or_default()
                )
            };
            match msg.view() {
                gst::MessageView::Error(e) => {
                    rec.push(Obs::Error(text(msg.src(), &e.error(), None)))
                }
                gst::MessageView::Warning(w) => {
                    rec.push(Obs::Warning(text(msg.src(), &w.error(), None)))
                }
                _ => {}
            }
            gst::BusSyncReply::Drop
        });
    }

    let stop = Stop(pipeline.clone());

    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        let errs = errors(&rec.since(0));
        c.fail(
            "start",
            format!("could not go to PLAYING ({e}): {}", errs.join("; ")),
        );
        return None;
    }
    let started = rec.wait(0, t, |o| {
        buffer_count(o) >= SETTLE_BUFFERS || o.iter().any(|o| matches!(o, Obs::Error(_)))
    });
    let seen = rec.since(0);
    let errs = errors(&seen);
    if !started || !errs.is_empty() {
        c.fail(
            "start",
            if errs.is_empty() {
                format!("no output frame within {t:?}")
            } else {
                format!("error: {}", errs.join("; "))
            },
        );
        return None;
    }
    c.pass(
        "start",
        format!("PLAYING, {} frames out", buffer_count(&seen)),
    );
    Some((stop, rec, seen))
}

fn check_caps_out(seen: &[Obs], default_size: (i32, i32), c: &mut Checks) {
    // Raw video out at the default size.
    match last_caps(seen) {
        Some((w, h, format, raw)) => {
            let rgb = ["RGB", "RGBx", "RGBA", "BGR", "BGRx", "BGRA"].contains(&format.as_str());
            c.check(
                "caps-out",
                raw && rgb && (w, h) == default_size,
                format!("video/x-raw {format} {w}x{h} (the default params size)"),
                format!(
                    "output must be video/x-raw packed RGB at the params' size ({}x{} by \
                     default); got {}{format} {w}x{h}",
                    default_size.0,
                    default_size.1,
                    if raw { "video/x-raw " } else { "non-raw " }
                ),
            );
        }
        None => c.fail("caps-out", "no caps event before the first output buffer"),
    }
}

fn check_pts(rec: &Recorder, seen: &[Obs], c: &mut Checks) {
    // Output PTS are input PTS.
    {
        let inputs = rec.inputs.lock().unwrap().clone();
        let outs: Vec<Option<gst::ClockTime>> = seen
            .iter()
            .filter_map(|o| match o {
                Obs::Buffer(p) => Some(*p),
                _ => None,
            })
            .collect();
        let bad: Vec<String> = outs
            .iter()
            .filter(|p| p.is_none_or(|p| !inputs.contains(&p.nseconds())))
            .map(|p| p.display().to_string())
            .collect();
        c.check(
            "pts",
            bad.is_empty(),
            format!("{} output buffers keep an input PTS", outs.len()),
            format!(
                "output PTS not among the input PTS: {}",
                bad.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
}

/// The "params-applied" check: whether it passed, where its observations begin, the params set.
fn check_params_applied(
    element: &gst::Element,
    rec: &Recorder,
    default_size: (i32, i32),
    t: Duration,
    c: &mut Checks,
) -> (bool, usize, Value) {
    // A params object is applied: the size changes.
    let size1 = if default_size == (384, 448) {
        (448, 384)
    } else {
        (384, 448)
    };
    let p1 = json!({"width": size1.0, "height": size1.1, "show_reloading_frame": false});
    let mark1 = rec.len();
    element.set_property("params", p1.to_string());
    let applied = rec.wait(mark1, t, |o| {
        (buffers_after_caps(o, size1) >= SETTLE_BUFFERS && !loading_open(o))
            || !errors(o).is_empty()
    });
    let seen1 = rec.since(mark1);
    let readback1 = params_readback(element);
    let errs = errors(&seen1);
    let ok1 = applied && errs.is_empty() && readback1.as_ref() == Some(&p1);
    c.check(
        "params-applied",
        ok1,
        format!(
            "{p1} gives {}x{} output; readback matches",
            size1.0, size1.1
        ),
        format!(
            "after setting {p1} in PLAYING: {}readback {}",
            if applied && errs.is_empty() {
                String::new()
            } else if !errs.is_empty() {
                format!("error: {}; ", errs.join("; "))
            } else {
                format!(
                    "no {}x{} output within {t:?} (last caps {:?}); ",
                    size1.0,
                    size1.1,
                    last_caps(&seen1).map(|(w, h, ..)| (w, h))
                )
            },
            readback1
                .map(|v| v.to_string())
                .unwrap_or("unparsable".into())
        ),
    );
    (ok1, mark1, p1)
}

/// The "full-replacement" check after params-applied (`(ok1, p1)`: its result and params);
/// where its observations begin.
fn check_full_replacement(
    element: &gst::Element,
    rec: &Recorder,
    default_size: (i32, i32),
    t: Duration,
    (ok1, p1): (bool, &Value),
    c: &mut Checks,
) -> usize {
    // Full replacement: a set without width/height brings the default size back.
    let p2 = json!({"show_reloading_frame": true});
    let mark2 = rec.len();
    element.set_property("params", p2.to_string());
    let replaced = ok1
        && rec.wait(mark2, t, |o| {
            (buffers_after_caps(o, default_size) >= SETTLE_BUFFERS && !loading_open(o))
                || !errors(o).is_empty()
        });
    let seen2 = rec.since(mark2);
    let readback2 = params_readback(element);
    let ok2 = replaced && errors(&seen2).is_empty();
    if !ok1 {
        c.skip(
            "full-replacement",
            "needs params-applied (a change must show before its undoing can)",
        );
    } else {
        c.check(
            "full-replacement",
            ok2,
            format!(
                "{p2} after {p1} brings the default {}x{} back",
                default_size.0, default_size.1
            ),
            format!(
                "{p2} after {p1} must reset width/height to their defaults ({}x{}): last caps \
                 {:?}, readback {}",
                default_size.0,
                default_size.1,
                last_caps(&seen2).map(|(w, h, ..)| (w, h)),
                readback2
                    .map(|v| v.to_string())
                    .unwrap_or("unparsable".into())
            ),
        );
    }
    mark2
}

fn check_loading_events(rec: &Recorder, mark1: usize, mark2: usize, t: Duration, c: &mut Checks) {
    // Loading / online events around the reloads the size changes may have caused.
    // A reload may end after the next change was made: the whole sequence is judged at once,
    // each loading event against the change that came before it.
    let mut problems = Vec::new();
    let mut reloads = 0;
    let split = mark2 - mark1;
    {
        let seen = rec.since(mark1);
        let mut open: Option<usize> = None;
        for (i, o) in seen.iter().enumerate() {
            let want_picture = i >= split;
            match o {
                Obs::Loading(s) => {
                    reloads += 1;
                    if open.is_some() {
                        problems.push("two loading events without an online event".to_string());
                    }
                    open = Some(i);
                    if s.get::<String>("pipeline").is_err() {
                        problems.push(format!("{LOADING_EVENT} has no string `pipeline`"));
                    }
                    match s.get::<String>("reason") {
                        Ok(r) if ["load", "reload", "restart"].contains(&r.as_str()) => {}
                        other => problems.push(format!(
                            "{LOADING_EVENT} `reason` must be load/reload/restart, got {other:?}"
                        )),
                    }
                    match s.get::<bool>("show-picture") {
                        Ok(b) if b == want_picture => {}
                        other => problems.push(format!(
                            "{LOADING_EVENT} `show-picture` must follow show_reloading_frame \
                             ({want_picture}), got {other:?}"
                        )),
                    }
                }
                Obs::Online(s) => {
                    if open.take().is_none() {
                        problems.push(format!("{ONLINE_EVENT} without a loading event"));
                    }
                    if s.get::<String>("pipeline").is_err() {
                        problems.push(format!("{ONLINE_EVENT} has no string `pipeline`"));
                    }
                }
                _ => {}
            }
        }
        if open.is_some() {
            problems.push(format!(
                "{LOADING_EVENT} never followed by {ONLINE_EVENT} within {t:?}"
            ));
        }
    }
    if !problems.is_empty() {
        problems.dedup();
        c.fail("loading-events", problems.join("; "));
    } else if reloads == 0 {
        c.skip(
            "loading-events",
            "no reload happened for the size changes (allowed: the change was applied at once)",
        );
    } else {
        c.pass(
            "loading-events",
            format!(
                "{reloads} reload(s): {LOADING_EVENT} (pipeline, reason, show-picture) then \
                 {ONLINE_EVENT}, frames flowing"
            ),
        );
    }
}

fn check_bad_params(
    element: &gst::Element,
    rec: &Recorder,
    default_size: (i32, i32),
    t: Duration,
    c: &mut Checks,
) {
    // Bad params are rejected with a warning; the old params stay and the stream goes on.
    let before = element.property::<Option<String>>("params");
    let mut problems = Vec::new();
    for bad in ["{not json", "[1, 2]", r#"{"width": 100}"#] {
        let mark = rec.len();
        element.set_property("params", bad);
        let warned = rec.wait(mark, t, |o| {
            !warnings(o).is_empty() || !errors(o).is_empty()
        });
        let flowing = rec.wait(mark, t, |o| {
            buffer_count(o) >= SETTLE_BUFFERS || !errors(o).is_empty()
        });
        let seen = rec.since(mark);
        let after = element.property::<Option<String>>("params");
        if !errors(&seen).is_empty() {
            problems.push(format!(
                "{bad:?} caused an error: {}",
                errors(&seen).join("; ")
            ));
        }
        if !warned {
            problems.push(format!("{bad:?} gave no bus warning"));
        }
        if !flowing {
            problems.push(format!("frames stopped after {bad:?}"));
        }
        if after != before {
            problems.push(format!(
                "{bad:?} replaced the params (readback {after:?}, was {before:?})"
            ));
        }
        if let Some((w, h, ..)) = last_caps(&seen)
            && (w, h) != default_size
        {
            problems.push(format!("{bad:?} changed the output size to {w}x{h}"));
        }
    }
    c.check(
        "bad-params",
        problems.is_empty(),
        "invalid JSON, a non-object and width 100 each give a warning; params and size stay; \
         frames keep flowing"
            .into(),
        problems.join("; "),
    );
}

fn eos_check(c: &mut Checks, pipeline: &gst::Pipeline, rec: &Recorder, t: Duration) {
    let mark = rec.len();
    pipeline.send_event(gst::event::Eos::new());
    let ok = rec.wait(mark, t, |o| {
        o.iter().any(|o| matches!(o, Obs::Eos)) || !errors(o).is_empty()
    });
    let seen = rec.since(mark);
    let errs = errors(&seen);
    c.check(
        "eos",
        ok && errs.is_empty(),
        "EOS passes through".into(),
        if errs.is_empty() {
            format!("EOS did not come out within {t:?}")
        } else {
            format!("error at EOS: {}", errs.join("; "))
        },
    );
}

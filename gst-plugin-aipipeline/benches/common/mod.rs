// SPDX-License-Identifier: MPL-2.0
//! Code shared by the aipipeline benches: frame rendering, the `aipipeline ! appsink`
//! push/pull rig, the live-pipeline output clock and median statistics.
#![allow(dead_code)] // each bench uses a different subset

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `once` untimed on the first `warmup` items, then timed on every item: the times.
pub fn timed<T>(
    items: &[T],
    warmup: usize,
    mut once: impl FnMut(&T) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    for b in items.iter().take(warmup) {
        once(b)?;
    }
    let mut times = Vec::with_capacity(items.len());
    for b in items {
        let t0 = Instant::now();
        once(b)?;
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// The value after `name` on the command line (`--frames 40`).
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines")
}

pub fn caps(w: u32, h: u32) -> gst::Caps {
    gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", w as i32)
        .field("height", h as i32)
        .field("framerate", gst::Fraction::new(24, 1))
        .build()
}

/// `gst::parse::launch` of a whole pipeline.
pub fn launch(desc: &str) -> anyhow::Result<gst::Pipeline> {
    gst::parse::launch(desc)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))
}

/// The element called `name` in `pipeline`.
pub fn by_name(pipeline: &gst::Pipeline, name: &str) -> anyhow::Result<gst::Element> {
    pipeline
        .by_name(name)
        .ok_or_else(|| anyhow::anyhow!("no {name}"))
}

/// Renders `n` RGB frames of videotestsrc's "smpte" pattern (moving ball overlay for variety).
pub fn render_frames(n: usize, w: u32, h: u32) -> anyhow::Result<Vec<gst::Buffer>> {
    render_frames_as(n, w, h, "RGB")
}

/// [`render_frames`] in another raw video `format`.
pub fn render_frames_as(
    n: usize,
    w: u32,
    h: u32,
    format: &str,
) -> anyhow::Result<Vec<gst::Buffer>> {
    let pipeline = launch(&format!(
        "videotestsrc num-buffers={n} pattern=smpte horizontal-speed=5 ! \
         video/x-raw,format={format},width={w},height={h},framerate=24/1 ! appsink name=sink sync=false"
    ))?;
    let sink = by_name(&pipeline, "sink")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow::anyhow!("not an appsink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let mut frames = Vec::with_capacity(n);
    while let Ok(sample) = sink.pull_sample() {
        if let Some(b) = sample.buffer_owned() {
            frames.push(b);
        }
    }
    pipeline.set_state(gst::State::Null)?;
    Ok(frames)
}

/// `ai ! appsink`, playing, fed by a pad of the bench's own that is linked to the element's
/// sink pad: a push runs the element's chain function on the calling thread, as an upstream
/// element's streaming thread would (no source thread of the rig's own to hand frames over).
/// One frame in flight at a time. Set to NULL when dropped.
pub struct Rig {
    pub pipeline: gst::Pipeline,
    pub ai: gst::Element,
    src: gst::Pad,
    sink: gst_app::AppSink,
}

impl Rig {
    /// Links the bench's pad with `caps` into `ai` (an `aipipeline` built by the caller),
    /// `ai` to an appsink, and sets the pipeline to PLAYING.
    pub fn start(ai: gst::Element, caps: &gst::Caps) -> anyhow::Result<Rig> {
        let pipeline = gst::Pipeline::new();
        let sink = gst_app::AppSink::builder().sync(false).build();
        pipeline.add_many([&ai, sink.upcast_ref()])?;
        ai.link(&sink)?;
        let src = gst::Pad::builder(gst::PadDirection::Src)
            .name("bench-src")
            .build();
        let ai_sink = ai
            .static_pad("sink")
            .ok_or_else(|| anyhow::anyhow!("no sink pad"))?;
        src.link(&ai_sink)?;
        pipeline.set_state(gst::State::Playing)?;
        src.set_active(true)?;
        let segment = gst::FormattedSegment::<gst::ClockTime>::new();
        for event in [
            gst::event::StreamStart::new("bench"),
            gst::event::Caps::new(caps),
            gst::event::Segment::new(&segment),
        ] {
            anyhow::ensure!(src.push_event(event), "the element refused a start event");
        }
        Ok(Rig {
            pipeline,
            ai,
            src,
            sink,
        })
    }

    /// Pushes a copy of `b` with PTS `i` × 41 ms and waits (60 s at most) for one output
    /// frame: the time from push to output.
    pub fn push_pull(&self, i: u64, b: &gst::Buffer) -> anyhow::Result<Duration> {
        let mut b = b.copy();
        b.get_mut()
            .ok_or_else(|| anyhow::anyhow!("buffer not writable"))?
            .set_pts(gst::ClockTime::from_mseconds(i * 41));
        let t0 = Instant::now();
        self.src.push(b)?;
        self.sink
            .try_pull_sample(gst::ClockTime::from_seconds(60))
            .ok_or_else(|| anyhow::anyhow!("no output frame"))?;
        Ok(t0.elapsed())
    }

    /// Pushes the first `warmup` frames untimed, then every frame timed, one at a time, PTS
    /// numbered from 0 (the timed frames from `warmup` on): the time of each timed frame,
    /// copy and push to output.
    pub fn timed_frames(
        &self,
        frames: &[gst::Buffer],
        warmup: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        for (i, b) in frames.iter().take(warmup).enumerate() {
            self.push_pull(i as u64, b)?;
        }
        let mut times = Vec::with_capacity(frames.len());
        for (i, b) in frames.iter().enumerate() {
            let t0 = Instant::now();
            self.push_pull((i + warmup) as u64, b)?;
            times.push(t0.elapsed());
        }
        Ok(times)
    }

    /// Runs the ALLOCATION query for `caps` on the bench's pad, as an upstream element does:
    /// the pool the element proposed, configured and active (None: it proposed none).
    pub fn proposed_pool(&self, caps: &gst::Caps) -> anyhow::Result<Option<gst::BufferPool>> {
        let mut q = gst::query::Allocation::new(Some(caps), true);
        if !self.src.peer_query(&mut q) {
            return Ok(None);
        }
        match q.allocation_pools().next() {
            Some((Some(pool), size, min, max)) => Ok(Some(activate(pool, caps, size, min, max)?)),
            _ => Ok(None),
        }
    }

    /// Writes `b` into a buffer of `pool` (as a decoder writes its output into a buffer of
    /// its downstream's pool, or of its own), with PTS `i` × 41 ms, pushes it and waits (60 s
    /// at most) for one output frame: the time from the write to output.
    pub fn write_push_pull(
        &self,
        pool: &gst::BufferPool,
        i: u64,
        b: &gst::Buffer,
    ) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut out = pool.acquire_buffer(None)?;
        {
            let out = out
                .get_mut()
                .ok_or_else(|| anyhow::anyhow!("pool buffer not writable"))?;
            let src = b.map_readable()?;
            let mut dst = out.map_writable()?;
            anyhow::ensure!(dst.len() >= src.len(), "pool buffer too small");
            dst[..src.len()].copy_from_slice(&src);
            drop(dst);
            out.set_pts(gst::ClockTime::from_mseconds(i * 41));
        }
        self.src.push(out)?;
        self.sink
            .try_pull_sample(gst::ClockTime::from_seconds(60))
            .ok_or_else(|| anyhow::anyhow!("no output frame"))?;
        Ok(t0.elapsed())
    }

    /// As [`Rig::timed_frames`], every frame written into a buffer of `pool` first
    /// ([`Rig::write_push_pull`]).
    pub fn timed_frames_via(
        &self,
        pool: &gst::BufferPool,
        frames: &[gst::Buffer],
        warmup: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        for (i, b) in frames.iter().take(warmup).enumerate() {
            self.write_push_pull(pool, i as u64, b)?;
        }
        let mut times = Vec::with_capacity(frames.len());
        for (i, b) in frames.iter().enumerate() {
            times.push(self.write_push_pull(pool, (i + warmup) as u64, b)?);
        }
        Ok(times)
    }

    /// The element's `stats` structure.
    pub fn stats(&self) -> gst::Structure {
        self.ai.property::<gst::Structure>("stats")
    }

    /// Sets the pipeline to NULL.
    pub fn stop(self) -> anyhow::Result<()> {
        self.pipeline.set_state(gst::State::Null)?;
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
        let _ = self.src.set_active(false);
    }
}

/// `pool` configured for `caps` (buffers of at least the caps' frame size) and active.
fn activate(
    pool: gst::BufferPool,
    caps: &gst::Caps,
    size: u32,
    min: u32,
    max: u32,
) -> anyhow::Result<gst::BufferPool> {
    let info = gst_video::VideoInfo::from_caps(caps)?;
    let mut config = pool.config();
    config.set_params(Some(caps), size.max(info.size() as u32), min.max(2), max);
    config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
    pool.set_config(config)?;
    pool.set_active(true)?;
    Ok(pool)
}

/// A plain video buffer pool for `caps`, active: an upstream element's own buffers, as when
/// downstream proposes no pool.
pub fn own_pool(caps: &gst::Caps) -> anyhow::Result<gst::BufferPool> {
    activate(gst_video::VideoBufferPool::new().upcast(), caps, 0, 2, 0)
}

/// Times at which buffers reach the sink pad of the element `sink` in `pipeline`.
pub type Arrivals = Arc<Mutex<Vec<Instant>>>;

/// Records buffer arrivals at the element `sink`, plays `pipeline` and waits (at most
/// `timeout`) for EOS; an error message is returned as an error. The pipeline is left playing.
pub fn play_to_eos(pipeline: &gst::Pipeline, timeout: gst::ClockTime) -> anyhow::Result<Arrivals> {
    let sink = by_name(pipeline, "sink")?;
    let times: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    sink.static_pad("sink")
        .ok_or_else(|| anyhow::anyhow!("no sink pad"))?
        .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            t.lock().unwrap().push(Instant::now());
            gst::PadProbeReturn::Ok
        });
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().ok_or_else(|| anyhow::anyhow!("no bus"))?;
    let msg = bus.timed_pop_filtered(timeout, &[gst::MessageType::Eos, gst::MessageType::Error]);
    if let Some(m) = &msg
        && let gst::MessageView::Error(e) = m.view()
    {
        anyhow::bail!("{} {:?}", e.error(), e.debug());
    }
    Ok(times)
}

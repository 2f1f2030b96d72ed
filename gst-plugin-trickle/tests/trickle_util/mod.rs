// SPDX-License-Identifier: MPL-2.0
//! Helpers shared by the tricklesrc / tricklesink tests: a real trickle server on 127.0.0.1,
//! frame-index stamps that survive x264, bus waits and an MPEG-TS segment checker.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gst::prelude::*;
use gsttrickle::protocol::client::{Subscriber, SubscriberConfig};
use gsttrickle::protocol::server::{ServerConfig, ServerHandle, TrickleServer, serve};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // RUST_LOG=gsttrickle=debug shows the protocol library's logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        gst::init().unwrap();
        gsttrickle::plugin_register_static().unwrap();
    });
}

/// A trickle server with its own runtime, so that `kill()` can drop it abruptly (like a crash).
pub struct TestServer {
    rt: Option<tokio::runtime::Runtime>,
    handle: Option<ServerHandle>,
    pub server: TrickleServer,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(addr: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = TrickleServer::new(ServerConfig::default());
        let handle = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            serve(listener, server.clone()).await.unwrap()
        });
        let addr = handle.local_addr();
        Self {
            rt: Some(rt),
            handle: Some(handle),
            server,
            addr,
        }
    }

    /// Create a video channel and return its URL.
    pub fn channel(&self, name: &str) -> String {
        self.server.create_channel(name, "video/MP2T").unwrap();
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    pub fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Drop the server and every connection at once, as a crash would.
    pub fn kill(mut self) -> SocketAddr {
        drop(self.handle.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        self.addr
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let (Some(rt), Some(handle)) = (self.rt.as_ref(), self.handle.take()) {
            rt.block_on(handle.shutdown());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Read segments of a channel from `start_seq` in a background thread until EOS, an error, or
/// `max` segments; returns (seq, body) pairs.
pub fn collect_segments(
    server: &TestServer,
    url: &str,
    start_seq: i64,
    max: usize,
) -> std::thread::JoinHandle<Vec<(i64, Bytes)>> {
    let handle = server.rt().handle().clone();
    let url = url.to_owned();
    std::thread::spawn(move || {
        handle.block_on(async move {
            let mut sub = Subscriber::new(
                &url,
                SubscriberConfig {
                    start_seq,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut out = Vec::new();
            while out.len() < max {
                match tokio::time::timeout(TIMEOUT, sub.next_segment()).await {
                    Ok(Ok(Some(seg))) => {
                        let seq = seg.seq();
                        match seg.read_all(64 << 20).await {
                            Ok(body) => out.push((seq, body)),
                            Err(_) => break,
                        }
                    }
                    _ => break,
                }
            }
            out
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Frame stamps: the frame index as 16 black/white blocks in the top row of the picture.

pub const STAMP_BITS: u32 = 16;

/// An I420 frame of `w`×`h` (even sizes) carrying `n` as a stamp; the rest is mid-grey.
pub fn stamped_i420(n: u32, w: usize, h: usize) -> Vec<u8> {
    let mut frame = vec![128u8; w * h * 3 / 2];
    let block = w / STAMP_BITS as usize;
    for bit in 0..STAMP_BITS as usize {
        let v = if n >> bit & 1 == 1 { 235 } else { 16 };
        for y in 0..block {
            let row = &mut frame[y * w + bit * block..y * w + (bit + 1) * block];
            row.fill(v);
        }
    }
    frame
}

/// Read the stamp back from a decoded frame's luma plane.
pub fn read_stamp(luma: &[u8], stride: usize, w: usize) -> u32 {
    let block = w / STAMP_BITS as usize;
    let mut n = 0;
    for bit in 0..STAMP_BITS as usize {
        let (cx, cy) = (bit * block + block / 2, block / 2);
        let mut sum = 0u32;
        for y in cy - 2..cy + 2 {
            for x in cx - 2..cx + 2 {
                sum += u32::from(luma[y * stride + x]);
            }
        }
        if sum / 16 > 128 {
            n |= 1 << bit;
        }
    }
    n
}

/// The stamp of a decoded I420 sample.
pub fn sample_stamp(sample: &gst::Sample) -> u32 {
    let caps = sample.caps().unwrap();
    let info = gst_video::VideoInfo::from_caps(caps).unwrap();
    let buffer = sample.buffer().unwrap();
    let map = buffer.map_readable().unwrap();
    let offset = info.offset()[0];
    let stride = info.stride()[0] as usize;
    read_stamp(&map[offset..], stride, info.width() as usize)
}

// ---------------------------------------------------------------------------------------------
// Bus helpers.

/// Wait for a message matching `pred` on `bus`; panics on timeout.
pub fn wait_for(
    bus: &gst::Bus,
    what: &str,
    mut pred: impl FnMut(&gst::Message) -> bool,
) -> gst::Message {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
            && pred(&msg)
        {
            return msg;
        }
    }
}

/// Wait for EOS; panics on an error message first.
pub fn wait_eos(bus: &gst::Bus) {
    wait_for(bus, "EOS", |msg| match msg.view() {
        gst::MessageView::Eos(_) => true,
        gst::MessageView::Error(err) => panic!(
            "error from {:?}: {} ({:?})",
            err.src().map(|s| s.path_string()),
            err.error(),
            err.debug()
        ),
        _ => false,
    });
}

/// The text of an error or warning message.
pub fn message_text(msg: &gst::Message) -> Option<String> {
    match msg.view() {
        gst::MessageView::Error(e) => Some(format!("{} {:?}", e.error(), e.debug())),
        gst::MessageView::Warning(w) => Some(format!("{} {:?}", w.error(), w.debug())),
        _ => None,
    }
}

/// A `trickle-segment` element message's structure, if `msg` is one.
pub fn segment_message(msg: &gst::Message) -> Option<gst::Structure> {
    match msg.view() {
        gst::MessageView::Element(e) => e
            .structure()
            .filter(|s| s.name() == "trickle-segment")
            .map(|s| s.to_owned()),
        _ => None,
    }
}

pub fn pipeline(desc: &str) -> gst::Pipeline {
    gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap()
}

/// Pull decoded samples until `n` arrived (panics on timeout or EOS before that).
pub fn pull(appsink: &gst_app::AppSink, n: usize) -> Vec<gst::Sample> {
    (0..n)
        .map(|i| {
            appsink
                .try_pull_sample(gst::ClockTime::from_seconds(TIMEOUT.as_secs()))
                .unwrap_or_else(|| panic!("no sample #{i} within {TIMEOUT:?}"))
        })
        .collect()
}

pub fn appsink(pipeline: &gst::Pipeline, name: &str) -> gst_app::AppSink {
    pipeline
        .by_name(name)
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap()
}

/// Stop a pipeline, checking the state change.
pub fn stop(pipeline: &gst::Pipeline) {
    pipeline.set_state(gst::State::Null).unwrap();
}

// ---------------------------------------------------------------------------------------------
// MPEG-TS checks.

pub fn pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2])
}

pub fn pusi(p: &[u8]) -> bool {
    p[1] & 0x40 != 0
}

pub fn payload(p: &[u8]) -> &[u8] {
    let afc = (p[3] >> 4) & 3;
    if afc & 1 == 0 {
        return &[];
    }
    let start = if afc & 2 != 0 { 5 + p[4] as usize } else { 4 };
    &p[start.min(188)..]
}

/// PIDs of the elementary streams listed in a PMT packet: (stream_type, pid).
pub fn pmt_streams(p: &[u8]) -> Vec<(u8, u16)> {
    let pl = payload(p);
    let sec = &pl[1 + pl[0] as usize..];
    assert_eq!(sec[0], 2, "not a PMT section");
    let len = ((usize::from(sec[1]) & 0x0f) << 8) | usize::from(sec[2]);
    let prog_info = ((usize::from(sec[10]) & 0x0f) << 8) | usize::from(sec[11]);
    let mut i = 12 + prog_info;
    let end = 3 + len - 4;
    let mut out = Vec::new();
    while i + 5 <= end {
        let st = sec[i];
        let pid = (u16::from(sec[i + 1] & 0x1f) << 8) | u16::from(sec[i + 2]);
        let es_len = ((usize::from(sec[i + 3]) & 0x0f) << 8) | usize::from(sec[i + 4]);
        out.push((st, pid));
        i += 5 + es_len;
    }
    out
}

/// PMT PID from a PAT packet.
pub fn pat_pmt_pid(p: &[u8]) -> u16 {
    let pl = payload(p);
    let sec = &pl[1 + pl[0] as usize..];
    assert_eq!(sec[0], 0, "not a PAT section");
    (u16::from(sec[10] & 0x1f) << 8) | u16::from(sec[11])
}

/// H.264 NAL unit types in an Annex B byte stream.
pub fn nal_types(es: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 3 < es.len() {
        if es[i] == 0 && es[i + 1] == 0 && es[i + 2] == 1 {
            out.push(es[i + 3] & 0x1f);
            i += 3;
        } else {
            i += 1;
        }
    }
    out
}

/// PTS (90 kHz) of a PES header.
pub fn pes_pts(pes: &[u8]) -> Option<u64> {
    if pes.len() < 14 || pes[..3] != [0, 0, 1] || pes[7] & 0x80 == 0 {
        return None;
    }
    let b = &pes[9..14];
    Some(
        (u64::from(b[0] >> 1 & 7) << 30)
            | (u64::from(b[1]) << 22)
            | (u64::from(b[2] >> 1) << 15)
            | (u64::from(b[3]) << 7)
            | u64::from(b[4] >> 1),
    )
}

/// What a segment begins with, checked: PAT first, then its PMT, then the first video PES
/// (with SPS, PPS and an IDR). Returns the PTS of every video PES in the segment.
pub fn check_segment(seq: i64, seg: &[u8]) -> Vec<u64> {
    assert!(!seg.is_empty(), "segment {seq} is empty");
    assert_eq!(seg.len() % 188, 0, "segment {seq} is not whole TS packets");
    let packets: Vec<&[u8]> = seg.chunks_exact(188).collect();
    assert!(
        packets.iter().all(|p| p[0] == 0x47),
        "segment {seq}: lost sync"
    );
    assert_eq!(
        pid(packets[0]),
        0,
        "segment {seq} does not begin with a PAT"
    );
    let pmt_pid = pat_pmt_pid(packets[0]);
    assert_eq!(
        pid(packets[1]),
        pmt_pid,
        "segment {seq}: the PAT is not followed by the PMT"
    );
    let streams = pmt_streams(packets[1]);
    let video_pid = streams
        .iter()
        .find(|(st, _)| *st == 0x1b)
        .map(|(_, pid)| *pid)
        .unwrap_or_else(|| panic!("segment {seq}: no H.264 stream in the PMT {streams:?}"));
    // Reassemble the video PES packets.
    let mut pes: Vec<Vec<u8>> = Vec::new();
    for p in &packets[2..] {
        if pid(p) != video_pid {
            continue;
        }
        if pusi(p) {
            pes.push(Vec::new());
        }
        if let Some(cur) = pes.last_mut() {
            cur.extend_from_slice(payload(p));
        }
    }
    assert!(!pes.is_empty(), "segment {seq}: no video PES");
    let first = &pes[0];
    let es_start = 9 + first[8] as usize;
    let nals = nal_types(&first[es_start..]);
    for (t, what) in [(7, "SPS"), (8, "PPS"), (5, "IDR")] {
        assert!(
            nals.contains(&t),
            "segment {seq}: first video PES has no {what} (NAL types {nals:?})"
        );
    }
    pes.iter().filter_map(|p| pes_pts(p)).collect()
}

// SPDX-License-Identifier: MPL-2.0
//! tricklesink against a real trickle server: MPEG-TS pass-through, audio + video, errors,
//! properties.

mod trickle_util;

use gst::prelude::*;
use trickle_util::*;

const CAPS: &str = "video/x-raw,width=320,height=240,framerate=30/1";

fn error_text(bus: &gst::Bus) -> String {
    let msg = wait_for(bus, "an error message", |m| {
        matches!(m.view(), gst::MessageView::Error(_))
    });
    message_text(&msg).unwrap()
}

#[test]
fn muxed_ts_input_is_cut_at_keyframes_and_each_segment_gets_pat_pmt() {
    init();
    let server = TestServer::start();
    let url = server.channel("passthrough");
    let reader = collect_segments(&server, &url, 0, 100);
    // x264enc's own keyframes (every 10 frames) are not forced, so mpegtsmux does not repeat
    // PAT/PMT before them: tricklesink re-inserts them.
    let publ = pipeline(&format!(
        "videotestsrc is-live=true num-buffers=40 ! {CAPS} ! x264enc key-int-max=10 tune=zerolatency \
         speed-preset=superfast ! mpegtsmux ! tricklesink name=sink url={url} min-segment-duration=200000000"
    ));
    let sink = publ.by_name("sink").unwrap();
    publ.set_state(gst::State::Playing).unwrap();
    wait_eos(&publ.bus().unwrap());
    let ts_pad = sink.static_pad("ts").expect("the ts pad was requested");
    assert_eq!(
        ts_pad.current_caps().unwrap().structure(0).unwrap().name(),
        "video/mpegts"
    );
    let stats = sink.property::<gst::Structure>("stats");
    stop(&publ);
    let segments = reader.join().unwrap();
    assert!(segments.len() >= 3, "got {} segments", segments.len());
    for (seq, body) in &segments {
        check_segment(*seq, body);
    }
    assert_eq!(
        stats.get::<u64>("segments").unwrap(),
        segments.len() as u64,
        "{stats}"
    );
}

#[test]
fn raw_audio_and_video_are_encoded_and_decoded_back() {
    init();
    let server = TestServer::start();
    let url = server.channel("av");
    let sub = gst::Pipeline::new();
    let src = gst::ElementFactory::make("tricklesrc")
        .property("url", &url)
        .property("start-seq", 0i64)
        .build()
        .unwrap();
    sub.add(&src).unwrap();
    let vsink = gst_app::AppSink::builder().sync(false).build();
    let asink = gst_app::AppSink::builder().sync(false).build();
    sub.add_many([vsink.upcast_ref::<gst::Element>(), asink.upcast_ref()])
        .unwrap();
    {
        let (vsink, asink) = (vsink.clone(), asink.clone());
        src.connect_pad_added(move |_, pad| {
            let name = pad.name();
            let target = if name.starts_with("video_") {
                &vsink
            } else if name.starts_with("audio_") {
                &asink
            } else {
                panic!("unexpected pad {name}");
            };
            pad.link(&target.static_pad("sink").unwrap()).unwrap();
            target.sync_state_with_parent().unwrap();
        });
    }
    sub.set_state(gst::State::Playing).unwrap();
    let publ = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink name=s url={url} \
         audiotestsrc is-live=true ! audio/x-raw,rate=44100,channels=2 ! s."
    ));
    publ.set_state(gst::State::Playing).unwrap();
    let v = pull(&vsink, 3);
    let a = pull(&asink, 3);
    let vs = v[0].caps().unwrap().structure(0).unwrap().to_owned();
    assert_eq!(vs.get::<i32>("width").unwrap(), 320);
    let s = a[0].caps().unwrap().structure(0).unwrap().to_owned();
    assert_eq!(s.name(), "audio/x-raw");
    assert_eq!(s.get::<i32>("rate").unwrap(), 48_000, "Opus 48 kHz");
    assert_eq!(s.get::<i32>("channels").unwrap(), 1, "mono");
    let names: Vec<String> = src
        .src_pads()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    assert!(names.contains(&"video_0".to_owned()) && names.contains(&"audio_0".to_owned()));
    stop(&publ);
    stop(&sub);
}

#[test]
fn missing_channel_is_an_error_naming_the_url() {
    init();
    let server = TestServer::start();
    let url = server.url("not-created");
    let p = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url}"
    ));
    p.set_state(gst::State::Playing).unwrap();
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains(&url), "error does not name the URL: {text}");
    assert!(text.contains("404"), "error does not say 404: {text}");
    stop(&p);
}

#[test]
fn malformed_url_fails_the_state_change_with_a_clear_message() {
    init();
    let p = pipeline("videotestsrc ! tricklesink url=\"http://[bad\"");
    assert!(p.set_state(gst::State::Playing).is_err());
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains("http://[bad"), "unclear error: {text}");
    stop(&p);
}

#[test]
fn server_unreachable_is_retried_then_an_error_naming_the_url() {
    init();
    // A port nothing listens on: bind one, then free it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/gone");
    let p = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url} retry-pause-ms=20 connect-timeout-ms=500"
    ));
    p.set_state(gst::State::Playing).unwrap();
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains(&url), "error does not name the URL: {text}");
    assert!(
        text.contains("times in a row"),
        "error does not tell the retries: {text}"
    );
    stop(&p);
}

#[test]
fn pads_properties_and_defaults() {
    init();
    let sink = gst::ElementFactory::make("tricklesink").build().unwrap();
    assert_eq!(
        sink.property::<u64>("min-segment-duration"),
        gst::ClockTime::SECOND.nseconds()
    );
    assert_eq!(sink.property::<u64>("idr-interval"), 2_000_000_000);
    assert!(sink.property::<bool>("delete-on-close"));
    assert!(sink.property::<bool>("tls-verify"));
    assert_eq!(sink.property::<u32>("bitrate"), 2000);
    let video = sink.request_pad_simple("video_%u").unwrap();
    assert_eq!(video.name(), "video_0");
    let audio = sink.request_pad_simple("audio_%u").unwrap();
    assert_eq!(audio.name(), "audio_0");
    // A second video pad, or the ts pad beside raw pads, is refused.
    assert!(sink.request_pad_simple("video_%u").is_none());
    assert!(sink.request_pad_simple("ts").is_none());
    sink.release_request_pad(&video);
    sink.release_request_pad(&audio);
    assert!(sink.request_pad_simple("ts").is_some());
    assert!(sink.request_pad_simple("video_%u").is_none());
}

/// Issue 11 (a reader stalled at a segment boundary): when a segment's first keyframe comes
/// without PAT/PMT, the sink re-inserts copies of the last ones. The copies must continue each
/// table's continuity counter: a repeated counter is a discontinuity for a reader that reads
/// across segments (tsdemux then drops its section state, re-reads the PAT as a new one and
/// re-creates its streams). Every PID's counter must be continuous over the whole channel.
#[test]
fn continuity_counters_stay_continuous_across_segments() {
    init();
    let server = TestServer::start();
    let url = server.channel("cc");
    let reader = collect_segments(&server, &url, 0, 100);
    // As `rivulet demo` publishes: live video and audio, a segment every second of PTS.
    let publ = pipeline(&format!(
        "videotestsrc is-live=true pattern=bar horizontal-speed=4 num-buffers=150 \
           ! video/x-raw,width=640,height=360,framerate=30/1 ! tricklesink name=pub url={url} \
         audiotestsrc is-live=true samplesperbuffer=1600 num-buffers=150 \
           ! audio/x-raw,rate=48000,channels=2 ! pub."
    ));
    publ.set_state(gst::State::Playing).unwrap();
    wait_eos(&publ.bus().unwrap());
    stop(&publ);
    let segments = reader.join().unwrap();
    assert!(segments.len() >= 3, "expected several segments");
    let mut last: std::collections::HashMap<u16, u8> = Default::default();
    let mut inserted_checked = 0;
    for (seq, body) in &segments {
        for (i, p) in body.chunks_exact(188).enumerate() {
            let pid = pid(p);
            if pid == 0x1fff {
                continue;
            }
            let cc = p[3] & 0x0f;
            let has_payload = p[3] & 0x10 != 0;
            if let Some(prev) = last.get(&pid) {
                let want = if has_payload {
                    (prev + 1) & 0x0f
                } else {
                    *prev
                };
                assert_eq!(
                    cc, want,
                    "segment {seq} packet {i}: PID {pid:#x} counter {cc} after {prev}"
                );
                if i < 2 && pid == 0 {
                    inserted_checked += 1;
                }
            }
            last.insert(pid, cc);
        }
    }
    assert!(inserted_checked >= 2, "segment starts were checked");
}

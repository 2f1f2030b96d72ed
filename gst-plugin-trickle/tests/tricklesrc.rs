// SPDX-License-Identifier: MPL-2.0
//! tricklesrc against a real trickle server: errors, byte mode, corrupt segments, resync and a
//! server that goes away and comes back.

mod trickle_util;

use bytes::Bytes;
use gst::prelude::*;
use gsttrickle::protocol::client::{Publisher, PublisherConfig};
use trickle_util::*;

const CAPS: &str = "video/x-raw,width=320,height=240,framerate=30/1";

fn error_text(bus: &gst::Bus) -> String {
    let msg = wait_for(bus, "an error message", |m| {
        matches!(m.view(), gst::MessageView::Error(_))
    });
    message_text(&msg).unwrap()
}

#[test]
fn missing_channel_is_an_error_naming_the_url() {
    init();
    let server = TestServer::start();
    let url = server.url("never-created");
    let p = pipeline(&format!("tricklesrc url={url} ! fakesink"));
    p.set_state(gst::State::Playing).unwrap();
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains(&url), "error does not name the URL: {text}");
    assert!(text.contains("404"), "error does not say 404: {text}");
    stop(&p);
}

#[test]
fn unreachable_server_is_retried_then_an_error_naming_the_url() {
    init();
    // A port nothing listens on: bind one, then free it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/gone");
    let p = pipeline(&format!(
        "tricklesrc url={url} max-retries=3 retry-pause-ms=20 ! fakesink"
    ));
    p.set_state(gst::State::Playing).unwrap();
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains(&url), "error does not name the URL: {text}");
    assert!(
        text.contains("3 times"),
        "error does not tell the attempts: {text}"
    );
    stop(&p);
}

#[test]
fn malformed_url_fails_the_state_change_with_a_clear_message() {
    init();
    let src = gst::ElementFactory::make("tricklesrc")
        .property("url", "ftp://not a url")
        .build()
        .unwrap();
    let p = gst::Pipeline::new();
    let sink = gst::ElementFactory::make("fakesink").build().unwrap();
    p.add_many([&src, &sink]).unwrap();
    src.connect_pad_added(move |_, pad| {
        let _ = pad.link(&sink.static_pad("sink").unwrap());
    });
    assert!(p.set_state(gst::State::Playing).is_err());
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains("ftp://not a url"), "unclear error: {text}");
    stop(&p);

    // No URL at all.
    let p = pipeline("tricklesrc ! fakesink");
    assert!(p.set_state(gst::State::Playing).is_err());
    let text = error_text(&p.bus().unwrap());
    assert!(text.contains("No trickle URL"), "unclear error: {text}");
    stop(&p);
}

#[test]
fn byte_mode_outputs_mpegts_for_tsdemux() {
    init();
    let server = TestServer::start();
    let url = server.channel("bytes");
    let sub = pipeline(&format!(
        "tricklesrc name=src url={url} mode=bytes ! tsdemux ! h264parse ! avdec_h264 ! appsink name=out sync=false"
    ));
    sub.set_state(gst::State::Playing).unwrap();
    let publ = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url}"
    ));
    publ.set_state(gst::State::Playing).unwrap();
    let samples = pull(&appsink(&sub, "out"), 5);
    let caps = samples[0].caps().unwrap().structure(0).unwrap().to_owned();
    assert_eq!(caps.name(), "video/x-raw");
    let src_pad = sub.by_name("src").unwrap().static_pad("src").unwrap();
    let ts_caps = src_pad.current_caps().unwrap();
    let s = ts_caps.structure(0).unwrap();
    assert_eq!(s.name(), "video/mpegts");
    assert!(s.get::<bool>("systemstream").unwrap());
    assert_eq!(s.get::<i32>("packetsize").unwrap(), 188);
    stop(&publ);
    stop(&sub);
}

/// Real segments of a short stream (3 segments of 15 frames).
fn real_segments(server: &TestServer) -> Vec<Bytes> {
    let url = server.channel("source");
    let reader = collect_segments(server, &url, 0, 3);
    let publ = pipeline(&format!(
        "videotestsrc num-buffers=45 ! {CAPS} ! tricklesink url={url} delete-on-close=false \
         min-segment-duration=500000000 idr-interval=500000000"
    ));
    publ.set_state(gst::State::Playing).unwrap();
    wait_eos(&publ.bus().unwrap());
    stop(&publ);
    let segs: Vec<Bytes> = reader.join().unwrap().into_iter().map(|(_, b)| b).collect();
    assert_eq!(segs.len(), 3);
    segs
}

#[test]
fn corrupt_segment_is_skipped_with_a_warning_and_the_stream_goes_on() {
    init();
    let server = TestServer::start();
    let real = real_segments(&server);
    let url = server.channel("corrupt");
    let sub = pipeline(&format!(
        "tricklesrc url={url} start-seq=0 do-timestamp=false ! videoconvert ! appsink name=out sync=false wait-on-eos=false"
    ));
    let bus = sub.bus().unwrap();
    sub.set_state(gst::State::Playing).unwrap();

    // seq 0: real, seq 1: garbage, seq 2 and 3: real (the stream continues).
    let garbage = Bytes::from(b"this is not MPEG-TS at all. ".repeat(150));
    let bodies = [real[0].clone(), garbage, real[1].clone(), real[2].clone()];
    server.rt().block_on(async {
        let mut publisher = Publisher::new(&url, PublisherConfig::default()).unwrap();
        for body in bodies {
            publisher.send_message(body).await.unwrap();
        }
    });

    let mut warned = false;
    wait_for(&bus, "the last segment to be read", |msg| {
        if let Some(text) = message_text(msg) {
            assert!(
                matches!(msg.view(), gst::MessageView::Warning(_)),
                "unexpected error: {text}"
            );
            warned |= text.contains("not valid MPEG-TS") && text.contains(&url);
        }
        segment_message(msg).is_some_and(|s| s.get::<i64>("seq").unwrap() == 3)
    });
    assert!(warned, "no warning about the corrupt segment");
    assert!(server.server.close_channel("corrupt"));
    wait_eos(&bus);
    let out = appsink(&sub, "out");
    let mut frames = 0;
    while out.try_pull_sample(gst::ClockTime::ZERO).is_some() {
        frames += 1;
    }
    assert_eq!(frames, 45, "every frame of the three real segments decodes");
    let stats = sub
        .by_name("tricklesrc0")
        .unwrap()
        .property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u64>("corrupt-segments").unwrap(), 1);
    stop(&sub);
}

#[test]
fn subscriber_behind_the_ring_resyncs_to_the_live_edge() {
    init();
    let server = TestServer::start();
    let url = server.channel("resync");
    // 8 segments, far more than the 5 the server keeps.
    let p1 = pipeline(&format!(
        "videotestsrc num-buffers=80 ! {CAPS} ! tricklesink url={url} delete-on-close=false \
         min-segment-duration=300000000 idr-interval=300000000"
    ));
    p1.set_state(gst::State::Playing).unwrap();
    wait_eos(&p1.bus().unwrap());
    stop(&p1);

    let sub = pipeline(&format!(
        "tricklesrc name=src url={url} start-seq=0 mode=bytes ! appsink name=out sync=false"
    ));
    let bus = sub.bus().unwrap();
    sub.set_state(gst::State::Playing).unwrap();
    let p2 = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url}"
    ));
    p2.set_state(gst::State::Playing).unwrap();
    let first = pull(&appsink(&sub, "out"), 1).remove(0);
    assert!(
        first
            .buffer()
            .unwrap()
            .flags()
            .contains(gst::BufferFlags::DISCONT)
    );
    let msg = wait_for(&bus, "a segment", |m| segment_message(m).is_some());
    let seq = segment_message(&msg).unwrap().get::<i64>("seq").unwrap();
    assert!(
        seq >= 8,
        "read seq {seq}, expected to jump to the live edge"
    );
    let stats = sub
        .by_name("src")
        .unwrap()
        .property::<gst::Structure>("stats");
    assert!(stats.get::<u64>("resyncs").unwrap() >= 1, "{stats}");
    stop(&p2);
    stop(&sub);
}

#[test]
fn server_going_away_and_coming_back_is_retried() {
    init();
    let server = TestServer::start();
    let url = server.channel("flaky");
    let sub = pipeline(&format!(
        "tricklesrc url={url} ! videoconvert ! appsink name=out sync=false max-buffers=1 drop=true"
    ));
    let bus = sub.bus().unwrap();
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();
    let p1 = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url}"
    ));
    p1.set_state(gst::State::Playing).unwrap();
    pull(&out, 5);

    // Crash the server, then bring it back on the same address.
    let addr = server.kill();
    p1.set_state(gst::State::Null).unwrap();
    let server = TestServer::start_on(addr);
    assert_eq!(server.channel("flaky"), url);
    let p2 = pipeline(&format!(
        "videotestsrc is-live=true ! {CAPS} ! tricklesink url={url}"
    ));
    p2.set_state(gst::State::Playing).unwrap();
    // The appsink keeps one frame; 5 more can only come from the new server.
    pull(&out, 6);
    while let Some(msg) = bus.pop() {
        if let gst::MessageView::Error(e) = msg.view() {
            panic!("source failed instead of retrying: {}", e.error());
        }
    }
    stop(&p2);
    stop(&sub);
}

#[test]
fn properties_defaults_stats_and_byte_mode_pad() {
    init();
    let src = gst::ElementFactory::make("tricklesrc").build().unwrap();
    assert_eq!(src.property::<i64>("start-seq"), -2);
    assert_eq!(src.property::<u32>("max-retries"), 5);
    assert_eq!(src.property::<u32>("retry-pause-ms"), 500);
    assert!(src.property::<bool>("tls-verify"));
    assert!(src.property::<bool>("do-timestamp"));
    let stats = src.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u64>("segments").unwrap(), 0);
    // Byte mode exposes its `src` pad as soon as the element is READY; decode mode waits
    // for the stream.
    src.set_property_from_str("mode", "bytes");
    src.set_state(gst::State::Ready).unwrap();
    assert!(src.static_pad("src").is_some());
    src.set_state(gst::State::Null).unwrap();
    assert!(src.static_pad("src").is_none());
    src.set_property_from_str("mode", "decode");
    src.set_state(gst::State::Ready).unwrap();
    assert!(src.pads().is_empty());
    src.set_state(gst::State::Null).unwrap();
}

/// A segment whose PAT repeats the previous packet's continuity counter (what tricklesink's
/// re-inserted PAT/PMT did before it renumbered them): tsdemux re-reads the PAT as new and
/// re-creates its streams. Video and audio must both go on.
#[test]
fn demuxer_streams_recreated_mid_channel_keep_video_and_audio_going() {
    init();
    let server = TestServer::start();
    let src_url = server.channel("av-source");
    let reader = collect_segments(&server, &src_url, 0, 3);
    let publ = pipeline(&format!(
        "videotestsrc num-buffers=45 ! {CAPS} ! tricklesink name=pub url={src_url} delete-on-close=false \
         min-segment-duration=500000000 idr-interval=500000000 \
         audiotestsrc num-buffers=45 samplesperbuffer=1600 ! audio/x-raw,rate=48000,channels=2 ! pub."
    ));
    publ.set_state(gst::State::Playing).unwrap();
    wait_eos(&publ.bus().unwrap());
    stop(&publ);
    let mut segs: Vec<Vec<u8>> = reader
        .join()
        .unwrap()
        .into_iter()
        .map(|(_, b)| b.to_vec())
        .collect();
    assert_eq!(segs.len(), 3);
    // The first PAT and PMT of segment 1 repeat the last counters of segment 0.
    let pmt_pid = segs[0]
        .chunks_exact(188)
        .find(|p| pid(p) == 0)
        .map(pat_pmt_pid)
        .unwrap();
    for table in [0, pmt_pid] {
        let last_cc = segs[0]
            .chunks_exact(188)
            .rfind(|p| pid(p) == table)
            .map(|p| p[3] & 0x0f)
            .unwrap();
        let first = segs[1]
            .chunks_exact_mut(188)
            .find(|p| pid(p) == table)
            .unwrap();
        first[3] = (first[3] & 0xf0) | last_cc;
    }

    let url = server.channel("av");
    let sub = pipeline(&format!(
        "tricklesrc name=src url={url} start-seq=0 do-timestamp=false \
         src. ! videoconvert ! appsink name=out sync=false wait-on-eos=false \
         src. ! audioconvert ! appsink name=aout sync=false wait-on-eos=false"
    ));
    let bus = sub.bus().unwrap();
    sub.set_state(gst::State::Playing).unwrap();
    server.rt().block_on(async {
        let mut publisher = Publisher::new(&url, PublisherConfig::default()).unwrap();
        for body in segs {
            publisher.send_message(Bytes::from(body)).await.unwrap();
        }
    });
    wait_for(&bus, "the last segment to be read", |msg| {
        segment_message(msg).is_some_and(|s| s.get::<i64>("seq").unwrap() == 2)
    });
    assert!(server.server.close_channel("av"));
    wait_eos(&bus);
    let count = |name: &str| {
        let sink = appsink(&sub, name);
        let mut n = 0;
        while sink.try_pull_sample(gst::ClockTime::ZERO).is_some() {
            n += 1;
        }
        n
    };
    let (video, audio) = (count("out"), count("aout"));
    assert_eq!(
        video, 45,
        "every video frame decodes (audio buffers: {audio})"
    );
    assert!(audio > 0);
    stop(&sub);
}

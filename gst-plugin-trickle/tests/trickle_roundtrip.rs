// SPDX-License-Identifier: MPL-2.0
//! tricklesink -> real trickle server -> tricklesrc, end to end.

mod trickle_util;

use gst::prelude::*;
use trickle_util::*;

const W: usize = 320;
const H: usize = 240;

/// A pipeline that publishes `frames` stamped frames (30 fps PTS) through tricklesink.
fn stamped_publisher(url: &str, extra: &str) -> (gst::Pipeline, gst_app::AppSrc) {
    let p = pipeline(&format!(
        "appsrc name=in format=time caps=video/x-raw,format=I420,width={W},height={H},framerate=30/1 \
         ! tricklesink name=sink url={url} min-segment-duration=300000000 idr-interval=300000000 {extra}"
    ));
    let src = p
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    (p, src)
}

/// Push frames stamped with the indices in `range`; PTS start at 0 (a new publisher's
/// running time starts at 0 too).
fn push_frames(src: &gst_app::AppSrc, range: std::ops::Range<u32>) {
    let first = range.start;
    push_frames_at(src, range, first);
}

/// Push frames stamped with the indices in `range`, frame `first` at PTS 0.
fn push_frames_at(src: &gst_app::AppSrc, range: std::ops::Range<u32>, first: u32) {
    for n in range {
        let mut buf = gst::Buffer::from_mut_slice(stamped_i420(n, W, H));
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(
                u64::from(n - first) * 1_000_000_000 / 30,
            ));
            b.set_duration(gst::ClockTime::from_nseconds(1_000_000_000 / 30));
        }
        src.push_buffer(buf).unwrap();
    }
}

#[test]
fn roundtrip_every_frame_in_order_with_continuous_pts() {
    init();
    let server = TestServer::start();
    let url = server.channel("roundtrip");
    let frames = 60u32;

    let sub = pipeline(&format!(
        "tricklesrc url={url} start-seq=0 do-timestamp=false ! videoconvert ! video/x-raw,format=I420 ! appsink name=out sync=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();

    // The publisher is much faster than real time here; keep the channel after its EOS so
    // that the subscriber, which may lag, reads everything (a DELETE would cut it off).
    let (publ, src) = stamped_publisher(&url, "delete-on-close=false");
    let pub_bus = publ.bus().unwrap();
    publ.set_state(gst::State::Playing).unwrap();
    let mut seqs = Vec::new();
    // Feed the publisher about one segment at a time and let the subscriber catch up before
    // the next: the server keeps only 5 segments, and this publisher is far faster than real
    // time. tsdemux holds each frame until the next one begins, hence the lag of one.
    let mut samples = Vec::new();
    for chunk in (0..frames).step_by(10) {
        push_frames_at(&src, chunk..chunk + 10, 0);
        samples.extend(pull(&out, (chunk + 9) as usize - samples.len()));
    }
    src.end_of_stream().unwrap();
    wait_for(&pub_bus, "publisher EOS", |msg| {
        if let Some(s) = segment_message(msg) {
            seqs.push(s.get::<i64>("seq").unwrap());
            assert!(s.get::<u64>("bytes").unwrap() > 0);
        }
        if let gst::MessageView::Error(e) = msg.view() {
            panic!("publisher error: {}", e.error());
        }
        matches!(msg.view(), gst::MessageView::Eos(_))
    });
    // Closing the channel ends the subscriber's stream, which releases the last frame.
    assert!(server.server.close_channel("roundtrip"));
    samples.extend(pull(&out, frames as usize - samples.len()));
    wait_eos(&sub.bus().unwrap());

    let stamps: Vec<u32> = samples.iter().map(sample_stamp).collect();
    assert_eq!(
        stamps,
        (0..frames).collect::<Vec<_>>(),
        "frames lost, reordered or damaged"
    );
    let pts: Vec<gst::ClockTime> = samples
        .iter()
        .map(|s| s.buffer().unwrap().pts().unwrap())
        .collect();
    // do-timestamp=false: the stream's own PTS, exactly 1/30 s apart across segments.
    for w in pts.windows(2) {
        let d = w[1].nseconds() as i64 - w[0].nseconds() as i64;
        assert!(
            (d - 33_333_333).abs() <= 100_000,
            "PTS not continuous: {} -> {}",
            w[0],
            w[1]
        );
    }

    // Several segments were published, each reported once.
    assert!(seqs.len() >= 4, "expected several segments, got {seqs:?}");
    assert_eq!(seqs, (0..seqs.len() as i64).collect::<Vec<_>>());

    stop(&publ);
    stop(&sub);
}

#[test]
fn sink_eos_closes_the_channel_and_the_source_gets_eos() {
    init();
    let server = TestServer::start();
    let url = server.channel("eos");
    let sub = pipeline(&format!(
        "tricklesrc url={url} ! videoconvert ! appsink name=out sync=false wait-on-eos=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();
    let publ = pipeline(&format!(
        "videotestsrc is-live=true num-buffers=20 ! video/x-raw,width={W},height={H},framerate=30/1 \
         ! tricklesink url={url} min-segment-duration=200000000 idr-interval=200000000"
    ));
    publ.set_state(gst::State::Playing).unwrap();
    // The EOS message is posted only after the final empty segment and the DELETE.
    wait_eos(&publ.bus().unwrap());
    assert!(!server.server.channel_names().contains(&"eos".to_owned()));
    wait_eos(&sub.bus().unwrap());
    let mut frames = 0;
    while out.try_pull_sample(gst::ClockTime::ZERO).is_some() {
        frames += 1;
    }
    assert!(frames > 0, "the subscriber decoded nothing");
    stop(&publ);
    stop(&sub);
}

#[test]
fn every_segment_starts_with_pat_pmt_and_idr_and_timestamps_continue() {
    init();
    let server = TestServer::start();
    let url = server.channel("segments");
    let reader = collect_segments(&server, &url, 0, 100);
    let publ = pipeline(&format!(
        "videotestsrc is-live=true num-buffers=45 pattern=ball ! video/x-raw,width={W},height={H},framerate=30/1 \
         ! tricklesink url={url} min-segment-duration=200000000 idr-interval=250000000"
    ));
    publ.set_state(gst::State::Playing).unwrap();
    wait_eos(&publ.bus().unwrap());
    stop(&publ);
    let segments = reader.join().unwrap();
    assert!(
        segments.len() >= 4,
        "expected several segments, got {}",
        segments.len()
    );
    let mut last_pts = None;
    for (seq, body) in &segments {
        let pts = check_segment(*seq, body);
        if let (Some(prev), Some(first)) = (last_pts, pts.first()) {
            assert!(
                *first > prev,
                "segment {seq}: PTS restarts ({first} after {prev})"
            );
        }
        last_pts = pts.last().copied().or(last_pts);
    }
    let seqs: Vec<i64> = segments.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..seqs.len() as i64).collect::<Vec<_>>());
}

#[test]
fn subscriber_joining_mid_stream_decodes_from_its_first_segment() {
    init();
    let server = TestServer::start();
    let url = server.channel("join");
    let publ = pipeline(&format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,width={W},height={H},framerate=30/1 \
         ! tricklesink url={url} min-segment-duration=200000000 idr-interval=200000000"
    ));
    let pub_bus = publ.bus().unwrap();
    publ.set_state(gst::State::Playing).unwrap();
    wait_for(&pub_bus, "segment 2 published", |msg| {
        segment_message(msg).is_some_and(|s| s.get::<i64>("seq").unwrap() >= 2)
    });

    let sub = pipeline(&format!(
        "tricklesrc url={url} ! videoconvert ! appsink name=out sync=false"
    ));
    let sub_bus = sub.bus().unwrap();
    sub.set_state(gst::State::Playing).unwrap();
    let samples = pull(&appsink(&sub, "out"), 10);
    assert_eq!(samples.len(), 10);
    let first = wait_for(&sub_bus, "first subscribed segment", |msg| {
        segment_message(msg).is_some()
    });
    let seq = segment_message(&first).unwrap().get::<i64>("seq").unwrap();
    assert!(
        seq >= 2,
        "joined at seq {seq}, expected the current segment (>= 2)"
    );
    stop(&sub);
    stop(&publ);
}

#[test]
fn publisher_restart_mid_stream_keeps_the_subscriber_going() {
    init();
    let server = TestServer::start();
    let url = server.channel("restart");
    let sub = pipeline(&format!(
        "tricklesrc url={url} start-seq=0 ! videoconvert ! video/x-raw,format=I420 ! appsink name=out sync=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();

    // First publisher: frames 0..30, then stopped without EOS; delete-on-close=false keeps
    // the channel for the next publisher (stop only ends the preconnected POST).
    let (p1, s1) = stamped_publisher(&url, "delete-on-close=false");
    p1.set_state(gst::State::Playing).unwrap();
    push_frames(&s1, 0..30);
    let first = pull(&out, 15);
    assert_eq!(sample_stamp(&first[0]), 0);
    p1.set_state(gst::State::Null).unwrap();

    // Second publisher continues the channel (GET /next + Lp-Trickle-Reset).
    let (p2, s2) = stamped_publisher(&url, "");
    p2.set_state(gst::State::Playing).unwrap();
    push_frames(&s2, 1000..1030);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let s = out
            .try_pull_sample(gst::ClockTime::from_seconds(TIMEOUT.as_secs()))
            .expect("no frames after the publisher restart");
        if (1000..1030).contains(&sample_stamp(&s)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no frame of the second publisher"
        );
    }
    stop(&p2);
    stop(&sub);
}

#[test]
fn each_frame_is_decoded_without_waiting_for_the_next_one() {
    init();
    let server = TestServer::start();
    let url = server.channel("nowait");
    let sub = pipeline(&format!(
        "tricklesrc url={url} start-seq=0 ! videoconvert ! video/x-raw,format=I420 ! appsink name=out sync=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();
    let (publ, src) = stamped_publisher(&url, "");
    publ.set_state(gst::State::Playing).unwrap();
    // au-per-pes (default): the parser does not hold frame n until frame n+1 begins, so
    // every pushed frame comes out while the publisher waits for the next.
    for n in 0..10 {
        push_frames_at(&src, n..n + 1, 0);
        let sample = pull(&out, 1).remove(0);
        assert_eq!(sample_stamp(&sample), n);
    }
    stop(&publ);
    stop(&sub);
}

/// A 512×512 I420 frame stamped with `n` whose picture below the stamp is fresh noise, so that
/// x264 writes a large access unit every frame (well over 64 KiB: a PES that big has no
/// PES_packet_length, so the demuxer cannot tell its end from its length).
fn noisy_stamped_i420(n: u32) -> Vec<u8> {
    const S: usize = 512;
    let mut frame = stamped_i420(n, S, S);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(n).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let stamp_rows = S / STAMP_BITS as usize + 2;
    for px in &mut frame[stamp_rows * S..S * S] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *px = 32 + (x % 192) as u8;
    }
    frame
}

/// Issue 11: every access unit is released as soon as it is complete, even when the next one
/// is late. The publisher sends one large frame and then sends nothing more until the reader
/// has decoded it (a publisher that stalls after each frame); one frame is followed by a real
/// 2 s pause. Frames cross several segment boundaries (a segment every 300 ms of PTS). The
/// reader must get every frame, in order, with its PTS, within 1.5 s while the publisher waits.
#[test]
fn large_frames_are_released_when_complete_even_when_the_next_is_late() {
    init();
    const S: usize = 512;
    // Generous: far above any decode time, far below the 2 s pause.
    let bound = gst::ClockTime::from_mseconds(1500);
    let server = TestServer::start();
    let url = server.channel("late");
    let sub = pipeline(&format!(
        "tricklesrc url={url} start-seq=0 do-timestamp=false ! videoconvert ! video/x-raw,format=I420 \
         ! appsink name=out sync=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();
    let publ = pipeline(&format!(
        "appsrc name=in format=time caps=video/x-raw,format=I420,width={S},height={S},framerate=30/1 \
         ! tricklesink name=sink url={url} min-segment-duration=300000000 idr-interval=300000000 \
           bitrate=40000"
    ));
    let src = publ
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    publ.set_state(gst::State::Playing).unwrap();

    let frames = 24u32;
    let mut pts = Vec::new();
    for n in 0..frames {
        let data = noisy_stamped_i420(n);
        let mut buf = gst::Buffer::from_mut_slice(data);
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(
                u64::from(n) * 1_000_000_000 / 30,
            ));
            b.set_duration(gst::ClockTime::from_nseconds(1_000_000_000 / 30));
        }
        src.push_buffer(buf).unwrap();
        // The first frame waits for the pipelines to start (x264, first GET); every later one
        // must come out while the publisher holds the next frame back.
        let wait = if n == 0 {
            gst::ClockTime::from_seconds(TIMEOUT.as_secs())
        } else {
            bound
        };
        let sample = out.try_pull_sample(wait).unwrap_or_else(|| {
            panic!("frame {n} was not released within {wait} while the publisher waited")
        });
        assert_eq!(sample_stamp(&sample), n, "frame lost, reordered or damaged");
        pts.push(sample.buffer().unwrap().pts().unwrap());
        if n == 10 {
            // A real pause: nothing more is published for 2 s; frame 10 is already out.
            std::thread::sleep(std::time::Duration::from_secs(2));
            assert!(
                out.try_pull_sample(gst::ClockTime::ZERO).is_none(),
                "a frame came out that was never published"
            );
        }
    }
    // PTS preserved: the input's own 1/30 s steps from the first frame, across segments.
    for (n, p) in pts.iter().enumerate() {
        let want = pts[0].nseconds() + n as u64 * 1_000_000_000 / 30;
        assert!(
            (p.nseconds() as i64 - want as i64).abs() <= 100_000,
            "frame {n}: PTS {p}, expected {}",
            gst::ClockTime::from_nseconds(want)
        );
    }
    // The frames really were large (the case the test is about) and crossed segments.
    let stats = publ
        .by_name("sink")
        .unwrap()
        .property::<gst::Structure>("stats");
    let bytes = stats.get::<u64>("bytes").unwrap();
    assert!(
        bytes / u64::from(frames) > 65_535,
        "frames too small for the test: {stats}"
    );
    assert!(stats.get::<u64>("segments").unwrap() >= 2, "{stats}");
    stop(&publ);
    stop(&sub);
}

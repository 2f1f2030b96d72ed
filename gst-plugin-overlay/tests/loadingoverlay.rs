// SPDX-License-Identifier: MPL-2.0
//! `loadingoverlay` tests on `gst_check::Harness`: passthrough identity, pixel arithmetic of
//! the loading picture (greyscale, dim, mid-grey, text, spinner angle), events, messages,
//! `force`, and the RGB/I420/NV12 paths.

use gst::prelude::*;
use gst_check::Harness;
use gst_video::prelude::*;
use gstrivuletoverlay::loadingoverlay::{
    DRAWING_MESSAGE, LOADING_EVENT, ONLINE_EVENT, loading_event, online_event, render::Geometry,
};
use std::sync::{Once, mpsc};
use std::time::Duration;

const TIMEOUT: gst::ClockTime = gst::ClockTime::from_seconds(10);

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("gst init");
        gstrivuletoverlay::plugin_register_static().expect("register rivuletoverlay");
    });
}

struct Fixture {
    h: Harness,
    bus: gst::Bus,
    info: gst_video::VideoInfo,
}

fn fixture(format: &str, w: u32, h: u32) -> Fixture {
    init();
    let mut harness = Harness::new("loadingoverlay");
    let caps = format!("video/x-raw,format={format},width={w},height={h},framerate=24/1");
    harness.set_src_caps_str(&caps);
    let bus = gst::Bus::new();
    harness
        .element()
        .expect("harness element")
        .set_bus(Some(&bus));
    let info =
        gst_video::VideoInfo::from_caps(&caps.parse::<gst::Caps>().expect("caps")).expect("info");
    Fixture {
        h: harness,
        bus,
        info,
    }
}

fn ms(v: u64) -> gst::ClockTime {
    gst::ClockTime::from_mseconds(v)
}

/// A deterministic frame: each byte of plane p at (x, y) is `f(p, x, y)`.
fn frame(
    info: &gst_video::VideoInfo,
    pts: gst::ClockTime,
    f: impl Fn(u32, u32, u32) -> u8,
) -> gst::Buffer {
    let mut buf = gst::Buffer::with_size(info.size()).expect("alloc");
    {
        let b = buf.get_mut().expect("new buffer is writable");
        b.set_pts(pts);
        b.set_duration(gst::ClockTime::from_nseconds(1_000_000_000 / 24));
        let mut vf = gst_video::VideoFrameRef::from_buffer_ref_writable(b, info).expect("map");
        for p in 0..vf.n_planes() {
            let stride = vf.plane_stride()[p as usize] as u32;
            let rows = vf.plane_height(p);
            let data = vf.plane_data_mut(p).expect("plane");
            for y in 0..rows {
                for x in 0..stride {
                    data[(y * stride + x) as usize] = f(p, x, y);
                }
            }
        }
    }
    buf
}

/// An RGB test pattern with all three channels differing.
fn rgb_pattern(_p: u32, xb: u32, y: u32) -> u8 {
    let (x, c) = (xb / 3, xb % 3);
    match c {
        0 => ((x * 7 + y * 3) % 256) as u8,
        1 => ((x * 13 + y * 5 + 40) % 256) as u8,
        _ => ((x * 3 + y * 11 + 90) % 256) as u8,
    }
}

fn plane(buf: &gst::Buffer, info: &gst_video::VideoInfo, p: u32) -> (Vec<u8>, usize) {
    let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(buf.as_ref(), info).expect("map");
    (
        vf.plane_data(p).expect("plane").to_vec(),
        vf.plane_stride()[p as usize] as usize,
    )
}

fn lum(r: u8, g: u8, b: u8) -> f64 {
    0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b)
}

fn dimmed(v: f64) -> i32 {
    (v * 165.0 / 255.0).round() as i32
}

/// Whether (x, y) is away from the text and spinner (the band around the centre).
fn away(g: &Geometry, y: u32) -> bool {
    let top = g.text_bottom() - 2 * g.font_px as i32 - 4;
    let bottom = g.cy + g.radius as i32 + 2;
    (y as i32) < top || (y as i32) > bottom
}

/// Next `loadingoverlay-drawing` message: (drawing, reason, running time).
fn drawing_message(bus: &gst::Bus) -> (bool, String, Option<gst::ClockTime>) {
    let msg = bus
        .timed_pop_filtered(TIMEOUT, &[gst::MessageType::Element])
        .expect("a drawing message");
    let s = msg.structure().expect("structure");
    assert_eq!(s.name(), DRAWING_MESSAGE);
    (
        s.get::<bool>("drawing").expect("drawing"),
        s.get::<String>("reason").expect("reason"),
        s.get::<gst::ClockTime>("running-time").ok(),
    )
}

fn no_message(bus: &gst::Bus) {
    assert!(
        bus.pop_filtered(&[gst::MessageType::Element]).is_none(),
        "unexpected element message"
    );
}

/// Pulls downstream events until the custom one named `name`, returning its structure.
fn forwarded(h: &mut Harness, name: &str) -> gst::Structure {
    loop {
        let ev = h.pull_event().expect("event forwarded downstream");
        if ev.type_() == gst::EventType::CustomDownstream {
            let s = ev.structure().expect("structure").to_owned();
            if s.name() == name {
                return s;
            }
        }
    }
}

/// Angle (degrees, clockwise from 3 o'clock on screen) of the spinner's gap, found by sampling
/// the ring at 64 angles and averaging those that are not bright.
fn gap_angle(luma: &[u8], stride: usize, g: &Geometry, bright: u8) -> f64 {
    let r = f64::from(g.radius) - f64::from(g.thickness) / 2.0;
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0);
    for i in 0..64 {
        let a = f64::from(i) * 360.0 / 64.0;
        let x = (f64::from(g.cx) + r * a.to_radians().cos()).floor() as usize;
        let y = (f64::from(g.cy) + r * a.to_radians().sin()).floor() as usize;
        if luma[y * stride + x] < bright {
            sx += a.to_radians().cos();
            sy += a.to_radians().sin();
            n += 1;
        }
    }
    assert!(
        (8..=24).contains(&n),
        "gap covers {n}/64 samples, expected about 16"
    );
    sy.atan2(sx).to_degrees().rem_euclid(360.0)
}

fn angle_diff(a: f64, b: f64) -> f64 {
    let d = (a - b).rem_euclid(360.0);
    d.min(360.0 - d)
}

#[test]
fn passthrough_is_bit_exact_and_zero_copy() {
    for format in ["RGB", "I420"] {
        let mut f = fixture(format, 64, 48);
        for i in 0..3u64 {
            let buf = frame(&f.info, ms(i * 40), |p, x, y| {
                (p * 50 + x * 3 + y * 7) as u8
            });
            let expected = buf.map_readable().expect("map").to_vec();
            let ptr = buf.as_ptr();
            f.h.push(buf).expect("push");
            let out = f.h.pull().expect("pull");
            assert_eq!(out.as_ptr(), ptr, "{format}: passthrough must not copy");
            assert_eq!(
                out.map_readable().expect("map").as_slice(),
                expected.as_slice()
            );
        }
        let el = f.h.element().expect("element");
        assert!(!el.property::<bool>("drawing"));
        no_message(&f.bus);
    }
}

#[test]
fn loading_draws_the_last_frame_in_greyscale_and_dimmed() {
    let mut f = fixture("RGB", 320, 240);
    let g = Geometry::new(320, 240);
    let real = frame(&f.info, ms(0), rgb_pattern);
    let (src, stride) = plane(&real, &f.info, 0);
    f.h.push(real).expect("push real");
    f.h.pull().expect("pull real");

    assert!(f.h.push_event(loading_event("sd", "params", true)));
    let s = forwarded(&mut f.h, LOADING_EVENT);
    assert_eq!(s.get::<String>("pipeline").expect("pipeline"), "sd");
    assert_eq!(s.get::<String>("reason").expect("reason"), "params");
    assert!(s.get::<bool>("show-picture").expect("show-picture"));

    // The loading frame replaces a white frame 1 s later.
    f.h.push(frame(&f.info, ms(1000), |_, _, _| 255))
        .expect("push");
    let out = f.h.pull().expect("pull");
    assert_eq!(out.pts(), Some(ms(1000)), "timestamps are kept");
    assert_eq!(
        drawing_message(&f.bus),
        (true, "loading".into(), Some(ms(1000)))
    );

    let (dst, dstride) = plane(&out, &f.info, 0);
    let mut checked = 0;
    for y in 0..240u32 {
        for x in 0..320usize {
            let d = &dst[y as usize * dstride + 3 * x..][..3];
            assert!(d[0] == d[1] && d[1] == d[2], "grey at ({x},{y}): {d:?}");
            if away(&g, y) {
                let s = &src[y as usize * stride + 3 * x..][..3];
                let want = dimmed(lum(s[0], s[1], s[2]));
                assert!(
                    (i32::from(d[0]) - want).abs() <= 1,
                    "({x},{y}): {} vs {want} from {s:?}",
                    d[0]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 320 * 150, "checked {checked} pixels");
}

#[test]
fn mid_grey_when_the_last_frame_is_too_old() {
    let mut f = fixture("RGB", 160, 120);
    let g = Geometry::new(160, 120);
    f.h.push(frame(&f.info, ms(0), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");
    assert!(f.h.push_event(loading_event("sd", "reload", true)));

    // 4.9 s later the last frame is still used, at 5 s it is too old: mid-grey 128*165/255.
    for (t, grey) in [(4900, false), (5000, true), (7000, true)] {
        f.h.push(frame(&f.info, ms(t), |_, _, _| 255))
            .expect("push");
        let (dst, stride) = plane(&f.h.pull().expect("pull"), &f.info, 0);
        let corner: Vec<u8> = (0..160).map(|x| dst[5 * stride + 3 * x]).collect();
        if grey {
            assert!(
                corner.iter().all(|&v| (i32::from(v) - 83).abs() <= 1),
                "t={t}: {corner:?}"
            );
            for y in (0..120).filter(|&y| away(&g, y)) {
                assert!(
                    (0..160 * 3).all(|i| (i32::from(dst[y as usize * stride + i]) - 83).abs() <= 1)
                );
            }
        } else {
            assert!(
                corner.iter().any(|&v| (i32::from(v) - 83).abs() > 3),
                "t={t}: last frame expected"
            );
        }
    }
}

#[test]
fn last_frame_max_age_is_configurable_and_no_frame_means_grey() {
    init();
    // No real frame at all: mid-grey.
    let mut f = fixture("RGB", 96, 96);
    f.h.element().expect("element").set_property("force", true);
    f.h.push(frame(&f.info, ms(0), rgb_pattern)).expect("push");
    let (dst, _) = plane(&f.h.pull().expect("pull"), &f.info, 0);
    assert!((i32::from(dst[0]) - 83).abs() <= 1, "{}", dst[0]);

    // A 1 s limit: 1.5 s after the real frame the background is grey.
    let mut f = fixture("RGB", 96, 96);
    let el = f.h.element().expect("element");
    el.set_state(gst::State::Null).expect("null");
    el.set_property("last-frame-max-age", gst::ClockTime::SECOND.nseconds());
    f.h.play();
    f.h.push(frame(&f.info, ms(0), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");
    el.set_property("force", true);
    f.h.push(frame(&f.info, ms(1500), |_, _, _| 255))
        .expect("push");
    let (dst, stride) = plane(&f.h.pull().expect("pull"), &f.info, 0);
    assert!((0..96 * 3).all(|i| (i32::from(dst[2 * stride + i]) - 83).abs() <= 1));
}

#[test]
fn spinner_turns_180_degrees_per_second_of_running_time() {
    let mut f = fixture("RGB", 512, 512);
    let g = Geometry::new(512, 512);
    f.h.element().expect("element").set_property("force", true);
    let mut angles = Vec::new();
    for t in [0, 500, 1000, 1500] {
        f.h.push(frame(&f.info, ms(t), |_, _, _| 0)).expect("push");
        let (dst, stride) = plane(&f.h.pull().expect("pull"), &f.info, 0);
        // Single channel view (R) of the RGB frame.
        let r: Vec<u8> = dst.iter().step_by(3).copied().collect();
        angles.push(gap_angle(&r, stride / 3, &g, 150));
    }
    // The runner's spinner turns counter-clockwise on screen (PIL rotate); gap at 315° at t=0.
    for (i, want) in [315.0, 225.0, 135.0, 45.0].into_iter().enumerate() {
        assert!(
            angle_diff(angles[i], want) < 12.0,
            "gap at {:.1}°, expected {want}° (all: {angles:?})",
            angles[i]
        );
    }
}

#[test]
fn text_is_white_with_a_stroke_and_horizontally_centred() {
    let mut f = fixture("BGRx", 512, 512);
    let g = Geometry::new(512, 512);
    f.h.element().expect("element").set_property("force", true);
    f.h.push(frame(&f.info, ms(0), |_, _, _| 0)).expect("push");
    let (dst, stride) = plane(&f.h.pull().expect("pull"), &f.info, 0);
    let (mut min_x, mut max_x, mut min_y, mut max_y, mut white, mut stroke) =
        (usize::MAX, 0, usize::MAX, 0, 0, 0);
    for y in 0..(g.cy - g.radius as i32) as usize {
        for x in 0..512 {
            let v = dst[y * stride + 4 * x];
            if v >= 250 {
                white += 1;
                min_x = min_x.min(x);
                max_x = max_x.max(x);
                min_y = min_y.min(y);
                max_y = max_y.max(y);
            } else if v < 60 {
                stroke += 1;
            }
        }
    }
    assert!(white > 200, "only {white} white text pixels");
    assert!(stroke > 200, "only {stroke} dark stroke pixels");
    let centre = (min_x + max_x) as f64 / 2.0;
    assert!((centre - 256.0).abs() <= 2.0, "text centred at {centre}");
    // The text sits just above the spinner: bottom of the ink above text_bottom().
    assert!(
        max_y < g.text_bottom() as usize && max_y + 12 > g.text_bottom() as usize,
        "max_y {max_y}"
    );
    assert!(
        max_x - min_x > 120 && max_x - min_x < 250,
        "width {}",
        max_x - min_x
    );
}

#[test]
fn loading_and_online_events_toggle_drawing_and_messages() {
    let mut f = fixture("RGB", 64, 64);
    let el = f.h.element().expect("element");
    let (tx, rx) = mpsc::channel();
    el.connect_notify(Some("drawing"), move |el, _| {
        let _ = tx.send(el.property::<bool>("drawing"));
    });

    // show-picture=false: nothing drawn for that loading period.
    assert!(f.h.push_event(loading_event("a", "initial", false)));
    let buf = frame(&f.info, ms(0), rgb_pattern);
    let ptr = buf.as_ptr();
    f.h.push(buf).expect("push");
    assert_eq!(f.h.pull().expect("pull").as_ptr(), ptr);
    no_message(&f.bus);

    assert!(f.h.push_event(loading_event("b", "reload", true)));
    f.h.push(frame(&f.info, ms(40), rgb_pattern)).expect("push");
    assert_ne!(f.h.pull().expect("pull").as_ptr(), ptr);
    assert_eq!(
        drawing_message(&f.bus),
        (true, "loading".into(), Some(ms(40)))
    );
    assert!(rx.recv_timeout(Duration::from_secs(10)).expect("notify"));
    assert!(el.property::<bool>("drawing"));
    // Another loading event while drawing: no new message.
    assert!(f.h.push_event(loading_event("b", "again", true)));
    f.h.push(frame(&f.info, ms(80), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");
    no_message(&f.bus);

    assert!(f.h.push_event(online_event("b")));
    let s = forwarded(&mut f.h, ONLINE_EVENT);
    assert_eq!(s.get::<String>("pipeline").expect("pipeline"), "b");
    let buf = frame(&f.info, ms(120), rgb_pattern);
    let ptr = buf.as_ptr();
    f.h.push(buf).expect("push");
    assert_eq!(
        f.h.pull().expect("pull").as_ptr(),
        ptr,
        "passthrough after online"
    );
    assert_eq!(
        drawing_message(&f.bus),
        (false, "loading".into(), Some(ms(120)))
    );
    assert!(!rx.recv_timeout(Duration::from_secs(10)).expect("notify"));
    assert!(!el.property::<bool>("drawing"));

    // A flush ends a loading period at once.
    assert!(f.h.push_event(loading_event("c", "reload", true)));
    f.h.push(frame(&f.info, ms(160), rgb_pattern))
        .expect("push");
    f.h.pull().expect("pull");
    assert!(drawing_message(&f.bus).0);
    assert!(f.h.push_event(gst::event::FlushStart::new()));
    assert!(f.h.push_event(gst::event::FlushStop::new(true)));
    assert!(!drawing_message(&f.bus).0, "flush-stop stops drawing");
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_start(gst::ClockTime::ZERO);
    assert!(f.h.push_event(gst::event::Segment::new(&segment)));
    let buf = frame(&f.info, ms(0), rgb_pattern);
    let ptr = buf.as_ptr();
    f.h.push(buf).expect("push");
    assert_eq!(
        f.h.pull().expect("pull").as_ptr(),
        ptr,
        "passthrough after flush"
    );
    no_message(&f.bus);
}

#[test]
fn force_turns_drawing_on_and_off_while_playing() {
    let mut f = fixture("RGBA", 64, 64);
    let el = f.h.element().expect("element");
    assert_eq!(el.current_state(), gst::State::Playing);
    f.h.push(frame(&f.info, ms(0), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");

    el.set_property("force", true);
    f.h.push(frame(&f.info, ms(40), rgb_pattern)).expect("push");
    let (dst, _) = plane(&f.h.pull().expect("pull"), &f.info, 0);
    assert_eq!(
        drawing_message(&f.bus),
        (true, "force".into(), Some(ms(40)))
    );
    assert!(
        dst.chunks_exact(4)
            .all(|p| p[0] == p[1] && p[1] == p[2] && p[3] == 255)
    );

    // A loading event while forced changes nothing visible; force off keeps drawing for loading.
    assert!(f.h.push_event(loading_event("x", "reload", true)));
    el.set_property("force", false);
    f.h.push(frame(&f.info, ms(80), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");
    no_message(&f.bus);
    assert!(f.h.push_event(online_event("x")));
    let buf = frame(&f.info, ms(120), rgb_pattern);
    let ptr = buf.as_ptr();
    f.h.push(buf).expect("push");
    assert_eq!(f.h.pull().expect("pull").as_ptr(), ptr);
    assert_eq!(
        drawing_message(&f.bus),
        (false, "loading".into(), Some(ms(120)))
    );

    el.set_property("force", true);
    f.h.push(frame(&f.info, ms(160), rgb_pattern))
        .expect("push");
    f.h.pull().expect("pull");
    assert!(drawing_message(&f.bus).0);
    el.set_property("force", false);
    f.h.push(frame(&f.info, ms(200), rgb_pattern))
        .expect("push");
    f.h.pull().expect("pull");
    assert_eq!(
        drawing_message(&f.bus),
        (false, "force".into(), Some(ms(200)))
    );
}

#[test]
fn i420_draws_dimmed_luma_and_neutral_chroma() {
    let mut f = fixture("I420", 320, 240);
    let g = Geometry::new(320, 240);
    let real = frame(&f.info, ms(0), |p, x, y| match p {
        0 => (16 + (x * 5 + y * 3) % 220) as u8,
        _ => (x * 9 + y * 4 + p * 60) as u8,
    });
    let (src, sstride) = plane(&real, &f.info, 0);
    f.h.push(real).expect("push");
    f.h.pull().expect("pull");
    assert!(f.h.push_event(loading_event("sd", "reload", true)));
    f.h.push(frame(&f.info, ms(500), |_, _, _| 200))
        .expect("push");
    let out = f.h.pull().expect("pull");
    let (y_plane, stride) = plane(&out, &f.info, 0);
    let mut white = 0;
    for y in 0..240usize {
        for x in 0..320usize {
            let d = i32::from(y_plane[y * stride + x]);
            if away(&g, y as u32) {
                let s = f64::from(src[y * sstride + x]);
                let want = 16 + ((s - 16.0) * 165.0 / 255.0).round() as i32;
                assert!((d - want).abs() <= 1, "({x},{y}): {d} vs {want}");
            } else if d >= 233 {
                white += 1;
            }
        }
    }
    assert!(white > 50, "white text/spinner pixels in Y: {white}");
    for p in [1, 2] {
        let (c, _) = plane(&out, &f.info, p);
        assert!(c.iter().all(|&v| v == 128), "chroma plane {p} neutral");
    }
}

#[test]
fn nv12_draws_mid_grey_with_neutral_chroma() {
    let mut f = fixture("NV12", 256, 144);
    let g = Geometry::new(256, 144);
    f.h.element().expect("element").set_property("force", true);
    f.h.push(frame(&f.info, ms(0), |p, x, _| (p * 30 + x) as u8))
        .expect("push");
    let out = f.h.pull().expect("pull");
    let (y_plane, stride) = plane(&out, &f.info, 0);
    // Limited range: grey 128 -> Y 126, dimmed -> 16 + (110 * 165 / 255) = 87.
    for y in (0..144).filter(|&y| away(&g, y)) {
        for x in 0..256 {
            let v = i32::from(y_plane[y as usize * stride + x]);
            assert!((v - 87).abs() <= 1, "({x},{y}) = {v}");
        }
    }
    let bright = y_plane.iter().filter(|&&v| v > 200).count();
    assert!(bright > 30, "spinner/text visible: {bright}");
    let (uv, _) = plane(&out, &f.info, 1);
    assert!(uv.iter().all(|&v| v == 128));
}

#[test]
fn all_native_formats_draw_grey_opaque_pictures() {
    for format in [
        "RGB", "BGR", "RGBA", "BGRA", "ARGB", "ABGR", "RGBx", "BGRx", "xRGB", "xBGR", "I420",
        "YV12", "NV12", "NV21", "Y42B", "Y444",
    ] {
        let mut f = fixture(format, 48, 40);
        f.h.element().expect("element").set_property("force", true);
        f.h.push(frame(&f.info, ms(0), |p, x, y| (p * 40 + x * 7 + y) as u8))
            .expect("push");
        let out = f.h.pull().expect("pull");
        let finfo = f.info.format_info();
        let vf =
            gst_video::VideoFrameRef::from_buffer_ref_readable(out.as_ref(), &f.info).expect("map");
        let (w, h) = (f.info.width(), f.info.height());
        if finfo.is_rgb() {
            let stride = vf.plane_stride()[0] as usize;
            let data = vf.plane_data(0).expect("plane");
            let bpp = finfo.pixel_stride()[0] as usize;
            let off = finfo.poffset();
            for y in 0..h as usize {
                for x in 0..w as usize {
                    let px = &data[y * stride + x * bpp..];
                    let (r, g, b) = (
                        px[off[0] as usize],
                        px[off[1] as usize],
                        px[off[2] as usize],
                    );
                    assert!(r == g && g == b, "{format} ({x},{y})");
                    if finfo.has_alpha() {
                        assert_eq!(px[off[3] as usize], 255, "{format} alpha");
                    }
                }
            }
            // Corner is dimmed mid-grey.
            assert!(
                (i32::from(data[0..bpp].iter().copied().max().unwrap_or(0)) - 83).abs() <= 1
                    || finfo.has_alpha()
            );
        } else {
            let y0 = vf.plane_data(0).expect("Y")[0];
            assert!((i32::from(y0) - 87).abs() <= 1, "{format} Y {y0}");
            for p in 1..vf.n_planes() {
                assert!(
                    vf.plane_data(p).expect("chroma").iter().all(|&v| v == 128),
                    "{format}"
                );
            }
        }
    }
}

#[test]
fn real_picture_from_videotestsrc_becomes_a_grey_background() {
    init();
    let mut h = Harness::new("loadingoverlay");
    h.add_src_parse(
        "videotestsrc pattern=smpte ! capsfilter caps=video/x-raw,format=RGB,width=320,height=240,framerate=24/1",
        false,
    );
    h.push_from_src().expect("real frame");
    let real = h.pull().expect("pull real");
    let caps = h.sinkpad().expect("sinkpad").current_caps().expect("caps");
    let info = gst_video::VideoInfo::from_caps(&caps).expect("info");
    let (src, sstride) = plane(&real, &info, 0);
    assert!(h.push_event(loading_event("sd", "reload", true)));
    h.push_from_src().expect("second frame");
    let out = h.pull().expect("pull loading frame");
    let (dst, stride) = plane(&out, &info, 0);
    // Greyscale of the bars: e.g. the left (white-ish 192) bar and the blue bar differ.
    let at = |x: usize, y: usize| dst[y * stride + 3 * x];
    let want = |x: usize, y: usize| {
        let s = &src[y * sstride + 3 * x..][..3];
        dimmed(lum(s[0], s[1], s[2]))
    };
    for x in (5..320).step_by(45) {
        assert!(
            (i32::from(at(x, 20)) - want(x, 20)).abs() <= 1,
            "bar at x={x}"
        );
    }
    assert_ne!(at(5, 20), at(300, 20), "bars stay distinguishable");
}

#[test]
fn spinner_and_age_follow_running_time_not_pts() {
    let mut f = fixture("RGB", 512, 512);
    let g = Geometry::new(512, 512);
    // A segment starting at 10 s: PTS 10.5 s is running time 0.5 s.
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_start(gst::ClockTime::from_seconds(10));
    segment.set_time(gst::ClockTime::from_seconds(10));
    assert!(f.h.push_event(gst::event::Segment::new(&segment)));
    f.h.push(frame(&f.info, ms(10_000), rgb_pattern))
        .expect("push");
    f.h.pull().expect("pull");
    f.h.element().expect("element").set_property("force", true);
    f.h.push(frame(&f.info, ms(10_500), |_, _, _| 0))
        .expect("push");
    let out = f.h.pull().expect("pull");
    assert_eq!(
        drawing_message(&f.bus),
        (true, "force".into(), Some(ms(500)))
    );
    let (dst, stride) = plane(&out, &f.info, 0);
    // Last frame (running time 0) is 0.5 s old: used as background (not mid-grey).
    assert!((0..512).any(|x| (i32::from(dst[3 * x]) - 83).abs() > 3));
    // Spinner frame 8: gap at 225°.
    // The arc (white at alpha 230) is brighter than any dimmed background (at most 165).
    let r: Vec<u8> = dst.iter().step_by(3).copied().collect();
    let a = gap_angle(&r, stride / 3, &g, 190);
    assert!(angle_diff(a, 225.0) < 12.0, "gap at {a:.1}°");
}

#[test]
fn new_size_while_loading_uses_grey_and_untimed_buffers_are_drawn() {
    let mut f = fixture("RGB", 64, 64);
    f.h.push(frame(&f.info, ms(0), rgb_pattern)).expect("push");
    f.h.pull().expect("pull");
    assert!(f.h.push_event(loading_event("sd", "resize", true)));
    // Renegotiate to 96x80: the last real frame (64x64) is not of the same size.
    let caps = "video/x-raw,format=RGB,width=96,height=80,framerate=24/1";
    f.h.set_src_caps_str(caps);
    let info =
        gst_video::VideoInfo::from_caps(&caps.parse::<gst::Caps>().expect("caps")).expect("info");
    f.h.push(frame(&info, ms(40), |_, _, _| 255)).expect("push");
    let out = f.h.pull().expect("pull");
    assert_eq!(out.size(), info.size());
    let (dst, stride) = plane(&out, &info, 0);
    assert!((0..96 * 3).all(|i| (i32::from(dst[stride + i]) - 83).abs() <= 1));
    assert!(drawing_message(&f.bus).0);

    // A buffer without timestamps is still replaced (spinner from the last known time).
    let mut untimed = frame(&info, ms(0), |_, _, _| 255);
    untimed.make_mut().set_pts(gst::ClockTime::NONE);
    f.h.push(untimed).expect("push");
    let (dst, stride) = plane(&f.h.pull().expect("pull"), &info, 0);
    assert!((0..96 * 3).all(|i| (i32::from(dst[stride + i]) - 83).abs() <= 1));
    no_message(&f.bus);
}

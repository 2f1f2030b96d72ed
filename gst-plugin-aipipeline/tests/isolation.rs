// SPDX-License-Identifier: MPL-2.0
//! `aipipeline isolation=process`: inference in the `rivulet-inference` child. Real pipelines
//! (a live videotestsrc of one solid colour, so processed frames (inverted) and pass-through
//! frames (the colour itself) are told apart by one pixel), real child processes killed with
//! SIGKILL / stopped with SIGSTOP, the committed TorchScript test models.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Announcement, child_bin, init, testdata};
use gst::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Solid input colour (R, G, B) and what the invert model makes of it.
const COLOUR: [u8; 3] = [0x20, 0x40, 0x80];
const INVERTED: [u8; 3] = [0xdf, 0xbf, 0x7f];

#[derive(Debug)]
enum Rec {
    /// First pixel of a buffer, and when it arrived.
    Buffer([u8; 3], Instant),
    Loading(gst::Structure),
    Online,
}

struct Rig {
    pipeline: gst::Pipeline,
    el: gst::Element,
    rx: mpsc::Receiver<Rec>,
    bus: gst::Bus,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// live videotestsrc (solid COLOUR, 384², 50 fps) ! aipipeline isolation=process (props) !
/// fakesink, recording the first pixel of each buffer and our events.
fn rig(props: &str) -> Rig {
    rig_in(&testdata(), props)
}

/// [`rig`] with the manifests of `dir`.
fn rig_in(dir: &std::path::Path, props: &str) -> Rig {
    init();
    let [r, g, b] = COLOUR;
    let desc = format!(
        "videotestsrc is-live=true pattern=solid-color foreground-color=0xff{r:02x}{g:02x}{b:02x} ! \
         video/x-raw,format=RGB,width=384,height=384,framerate=50/1 ! \
         aipipeline name=ai isolation=process child-path={} pipelines-dir={} {props} ! \
         fakesink name=sink sync=false",
        child_bin(),
        dir.display()
    );
    let pipeline = common::launch(&desc);
    let el = pipeline.by_name("ai").unwrap();
    let sink = pipeline.by_name("sink").unwrap();
    let (tx, rx) = mpsc::channel();
    sink.static_pad("sink").unwrap().add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
        move |_, info| {
            let rec = match &info.data {
                Some(gst::PadProbeData::Buffer(b)) => {
                    let m = b.map_readable().unwrap();
                    Some(Rec::Buffer([m[0], m[1], m[2]], Instant::now()))
                }
                Some(gst::PadProbeData::Event(e)) => common::announcement(e).map(|a| match a {
                    Announcement::Loading(s) => Rec::Loading(s),
                    Announcement::Online(_) => Rec::Online,
                }),
                _ => None,
            };
            if let Some(r) = rec {
                let _ = tx.send(r);
            }
            gst::PadProbeReturn::Ok
        },
    );
    let bus = pipeline.bus().unwrap();
    Rig {
        pipeline,
        el,
        rx,
        bus,
    }
}

impl Rig {
    fn play(&self) {
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            panic!("pipeline failed to start: {:?}", self.error_text());
        }
    }

    fn next(&self) -> Rec {
        self.rx
            .recv_timeout(TIMEOUT)
            .expect("nothing reached the sink in time")
    }

    /// Waits (TIMEOUT at most) for a buffer with this first pixel (skipping others and events).
    fn wait_pixel(&self, want: [u8; 3]) -> Instant {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            match self.next() {
                Rec::Buffer(p, t) if p == want => return t,
                Rec::Buffer(p, _) => last = Some(p),
                _ => {}
            }
        }
        panic!("no frame with first pixel {want:?} in {TIMEOUT:?} (last one: {last:?})");
    }

    fn child_pid(&self) -> u32 {
        self.el
            .property::<gst::Structure>("stats")
            .get::<u32>("child-pid")
            .unwrap()
    }

    /// The next `aipipeline-restart` element message (fails on an error message first).
    fn restart_message(&self) -> gst::Structure {
        loop {
            let msg = self
                .bus
                .timed_pop_filtered(
                    gst::ClockTime::from_seconds(30),
                    &[gst::MessageType::Element, gst::MessageType::Error],
                )
                .expect("no restart message in time");
            match msg.view() {
                gst::MessageView::Error(e) => panic!("unexpected error {e:?}"),
                gst::MessageView::Element(e) => {
                    let s = e.structure().unwrap();
                    if s.name() == gstaipipeline::RESTART_MESSAGE {
                        return s.to_owned();
                    }
                }
                _ => {}
            }
        }
    }

    fn error_text(&self) -> String {
        let msg = self
            .bus
            .timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Error])
            .expect("no error message in time");
        match msg.view() {
            gst::MessageView::Error(e) => format!("{} {:?}", e.error(), e.debug()),
            _ => unreachable!(),
        }
    }

    /// The first warning containing `needle`.
    fn warning_with(&self, needle: &str) -> String {
        loop {
            let msg = self
                .bus
                .timed_pop_filtered(
                    gst::ClockTime::from_seconds(30),
                    &[gst::MessageType::Warning],
                )
                .unwrap_or_else(|| panic!("no warning with {needle:?} in time"));
            if let gst::MessageView::Warning(w) = msg.view() {
                let text = format!("{} {:?}", w.error(), w.debug());
                if text.contains(needle) {
                    return text;
                }
            }
        }
    }

    fn wait_online(&self) {
        loop {
            if let Rec::Online = self.next() {
                return;
            }
        }
    }
}

fn signal(pid: u32, sig: i32) {
    assert!(pid > 0);
    // SAFETY: plain syscall on a pid we own (our child).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

/// Waits (bounded) until process `pid` is gone, through a pidfd (readable on exit). A
/// zombie counts as not gone: the element must reap its children.
fn wait_gone(pid: u32, bound: Duration) -> bool {
    wait_exit(pid, bound, true)
}

/// Waits (bounded) until `pid` has exited; with `reaped`, also until it was reaped.
fn wait_exit(pid: u32, bound: Duration, reaped: bool) -> bool {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        // ESRCH: already gone and reaped.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, bound.as_millis() as i32) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if r != 1 {
        return false;
    }
    if !reaped {
        return true;
    }
    // Exited; now wait for the reap (the /proc entry goes away), bounded.
    let deadline = Instant::now() + bound;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn field_str(s: &gst::StructureRef, f: &str) -> String {
    s.get::<String>(f).unwrap_or_default()
}

#[test]
fn sigkill_mid_stream_gives_loading_frames_then_real_frames_again() {
    let r = rig("pipeline=invert");
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    assert!(pid > 0, "stats has the child's pid");
    let killed = Instant::now();
    signal(pid, libc::SIGKILL);
    // The loss is seen at the next frame: a restart loading event, then pass-through frames
    // (the loading picture's cue for loadingoverlay) within 1 s of the kill.
    loop {
        match r.next() {
            Rec::Loading(s) => {
                assert_eq!(field_str(&s, "reason"), "restart");
                assert!(s.get::<bool>("show-picture").unwrap());
                break;
            }
            Rec::Buffer(..) => {}
            Rec::Online => panic!("online before loading"),
        }
    }
    let first_loading = r.wait_pixel(COLOUR);
    assert!(
        first_loading.duration_since(killed) < Duration::from_secs(1),
        "loading frames {:?} after the kill",
        first_loading.duration_since(killed)
    );
    let m = r.restart_message();
    assert_eq!(m.get::<u32>("restart-count").unwrap(), 1);
    assert_eq!(m.get::<u32>("pid").unwrap(), pid);
    let reason = field_str(&m, "reason");
    assert!(
        reason.contains("died") && reason.contains("signal 9"),
        "{reason}"
    );
    let logs = field_str(&m, "logs");
    assert!(logs.contains("loaded"), "child logs: {logs}");
    // Real frames resume after the online event.
    r.wait_online();
    r.wait_pixel(INVERTED);
    let new_pid = r.child_pid();
    assert!(new_pid > 0 && new_pid != pid);
    assert!(wait_gone(pid, TIMEOUT), "the killed child was not reaped");
    let stats = r.el.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u32>("restart-count").unwrap(), 1);
    assert_eq!(
        r.el.property::<gstaipipeline::Status>("status"),
        gstaipipeline::Status::Ready
    );
    // Stopping ends the new child (graceful shutdown, reaped).
    r.pipeline.set_state(gst::State::Null).unwrap();
    assert!(
        wait_gone(new_pid, TIMEOUT),
        "the child outlived the element"
    );
}

#[test]
fn crashes_beyond_max_restarts_are_an_element_error() {
    let r = rig("pipeline=invert max-restarts=2");
    r.play();
    for n in 1..=3u32 {
        if n > 1 {
            r.wait_online();
        }
        r.wait_pixel(INVERTED);
        let pid = r.child_pid();
        signal(pid, libc::SIGKILL);
        if n <= 2 {
            assert_eq!(r.restart_message().get::<u32>("restart-count").unwrap(), n);
        }
        assert!(wait_gone(pid, TIMEOUT));
    }
    let err = r.error_text();
    assert!(err.contains("inference child crashed 3 times"), "{err}");
    assert_eq!(
        r.el.property::<gstaipipeline::Status>("status"),
        gstaipipeline::Status::Error
    );
}

#[test]
fn a_hung_child_is_killed_and_replaced() {
    let r = rig("pipeline=invert hang-timeout-ms=500");
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    signal(pid, libc::SIGSTOP);
    let m = r.restart_message();
    let reason = field_str(&m, "reason");
    assert!(
        reason.contains("hung") && reason.contains("500 ms"),
        "{reason}"
    );
    assert!(
        wait_gone(pid, TIMEOUT),
        "the stopped child was not killed and reaped"
    );
    r.wait_online();
    r.wait_pixel(INVERTED);
    assert_ne!(r.child_pid(), pid);
}

#[test]
fn restart_child_action_signal_replaces_the_child() {
    let r = rig("pipeline=invert");
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    r.el.emit_by_name::<()>("restart-child", &[]);
    let m = r.restart_message();
    assert!(field_str(&m, "reason").contains("restart requested"));
    assert!(wait_gone(pid, TIMEOUT));
    r.wait_online();
    r.wait_pixel(INVERTED);
}

/// `restart-child` also ends the wait for a child that stopped answering: a SIGSTOPped child
/// with a 600 s hang timeout is replaced at once (the daemon's health rule relies on this).
#[test]
fn restart_child_replaces_a_hung_child_without_the_hang_timeout() {
    let r = rig("pipeline=invert hang-timeout-ms=600000");
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    signal(pid, libc::SIGSTOP);
    // Not a wait for a result: lets a frame (50 fps) reach the stopped child, so the request
    // has to end a wait in progress.
    std::thread::sleep(Duration::from_millis(200));
    r.el.emit_by_name::<()>("restart-child", &[]);
    let m = r.restart_message();
    let reason = field_str(&m, "reason");
    assert!(reason.contains("restart-child"), "{reason}");
    assert!(
        wait_gone(pid, TIMEOUT),
        "the stopped child was not killed and reaped"
    );
    r.wait_online();
    r.wait_pixel(INVERTED);
    assert_ne!(r.child_pid(), pid);
}

#[test]
fn params_without_reload_reach_the_child() {
    let r = rig(r#"pipeline=gain"#);
    r.play();
    r.wait_pixel(COLOUR); // gain 1, bias 0: the colour itself
    let pid = r.child_pid();
    r.el.set_property("params", r#"{"gain": 0.5}"#);
    r.wait_pixel([0x10, 0x20, 0x40]);
    assert_eq!(r.child_pid(), pid, "no reload, same child");
}

#[test]
fn a_reload_starts_a_new_child_and_the_old_one_exits() {
    let r = rig("pipeline=torchscript");
    r.el.set_property("model", testdata().join("invert.pt").to_str().unwrap());
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    r.el.set_property(
        "params",
        format!(
            r#"{{"model": "{}"}}"#,
            testdata().join("identity.pt").display()
        ),
    );
    r.wait_online();
    r.wait_pixel(COLOUR);
    assert_ne!(r.child_pid(), pid);
    assert!(wait_gone(pid, TIMEOUT), "the replaced child did not exit");
}

/// Four moving 640×480 videotestsrc frames in `format`.
fn four_frames(format: &str) -> Vec<gst::Buffer> {
    let frames = common::render(&format!(
        "videotestsrc num-buffers=4 pattern=smpte horizontal-speed=7 ! \
         video/x-raw,format={format},width=640,height=480,framerate=24/1 ! appsink name=sink sync=false"
    ));
    assert_eq!(frames.len(), 4);
    frames
}

/// convnet on the same frames (I420 640×480, cropped and scaled to 512²) in and out of
/// process: byte-identical output. Frames go one at a time (push, then pull the result).
#[test]
fn results_are_identical_to_in_process() {
    init();
    let frames = four_frames("I420");
    let run = |isolation: &str| -> Vec<Vec<u8>> {
        let desc = format!(
            "appsrc name=src format=time caps=video/x-raw,format=I420,width=640,height=480,framerate=24/1 ! \
             aipipeline isolation={isolation} child-path={} pipelines-dir={} pipeline=convnet ! \
             appsink name=sink sync=false",
            child_bin(),
            testdata().display()
        );
        let p = common::launch(&desc);
        let src = common::app_src(&p, "src");
        let sink = common::app_sink(&p, "sink");
        p.set_state(gst::State::Playing).unwrap();
        let mut out = Vec::new();
        for f in &frames {
            src.push_buffer(f.clone()).unwrap();
            let s = sink
                .try_pull_sample(gst::ClockTime::from_seconds(30))
                .expect("no output frame");
            out.push(s.buffer().unwrap().map_readable().unwrap().to_vec());
        }
        p.set_state(gst::State::Null).unwrap();
        out
    };
    let local = run("none");
    let child = run("process");
    assert_eq!(local.len(), 4);
    assert!(
        local == child,
        "outputs differ between in-process and child"
    );
}

#[test]
fn a_failed_load_is_retried_with_default_params() {
    // The params name a model that does not exist; {} falls back to the model property.
    let r = rig("pipeline=torchscript");
    r.el.set_property("model", testdata().join("invert.pt").to_str().unwrap());
    r.el.set_property("params", r#"{"model":"/nonexistent/model.pt"}"#);
    r.play();
    let w = r.warning_with("failed to load with params");
    assert!(w.contains("default params {}"), "{w}");
    r.wait_pixel(INVERTED);
    assert_eq!(r.el.property::<String>("params"), "{}");
}

#[test]
fn a_load_that_fails_twice_is_reported() {
    let bad = std::env::temp_dir().join(format!("isolation-bad-{}.pt", std::process::id()));
    std::fs::write(&bad, b"not a TorchScript file").unwrap();
    let r = rig("pipeline=torchscript");
    r.el.set_property("model", bad.to_str().unwrap());
    r.el.set_property("params", r#"{"model":"/nonexistent/model.pt"}"#);
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let err = r.error_text();
    assert!(
        err.contains("Cannot load pipeline 'torchscript' in the inference child")
            && err.contains("does not exist")
            && err.contains("retry with default params {} failed too")
            && err.contains("cannot load TorchScript model"),
        "{err}"
    );
    let _ = std::fs::remove_file(bad);
}

#[test]
fn a_child_that_dies_while_loading_is_reported() {
    // /bin/false stands for a child that aborts at once: the load sees it die.
    let r = rig("pipeline=invert child-path=/bin/false");
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let err = r.error_text();
    assert!(
        err.contains("inference child died") && err.contains("exited with status 1"),
        "{err}"
    );
}

#[test]
fn a_missing_child_binary_is_a_clear_error() {
    let r = rig("pipeline=invert child-path=/nonexistent/rivulet-inference");
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let err = r.error_text();
    assert!(
        err.contains("child-path /nonexistent/rivulet-inference is not a file"),
        "{err}"
    );
}

/// gst-launch-1.0 (the plugin from target/debug) running an isolated aipipeline is killed with
/// SIGKILL: its inference child must not survive it.
#[test]
fn killing_the_parent_leaves_no_child_behind() {
    // `cargo test` builds the cdylib beside this test binary (target/<profile>/deps) and copies
    // it up to target/<profile> only on `cargo build`; pointing GST_PLUGIN_PATH at deps/ would
    // make GStreamer try every library there, so this build's plugin gets a folder of its own.
    let exe = std::env::current_exe().unwrap();
    let built = exe.parent().unwrap().join("libgstaipipeline.so");
    assert!(built.is_file(), "{} not found", built.display());
    let plugin_dir = std::env::temp_dir().join(format!("aipipeline-launch-{}", std::process::id()));
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::fs::copy(&built, plugin_dir.join("libgstaipipeline.so")).unwrap();
    let mut launch = Command::new("gst-launch-1.0")
        .args([
            "-m",
            "videotestsrc",
            "is-live=true",
            "!",
            "video/x-raw,format=RGB,width=384,height=384,framerate=25/1",
            "!",
            "aipipeline",
            "isolation=process",
            &format!("child-path={}", child_bin()),
            &format!("pipelines-dir={}", testdata().display()),
            "pipeline=invert",
            "stats-interval-ms=200",
            "!",
            "fakesink",
        ])
        .env("GST_PLUGIN_PATH", &plugin_dir)
        .env("GST_REGISTRY", plugin_dir.join("registry.bin"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gst-launch-1.0");
    // gst-launch -m prints our stats messages: the child's pid is in them.
    let stdout = launch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("child-pid=(uint)").nth(1) {
                let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(pid) = n.parse::<u32>()
                    && pid > 0
                {
                    let _ = tx.send(pid);
                }
            }
        }
    });
    let pid = rx
        .recv_timeout(TIMEOUT)
        .expect("no child pid from gst-launch");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    launch.kill().unwrap();
    launch.wait().unwrap();
    // Exited (reaping it is the new parent's business: init or a subreaper).
    assert!(
        wait_exit(pid, Duration::from_secs(5), false),
        "inference child {pid} survived its parent"
    );
    let _ = std::fs::remove_dir_all(&plugin_dir);
}

/// A folder with the `oominvert` pipeline: out = 1 - x, but while its scalar param `oom` is at
/// least 0.5 the model raises an error whose text is libtorch's CUDA out-of-memory message
/// (an assertion op with that message, traced with tch), on the CPU. Its warm-up frame fails
/// too, so a restart with `oom` still 1 falls back to the default params `{}`.
fn oom_pipelines() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "aipipeline-oom-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = |xs: &[tch::Tensor]| {
        let ok = xs[1].lt(0.5);
        let token = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let t = ok.internal_functional_assert_async(
            "CUDA out of memory. Tried to allocate 2.00 GiB (aipipeline test model)",
            &token,
        );
        vec![xs[0].neg() + 1.0 + t * 0.0]
    };
    let x = tch::Tensor::zeros([1, 8, 8, 3], (tch::Kind::Float, tch::Device::Cpu));
    let oom = tch::Tensor::from(0f32);
    let m = tch::CModule::create_by_tracing("OomInvert", "forward", &[x, oom], &mut f).unwrap();
    m.save(dir.join("oominvert.pt")).unwrap();
    std::fs::write(
        dir.join("oominvert.toml"),
        "name = \"oominvert\"\nmodel = \"oominvert.pt\"\nwidth = 384\nheight = 384\n\
         [params]\noom = 0.0\n[[inputs]]\nparam = \"oom\"\nkind = \"scalar\"\n",
    )
    .unwrap();
    dir
}

/// The next restart loading event (skipping frames), failing on an online event first.
fn wait_restart_loading(r: &Rig) {
    loop {
        match r.next() {
            Rec::Loading(s) => {
                assert_eq!(field_str(&s, "reason"), "restart");
                assert!(s.get::<bool>("show-picture").unwrap());
                return;
            }
            Rec::Buffer(..) => {}
            Rec::Online => panic!("online before loading"),
        }
    }
}

/// A CUDA out-of-memory error on a frame (here raised by the test model on the CPU) replaces
/// the child as a crash does: restart message, loading event, pass-through frames, a new
/// child (its load with the failing params falls back to `{}`), online, real frames again.
#[test]
fn out_of_memory_in_the_child_restarts_it() {
    let dir = oom_pipelines();
    let r = rig_in(&dir, "pipeline=oominvert");
    r.play();
    r.wait_pixel(INVERTED);
    let pid = r.child_pid();
    assert!(pid > 0);
    r.el.set_property("params", r#"{"oom": 1}"#);
    wait_restart_loading(&r);
    let m = r.restart_message();
    assert_eq!(m.get::<u32>("restart-count").unwrap(), 1);
    assert_eq!(m.get::<u32>("pid").unwrap(), pid);
    let reason = field_str(&m, "reason");
    assert!(
        reason.contains("ran out of memory") && reason.contains("CUDA out of memory"),
        "{reason}"
    );
    r.wait_pixel(COLOUR);
    r.wait_online();
    r.wait_pixel(INVERTED);
    let w = r.warning_with("failed to load with params");
    assert!(w.contains("default params {}"), "{w}");
    assert!(wait_gone(pid, TIMEOUT), "the old child was not reaped");
    let new_pid = r.child_pid();
    assert!(new_pid > 0 && new_pid != pid);
    assert_eq!(r.el.property::<String>("params"), "{}");
    let stats = r.el.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u32>("restart-count").unwrap(), 1);
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
}

/// In-process, the same error reloads the model (counted and announced as a restart, pid 0).
#[test]
fn out_of_memory_in_process_reloads_the_model() {
    let dir = oom_pipelines();
    let r = rig_in(&dir, "pipeline=oominvert isolation=none");
    r.play();
    r.wait_pixel(INVERTED);
    r.el.set_property("params", r#"{"oom": 1}"#);
    wait_restart_loading(&r);
    let m = r.restart_message();
    assert_eq!(m.get::<u32>("restart-count").unwrap(), 1);
    assert_eq!(m.get::<u32>("pid").unwrap(), 0);
    assert!(
        field_str(&m, "reason").contains("CUDA out of memory"),
        "{m}"
    );
    r.wait_online();
    r.wait_pixel(INVERTED);
    assert_eq!(r.el.property::<String>("params"), "{}");
    assert_eq!(
        r.el.property::<gstaipipeline::Status>("status"),
        gstaipipeline::Status::Ready
    );
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
}

/// `gain` with these params in batch group `group` (the tests run in parallel: one group
/// name per test).
fn grouped(group: &str, params: &str) -> Rig {
    grouped_with("gain", group, params)
}

/// [`grouped`] with another pipeline of the test data.
fn grouped_with(pipeline: &str, group: &str, params: &str) -> Rig {
    let r = rig(&format!(
        "pipeline={pipeline} batch-group={group} batch-timeout-ms=20"
    ));
    r.el.set_property("params", params);
    r
}

/// The element's `batch-size` and `batch-forwards`, read together from one `stats`.
fn batch_shape(r: &Rig) -> (u32, u32) {
    let s = r.el.property::<gst::Structure>("stats");
    (
        s.get::<u32>("batch-size").unwrap(),
        s.get::<u32>("batch-forwards").unwrap(),
    )
}

/// Every buffer from now on has `want` as its first pixel, until a batch of two: returns that
/// batch's forwards (fails after 200 frames without one).
fn forwards_of_a_pair(a: &Rig, want: [u8; 3]) -> u32 {
    for _ in 0..200 {
        match a.next() {
            Rec::Buffer(p, _) => {
                assert_eq!(p, want, "a frame with a wrong result");
                let (size, forwards) = batch_shape(a);
                if size == 2 {
                    return forwards;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no batch of two frames");
}

/// The `persample` test model (out = x * gain + bias, `gain` per sample, `bias` not): two
/// members with different gains share one forward (the child stacks the gains as (2,)); a
/// member with another bias gets a forward of its own in the same batch; an element outside
/// a group gets the 0-dim gain of one frame.
#[test]
fn per_sample_inputs_share_one_forward_in_a_batch_group() {
    let a = grouped_with("persample", "per-sample", r#"{"gain": 0.5}"#);
    let b = grouped_with("persample", "per-sample", r#"{"gain": 0.25}"#);
    a.play();
    b.play();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    assert_eq!(a.child_pid(), b.child_pid(), "one child for the group");
    assert_eq!(forwards_of_a_pair(&a, [0x10, 0x20, 0x40]), 1);
    assert_eq!(forwards_of_a_pair(&b, [0x08, 0x10, 0x20]), 1);
    // The shared input (bias) differs: the batch takes two forwards, each member's result
    // stays its own.
    b.el.set_property("params", r#"{"gain": 0.25, "bias": [0.25, 0.0, 0.0]}"#);
    b.wait_pixel([0x48, 0x10, 0x20]);
    assert_eq!(forwards_of_a_pair(&b, [0x48, 0x10, 0x20]), 2);
    assert_eq!(forwards_of_a_pair(&a, [0x10, 0x20, 0x40]), 2);
    // Back to the same bias: one forward again.
    b.el.set_property("params", r#"{"gain": 0.75}"#);
    b.wait_pixel([0x18, 0x30, 0x60]);
    assert_eq!(forwards_of_a_pair(&b, [0x18, 0x30, 0x60]), 1);
    // Outside a batch group the model gets one frame with a 0-dim gain.
    let c = rig("pipeline=persample");
    c.el.set_property("params", r#"{"gain": 0.5, "bias": [0.0, 0.25, 0.0]}"#);
    c.play();
    c.wait_pixel([0x10, 0x20 + 0x40, 0x40]);
    for _ in 0..5 {
        match c.next() {
            Rec::Buffer(p, _) => assert_eq!(p, [0x10, 0x60, 0x40]),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(batch_shape(&c), (0, 0), "no batch outside a group");
}

/// A manifest whose `per_sample` is not usable is skipped with a warning naming the problem,
/// and the pipeline is then unknown: a clear error at start, no panic.
#[test]
fn a_bad_per_sample_input_is_a_clear_manifest_error() {
    let dir =
        std::env::temp_dir().join(format!("aipipeline-bad-per-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let head = "model = \"persample.pt\"\n[params]\ngain = 1.0\n[[inputs]]\n";
    std::fs::write(
        dir.join("undeclared.toml"),
        format!("name = \"undeclared\"\n{head}param = \"strength\"\nkind = \"scalar\"\nper_sample = true\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("notbool.toml"),
        format!(
            "name = \"notbool\"\n{head}param = \"gain\"\nkind = \"scalar\"\nper_sample = \"yes\"\n"
        ),
    )
    .unwrap();
    std::fs::copy(testdata().join("persample.pt"), dir.join("persample.pt")).unwrap();
    for (name, problem) in [
        (
            "undeclared",
            "inputs: param 'strength' is not declared in [params]",
        ),
        ("notbool", "expected a boolean"),
    ] {
        let r = rig_in(&dir, &format!("pipeline={name}"));
        assert!(r.pipeline.set_state(gst::State::Playing).is_err());
        let w = r.warning_with(problem);
        assert!(w.contains(&format!("{name}.toml")), "{w}");
        let err = r.error_text();
        assert!(err.contains(&format!("Unknown pipeline '{name}'")), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model that takes one frame at a time (traced with a fixed batch of 1: out = 1 - x[0:1],
/// so a stacked forward returns the wrong shape) in a batch group: its first batch of two
/// fails and is run frame by frame, and from then on the child runs its frames one at a time;
/// every frame of both members is right, none is skipped.
#[test]
fn a_model_that_cannot_batch_runs_one_frame_at_a_time_in_a_batch_group() {
    init();
    let dir = std::env::temp_dir().join(format!("aipipeline-onebatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = |xs: &[tch::Tensor]| vec![xs[0].narrow(0, 0, 1).neg() + 1.0];
    let x = tch::Tensor::zeros([1, 384, 384, 3], (tch::Kind::Float, tch::Device::Cpu));
    let m = tch::CModule::create_by_tracing("OneAtATime", "forward", &[x], &mut f).unwrap();
    m.save(dir.join("onebatch.pt")).unwrap();
    std::fs::write(
        dir.join("onebatch.toml"),
        "name = \"onebatch\"\nmodel = \"onebatch.pt\"\nwidth = 384\nheight = 384\n",
    )
    .unwrap();
    let props = "pipeline=onebatch batch-group=one-at-a-time batch-timeout-ms=20";
    let a = rig_in(&dir, props);
    let b = rig_in(&dir, props);
    a.play();
    b.play();
    a.wait_pixel(INVERTED);
    b.wait_pixel(INVERTED);
    assert_eq!(a.child_pid(), b.child_pid(), "one child for the group");
    // The failed stacked forward and the two alone (3), or already one at a time (2).
    let first = forwards_of_a_pair(&a, INVERTED);
    assert!((2..=3).contains(&first), "{first} forwards");
    assert_eq!(forwards_of_a_pair(&a, INVERTED), 2);
    assert_eq!(forwards_of_a_pair(&b, INVERTED), 2);
    let stats = a.el.property::<gst::Structure>("stats");
    assert_eq!(
        stats.get::<u64>("errors").unwrap(),
        0,
        "frames skipped: {stats}"
    );
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two elements of one batch group share one child and each gets its own params' result;
/// one leaving does not stop the other.
#[test]
fn a_batch_group_shares_one_child_with_per_element_params() {
    let a = grouped("share", r#"{"gain": 0.5}"#);
    let b = grouped("share", r#"{"gain": 0.25}"#);
    a.play();
    b.play();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    let pid = a.child_pid();
    assert!(pid > 0);
    assert_eq!(b.child_pid(), pid, "one child for the group");
    // The two live streams' frames (50 fps each, 20 ms batch timeout) meet in batches.
    let batch = |r: &Rig| {
        r.el.property::<gst::Structure>("stats")
            .get::<u32>("batch-size")
            .unwrap()
    };
    let mut paired = false;
    for _ in 0..200 {
        a.wait_pixel([0x10, 0x20, 0x40]);
        if batch(&a) == 2 {
            paired = true;
            break;
        }
    }
    assert!(paired, "no batch of two frames");
    // A live params change applies to its element only.
    b.el.set_property("params", r#"{"gain": 1.0, "bias": [0.5, 0.0, 0.0]}"#);
    b.wait_pixel([0x20 + 0x80, 0x40, 0x80]);
    a.wait_pixel([0x10, 0x20, 0x40]);
    // An element of another group (or none) has a child of its own.
    let c = grouped("share-other", r#"{"gain": 0.5}"#);
    c.play();
    c.wait_pixel([0x10, 0x20, 0x40]);
    assert_ne!(c.child_pid(), pid);
    // a leaves: b goes on with the same child.
    a.pipeline.set_state(gst::State::Null).unwrap();
    drop(a);
    for _ in 0..10 {
        b.wait_pixel([0xa0, 0x40, 0x80]);
    }
    assert_eq!(b.child_pid(), pid);
    // The last member leaving ends the child.
    b.pipeline.set_state(gst::State::Null).unwrap();
    assert!(
        wait_gone(pid, TIMEOUT),
        "the group's child outlived its members"
    );
}

/// A loss of the shared child restarts it once; every member announces the restart
/// (its own restart message and loading/online events) and gets real frames again.
#[test]
fn a_batch_group_child_loss_restarts_every_member() {
    let a = grouped("loss", r#"{"gain": 0.5}"#);
    let b = grouped("loss", r#"{"gain": 0.25}"#);
    a.play();
    b.play();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    let pid = a.child_pid();
    assert_eq!(b.child_pid(), pid);
    signal(pid, libc::SIGKILL);
    for r in [&a, &b] {
        wait_restart_loading(r);
        let m = r.restart_message();
        assert_eq!(m.get::<u32>("restart-count").unwrap(), 1);
        assert_eq!(m.get::<u32>("pid").unwrap(), pid);
        assert!(field_str(&m, "reason").contains("died"), "{m}");
    }
    a.wait_online();
    b.wait_online();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    let new_pid = a.child_pid();
    assert!(new_pid > 0 && new_pid != pid);
    assert_eq!(b.child_pid(), new_pid, "restarted once, still shared");
    assert!(wait_gone(pid, TIMEOUT));
}

#[test]
fn a_batch_group_needs_isolation_process() {
    let r = rig("pipeline=gain batch-group=x isolation=none");
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let err = r.error_text();
    assert!(
        err.contains("batch-group 'x' needs isolation=process"),
        "{err}"
    );
}

/// `restart-child` on one member replaces the shared child once, and both members see it.
#[test]
fn restart_child_on_one_batch_group_member_restarts_both() {
    let a = grouped("restart", r#"{"gain": 0.5}"#);
    let b = grouped("restart", r#"{"gain": 0.25}"#);
    a.play();
    b.play();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    let pid = a.child_pid();
    a.el.emit_by_name::<()>("restart-child", &[]);
    for r in [&a, &b] {
        let m = r.restart_message();
        assert_eq!(m.get::<u32>("restart-count").unwrap(), 1);
        assert!(field_str(&m, "reason").contains("restart-child"), "{m}");
    }
    assert!(wait_gone(pid, TIMEOUT));
    a.wait_online();
    b.wait_online();
    a.wait_pixel([0x10, 0x20, 0x40]);
    b.wait_pixel([0x08, 0x10, 0x20]);
    assert_eq!(a.child_pid(), b.child_pid());
    assert_ne!(a.child_pid(), pid);
}

// ---- input from the proposed shared-memory pool (no input copy) ----

fn zero_copy_frames(el: &gst::Element) -> u64 {
    el.property::<gst::Structure>("stats")
        .get::<u64>("input-zero-copy")
        .unwrap()
}

/// What [`feed`] saw: the output frames, the element's stats after them, and whether the
/// element proposed a pool (and VideoMeta) in the ALLOCATION query.
struct Fed {
    out: Vec<Vec<u8>>,
    stats: gst::Structure,
    pool_proposed: bool,
    video_meta: bool,
}

/// Feeds `frames` (RGB 640×480) one at a time into `aipipeline isolation=… pipeline=convnet !
/// appsink` from a pad of our own, after an ALLOCATION query on it. `from_pool`: each frame
/// is written into a buffer acquired from the pool the element proposed (as a decoder
/// writes into its downstream's buffers), else the rendered buffer is pushed as it is.
fn feed(isolation: &str, frames: &[gst::Buffer], from_pool: bool) -> Fed {
    let caps = common::caps("RGB", 640, 480);
    let desc = format!(
        "aipipeline name=ai isolation={isolation} child-path={} pipelines-dir={} pipeline=convnet ! \
         appsink name=sink sync=false",
        child_bin(),
        testdata().display()
    );
    let p = common::launch(&desc);
    let el = p.by_name("ai").unwrap();
    let sink = common::app_sink(&p, "sink");
    let src = gst::Pad::builder(gst::PadDirection::Src)
        .name("feed")
        .build();
    src.link(&el.static_pad("sink").unwrap()).unwrap();
    src.set_active(true).unwrap();
    p.set_state(gst::State::Playing).unwrap();
    assert!(src.push_event(gst::event::StreamStart::new("zero-copy")));
    assert!(src.push_event(gst::event::Caps::new(&caps)));
    assert!(
        src.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
            gst::ClockTime,
        >::new()))
    );
    let mut q = gst::query::Allocation::new(Some(&caps), true);
    assert!(src.peer_query(&mut q));
    let video_meta = q.find_allocation_meta::<gst_video::VideoMeta>().is_some();
    let pool = q.allocation_pools().next().and_then(|(p, ..)| p);
    let pool_proposed = pool.is_some();
    let pool = pool.filter(|_| from_pool).inspect(|pool| {
        let mut config = pool.config();
        let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        config.set_params(Some(&caps), info.size() as u32, 2, 0);
        config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
        pool.set_config(config).unwrap();
        pool.set_active(true).unwrap();
    });
    assert_eq!(pool.is_some(), from_pool, "no pool proposed to write into");
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let buf = match &pool {
            Some(pool) => {
                let mut b = pool.acquire_buffer(None).unwrap();
                {
                    let b = b.get_mut().unwrap();
                    b.map_writable()
                        .unwrap()
                        .copy_from_slice(&f.map_readable().unwrap());
                    b.set_pts(gst::ClockTime::from_mseconds(i as u64 * 40));
                }
                b
            }
            None => f.clone(),
        };
        assert_eq!(src.push(buf), Ok(gst::FlowSuccess::Ok));
        let s = sink
            .try_pull_sample(gst::ClockTime::from_seconds(30))
            .expect("no output frame");
        out.push(s.buffer().unwrap().map_readable().unwrap().to_vec());
    }
    let stats = el.property::<gst::Structure>("stats");
    p.set_state(gst::State::Null).unwrap();
    if let Some(pool) = pool {
        // Every buffer went back to the pool (the element holds none after stop).
        pool.set_active(false).unwrap();
    }
    Fed {
        out,
        stats,
        pool_proposed,
        video_meta,
    }
}

/// Frames written into the proposed pool's buffers reach the child without the input copy
/// and give byte-identical output to the copy path; the in-process element proposes no pool.
#[test]
fn input_from_the_proposed_pool_skips_the_copy_with_identical_results() {
    init();
    let frames = four_frames("RGB");
    let copied = feed("process", &frames, false);
    let direct = feed("process", &frames, true);
    let local = feed("none", &frames, false);
    assert!(copied.pool_proposed && copied.video_meta);
    assert_eq!(copied.stats.get::<u64>("input-zero-copy").unwrap(), 0);
    assert_eq!(direct.stats.get::<u64>("input-zero-copy").unwrap(), 4);
    assert_eq!(direct.out.len(), 4);
    assert!(
        direct.out == copied.out,
        "zero-copy output differs from the copy path"
    );
    assert!(
        direct.out == local.out,
        "zero-copy output differs from in-process"
    );
    // In-process: VideoMeta, no pool (nothing to share memory with).
    assert!(!local.pool_proposed, "isolation=none proposed a pool");
    assert!(local.video_meta);
    assert_eq!(local.stats.get::<u64>("input-zero-copy").unwrap(), 0);
}

/// videotestsrc writes into the proposed pool's buffers; after `restart-child` the new child
/// inherits the same input area, so frames keep flowing, correct, still without the copy.
#[test]
fn videotestsrc_uses_the_pool_and_restart_child_keeps_frames_correct() {
    let r = rig("pipeline=invert");
    r.play();
    r.wait_pixel(INVERTED);
    r.wait_pixel(INVERTED);
    let before = zero_copy_frames(&r.el);
    assert!(
        before > 0,
        "videotestsrc did not write into the proposed pool"
    );
    let pid = r.child_pid();
    r.el.emit_by_name::<()>("restart-child", &[]);
    let m = r.restart_message();
    assert!(field_str(&m, "reason").contains("restart requested"));
    assert!(wait_gone(pid, TIMEOUT));
    r.wait_online();
    r.wait_pixel(INVERTED);
    r.wait_pixel(INVERTED);
    assert_ne!(r.child_pid(), pid);
    let after = zero_copy_frames(&r.el);
    assert!(
        after > before,
        "no zero-copy frame after the restart ({before} before, {after} after)"
    );
}

/// At the child's own API: a frame in an input slot of the child's input area goes without
/// the copy, a heap frame and a slot of another area (an earlier run's) are copied, all with
/// identical output; a second child of the same area (a restart) reads a slot allocated
/// before it started.
#[test]
fn only_slots_of_the_childs_own_input_area_skip_the_copy() {
    use gstaipipeline::child::{
        ChildCommand, ChildProc, InputArea, InputLayout, LoadSpec, Spawner,
    };
    init();
    let frames = common::render(
        "videotestsrc num-buffers=1 pattern=smpte ! \
         video/x-raw,format=RGB,width=320,height=240,framerate=24/1 ! appsink name=sink sync=false",
    );
    let frame = frames[0].map_readable().unwrap();
    let (w, h, stride) = (320u32, 240u32, 320usize * 3);
    let area = InputArea::create().unwrap();
    let other = InputArea::create().unwrap();
    let mut own = area.alloc(frame.len()).unwrap();
    own.as_mut().copy_from_slice(&frame);
    let mut foreign = other.alloc(frame.len()).unwrap();
    foreign.as_mut().copy_from_slice(&frame);
    let spawner = Spawner::new().unwrap();
    let start = || -> ChildProc {
        let mut c = spawner
            .spawn(&ChildCommand::new(child_bin()).with_input(area.clone()))
            .unwrap();
        c.load(
            &LoadSpec {
                pipeline: "convnet".into(),
                model: None,
                pipelines_dir: Some(testdata().to_string_lossy().into_owned()),
                device: "cpu".into(),
                fp16: false,
                params: r#"{"width": 256, "height": 256}"#.into(),
                resolved: None,
            },
            TIMEOUT,
            &|| false,
        )
        .unwrap();
        c
    };
    let run = |c: &mut ChildProc, plane: &[u8]| -> (Vec<u8>, bool) {
        let layout = InputLayout::Packed {
            bpp: 3,
            first: 0,
            bgr: false,
        };
        c.frame(&[plane], &[stride], w, h, layout, 256, 256, TIMEOUT)
            .unwrap();
        (c.output().to_vec(), c.last_input_zero_copy())
    };
    let mut child = start();
    let (copied, zc_heap) = run(&mut child, &frame);
    let (direct, zc_own) = run(&mut child, own.as_ref());
    let (via_foreign, zc_foreign) = run(&mut child, foreign.as_ref());
    assert_eq!(copied.len(), 256 * 256 * 3);
    assert!(!zc_heap && zc_own && !zc_foreign);
    assert!(direct == copied && via_foreign == copied);
    drop(child.kill());
    let mut restarted = start();
    let (again, zc_again) = run(&mut restarted, own.as_ref());
    assert!(zc_again && again == copied);
}

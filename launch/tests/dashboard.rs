// SPDX-License-Identifier: MPL-2.0
//! The dashboard (`GET /`) in a real browser: a `rivulet serve` process runs a stream published
//! into its embedded trickle server, headless Chromium loads the page, and the test drives it
//! over the DevTools protocol to check that the state is shown, that both JPEG previews load and
//! change, and that the fps and latency charts are redrawn with new data.
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium` package, installed by `scripts/setup`).
//! `RIVULET_DASHBOARD_SCREENSHOT=path.png` (relative to the workspace root) also saves a
//! screenshot of the page while the stream runs: that is how `docs/dashboard.png` is made.

use base64::Engine as _;
use gst::prelude::*;
use serde_json::{Value, json};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};

mod common;
use common::TempDir;
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The runner's states while a stream runs.
const RUNNING: [&str; 3] = ["ONLINE", "DEGRADED_INPUT", "DEGRADED_INFERENCE"];

/// Headless Chromium with a DevTools port, killed on drop.
struct Chromium {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helper processes (its own process group), so that none is left
        // writing into the profile directory that is removed next.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self._dir.0).is_ok() || !self._dir.0.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spawn_chromium(url: &str) -> Chromium {
    let dir = TempDir::new("chromium");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1460,720",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", dir.0.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM} (scripts/setup installs it): {e}"));
    let rx = common::watch_for(
        child.stderr.take().unwrap(),
        "chromium",
        "DevTools listening on ws://127.0.0.1:",
    );
    let rest = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("chromium did not report its DevTools address");
    let port = rest.split('/').next().unwrap().parse().unwrap();
    Chromium {
        child,
        port,
        _dir: dir,
    }
}

/// A DevTools protocol session on one page target.
struct Cdp {
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn connect(ws_url: &str) -> Cdp {
        let hostport = ws_url
            .strip_prefix("ws://")
            .and_then(|s| s.split('/').next())
            .unwrap();
        let tcp = TcpStream::connect(hostport).unwrap();
        // Bounds every call: a page that stops answering fails the test instead of hanging it.
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (ws, _) = tungstenite::client(ws_url, tcp).expect("DevTools websocket handshake");
        Cdp { ws, next_id: 1 }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("{method}: no answer: {e}"));
            let tungstenite::Message::Text(t) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value (promises awaited).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }
}

/// What the page shows now: the state and figures as text, each preview's natural size and a
/// checksum of its pixels, and for each chart a checksum and the number of drawn pixels.
const SAMPLE_JS: &str = r#"(() => {
  const bright = (r, g, b) => r + g + b > 60;
  const sum = (d, lit_if) => { let h = 0, lit = 0;
    for (let k = 0; k < d.length; k += 4) {
      h = (Math.imul(h, 31) + d[k] + 7 * d[k + 1] + 13 * d[k + 2]) >>> 0;
      if (lit_if(d[k], d[k + 1], d[k + 2])) lit++;
    }
    return { sum: h, lit }; };
  const img = (id) => { const i = document.getElementById(id);
    if (!i.complete || !i.naturalWidth) return { w: 0, h: 0, sum: 0, lit: 0 };
    const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(i, 0, 0);
    return Object.assign({ w: i.naturalWidth, h: i.naturalHeight }, sum(g.getImageData(0, 0, c.width, c.height).data, bright)); };
  const chart = (id, lit_if) => { const c = document.getElementById(id);
    return sum(c.getContext('2d').getImageData(0, 14, c.width, c.height - 14).data, lit_if); };
  const text = (id) => document.getElementById(id).textContent;
  return { state: text('state'), pipeline: text('pipeline'), fps_in: text('fps_in'),
    fps_out: text('fps_out'), lat: text('lat'), frames: text('frames'),
    params: document.getElementById('params').value,
    input: img('input'), output: img('output'),
    // lit: pixels of the output fps line (green) and of the latency line (yellow), below the
    // legend (top 14 px)
    fpschart: chart('fpschart', (r, g, b) => g > r + 60 && g > b + 60),
    latchart: chart('latchart', (r, g, b) => r > 150 && g > 100 && b < 100 && r > g) };
})()"#;

fn num(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A live stream of scrolling colour bars with a tone, published into `url`.
fn input_pipeline(url: &str) -> gst::Pipeline {
    gst::parse::launch(&format!(
        "videotestsrc is-live=true pattern=smpte horizontal-speed=6 ! \
           video/x-raw,width=640,height=480,framerate=30/1 ! videoconvert ! \
           tricklesink name=pub url={url} min-segment-duration=500000000 \
         audiotestsrc is-live=true samplesperbuffer=1600 ! audio/x-raw,rate=48000,channels=2 ! pub."
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap()
}

/// Polls `f` every 200 ms until it returns `Some`; `within` only bounds a failure.
fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if t.elapsed() > within => panic!("{what} within {within:?}; last: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The tokio runtime the HTTP calls of a test run on (the test itself is not async: the
/// trickle elements' state changes block).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The tests of this file one at a time (each runs a daemon, a stream and a browser).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Opens the dashboard of the daemon at `base` in headless Chromium; returns once loaded.
fn open_dashboard(base: &str, get_json: &dyn Fn(String) -> Value) -> (Chromium, Cdp) {
    let page = format!("{base}/");
    let chromium = spawn_chromium(&page);
    let list_url = format!("http://127.0.0.1:{}/json/list", chromium.port);
    let ws_url = wait_for("the page target", Duration::from_secs(30), || {
        let v = get_json(list_url.clone());
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page" && t["url"].as_str() == Some(page.as_str()))
            })
            .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            .ok_or_else(|| v.to_string())
    });
    let mut cdp = Cdp::connect(&ws_url);
    wait_for("the page to load", Duration::from_secs(30), || {
        let v =
            cdp.eval("document.readyState === 'complete' && !!document.getElementById('state')");
        if v == true {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    (chromium, cdp)
}

#[test]
fn dashboard_shows_live_previews_charts_and_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::init_trickle();
    let rt = runtime();
    let http = reqwest::Client::new();
    let get = |url: String| -> (u16, Vec<u8>) {
        rt.block_on(async {
            let r = http.get(&url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        })
    };
    let get_json = |url: String| -> Value { serde_json::from_slice(&get(url).1).unwrap() };

    let d = common::spawn_daemon("dashboard", &[]);
    let base = d.base.clone();
    wait_for("health IDLE", Duration::from_secs(60), || {
        let v = get_json(format!("{base}/health"));
        if v["status"] == "IDLE" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    // No stream yet: the previews are a JSON 404.
    assert_eq!(get(format!("{base}/api/preview/output.jpg")).0, 404);

    let (chromium, mut cdp) = open_dashboard(&base, &get_json);

    // Idle: the page shows the daemon's state and "no stream" in place of both previews.
    wait_for("the idle page", Duration::from_secs(30), || {
        let daemon_state = get_json(format!("{base}/api/status"))["state"].clone();
        let v = cdp.eval(
            "({ state: document.getElementById('state').textContent, \
                placeholders: [...document.querySelectorAll('.preview')].map(p => \
                  !p.querySelector('img').hasAttribute('src') && \
                  getComputedStyle(p.querySelector('.none')).display !== 'none') })",
        );
        let ok = v["state"] == daemon_state
            && !RUNNING.contains(&v["state"].as_str().unwrap_or(""))
            && v["placeholders"] == json!([true, true]);
        if ok {
            Ok(())
        } else {
            Err(format!("{v}, daemon state {daemon_state}"))
        }
    });

    let mid = "dash0001";
    rt.block_on(async {
        for suffix in ["", "-out"] {
            common::create_channel(&http, &base, &format!("{mid}{suffix}"), "video/MP2T").await;
        }
        let start = json!({
            "subscribe_url": format!("{base}/trickle/{mid}"),
            "publish_url": format!("{base}/trickle/{mid}-out"),
            "model_id": "noop", "params": {"width": 512, "height": 512},
            "gateway_request_id": "req-dash", "manifest_id": mid, "stream_id": "s-dash"
        });
        common::start_stream(&http, &base, &start).await;
    });
    // Not on a tokio worker: the trickle elements' state changes block.
    let input = input_pipeline(&format!("{base}/trickle/{mid}"));
    input.set_state(gst::State::Playing).unwrap();

    // Frames flow out of the daemon.
    wait_for("frames out of the daemon", Duration::from_secs(60), || {
        let v = get_json(format!("{base}/api/dashboard"));
        let ok = v["frames_out"].as_u64().unwrap_or(0) > 10
            && get(format!("{base}/api/preview/output.jpg")).0 == 200;
        if ok { Ok(()) } else { Err(v.to_string()) }
    });

    // The state the daemon reports, the figures and both previews. (The page refreshes every
    // second; the state may move between ONLINE and DEGRADED_* while the stream warms up, and
    // on a loaded machine the first input frames can arrive as a burst that a first window
    // counts above 30 fps: the page must settle on a plausible input rate within the bound.)
    let first = wait_for(
        "a page showing the daemon's state, both previews and an input rate of 5-40 fps for \
         the 30 fps stream",
        Duration::from_secs(30),
        || {
            let daemon_state = get_json(format!("{base}/api/status"))["state"].clone();
            let s = cdp.eval(SAMPLE_JS);
            let ok = s["state"] == daemon_state
                && RUNNING.contains(&s["state"].as_str().unwrap_or(""))
                && s["input"]["w"].as_u64() > Some(0)
                && s["output"]["w"].as_u64() > Some(0)
                && num(&s["fps_out"]) > 0.0
                && (5.0..=40.0).contains(&num(&s["fps_in"]));
            if ok { Ok(s) } else { Err(s.to_string()) }
        },
    );
    eprintln!("first sample: {first}");
    assert_eq!(first["pipeline"], "noop");
    for p in ["input", "output"] {
        assert_eq!(first[p]["w"], 320, "{p} preview: {first}");
        assert_eq!(first[p]["h"], 320, "{p} preview: {first}");
        assert!(
            first[p]["lit"].as_u64().unwrap() > 1000,
            "{p} preview is blank: {first}"
        );
    }

    let frames: Vec<f64> = first["frames"]
        .as_str()
        .unwrap()
        .split(" / ")
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        frames.len() == 2 && frames[0] > 0.0 && frames[1] > 0.0,
        "{first}"
    );
    let params: Value = serde_json::from_str(first["params"].as_str().unwrap()).unwrap();
    assert_eq!(params, json!({"width": 512, "height": 512}));
    // Live: twice in a row, the scrolling bars change both previews, new points change both
    // charts (which then draw a line of at least two points), the frame counters grow, and the
    // inference p50 is shown (it needs a few frames, so it may be "-" in the first sample).
    let mut before = first;
    for round in 1..=2 {
        let before_ref = &before;
        let next = wait_for(
            "previews and charts to change",
            Duration::from_secs(30),
            || {
                let s = cdp.eval(SAMPLE_JS);
                let changed = |k: &str| s[k]["sum"] != before_ref[k]["sum"];
                let ok = ["input", "output", "fpschart", "latchart"]
                    .iter()
                    .all(|k| changed(k))
                    && s["frames"] != before_ref["frames"]
                    && RUNNING.contains(&s["state"].as_str().unwrap_or(""))
                    && num(&s["lat"]) >= 0.0
                    && s["fpschart"]["lit"].as_u64() > Some(20)
                    && s["latchart"]["lit"].as_u64() > Some(20);
                if ok { Ok(s) } else { Err(s.to_string()) }
            },
        );
        eprintln!("sample {round}: {next}");
        before = next;
    }
    // The params form: Apply posts the whole object to /api/params and the daemon takes it.
    let new_params = json!({"width": 512, "height": 512, "from_dashboard": true});
    cdp.eval(&format!(
        "document.getElementById('params').value = {}; document.getElementById('apply').click(); true",
        serde_json::to_string(&new_params.to_string()).unwrap()
    ));
    let applied = wait_for("the params answer", Duration::from_secs(30), || {
        let v = cdp.eval("document.getElementById('applied').textContent");
        match v.as_str() {
            Some(t) if !t.is_empty() => Ok(t.to_string()),
            _ => Err(v.to_string()),
        }
    });
    assert_eq!(applied, "200 Params updated successfully");
    assert_eq!(
        get_json(format!("{base}/api/dashboard"))["params"],
        new_params
    );
    // ... and the form then shows the daemon's params again.
    wait_for(
        "the form to show the new params",
        Duration::from_secs(30),
        || {
            let v = cdp.eval("document.getElementById('params').value");
            let shown: Value = serde_json::from_str(v.as_str().unwrap_or("")).unwrap_or_default();
            if shown == new_params && v.as_str().unwrap().contains('\n') {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );

    let screenshot = std::env::var("RIVULET_DASHBOARD_SCREENSHOT").ok();
    if screenshot.is_some() {
        // For the docs picture only: let the charts gather some history.
        std::thread::sleep(Duration::from_secs(25));
    }
    // The whole page in one picture, whatever the browser window's decorations take.
    let height = cdp
        .eval("document.documentElement.scrollHeight")
        .as_u64()
        .unwrap();
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1460, "height": height, "deviceScaleFactor": 1, "mobile": false}),
    );
    let shot = cdp.call(
        "Page.captureScreenshot",
        json!({"format": "png", "captureBeyondViewport": false}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    if let Some(path) = screenshot {
        // Relative to the workspace root (cargo runs tests in the crate's directory).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        std::fs::write(&path, &png).unwrap();
        eprintln!("screenshot saved to {}", path.display());
    }

    drop(cdp);
    drop(chromium);
    input.set_state(gst::State::Null).unwrap();
    drop(d);
}

/// The stage and job tables as the page shows them: one object per row, cell texts by key,
/// and a job's progress bar width.
const FEED_TABLES_JS: &str = r#"(() => {
  const rows = (id) => [...document.querySelectorAll('#' + id + ' tr[data-id]')].map(tr => {
    const o = { id: tr.dataset.id };
    tr.querySelectorAll('td[data-k]').forEach(td => { o[td.dataset.k] = td.textContent; });
    const bar = tr.querySelector('.bar > span');
    if (bar) o.bar = bar.style.width;
    return o; });
  return { feed: document.getElementById('feed').textContent, stages: rows('stages'), jobs: rows('jobs') };
})()"#;

/// Waits until the page's jobs table shows job `id` in `state`; returns its row.
fn wait_job_row(cdp: &mut Cdp, id: &str, state: &str, what: &str, within: Duration) -> Value {
    wait_for(what, within, || {
        let v = cdp.eval(FEED_TABLES_JS);
        let row = v["jobs"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == id).cloned());
        match row {
            Some(r) if r["state"] == state => Ok(r),
            _ => Err(v.to_string()),
        }
    })
}

/// The stage figures of a running graph and a file job's progress reach the page through the
/// realtime feed (`GET /v1/events`), live: the page fills those tables from feed events only.
#[test]
fn dashboard_shows_stage_figures_and_job_progress_from_the_feed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::init_trickle();
    const JOB_FRAMES: u32 = 48;
    let files = TempDir::new("dashboard-feed-files");
    let input_file = files.0.join("in.mp4");
    common::make_input(&input_file, JOB_FRAMES.into());
    let rt = runtime();
    let http = reqwest::Client::new();
    let get_json = |url: String| -> Value {
        rt.block_on(async { http.get(&url).send().await.unwrap().json().await.unwrap() })
    };
    let post = |url: String, body: Value| -> (u16, Value) {
        rt.block_on(async {
            let r = http.post(&url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or_default())
        })
    };
    let data_dir = files.0.join("data").to_string_lossy().to_string();
    let d = common::spawn_daemon(
        "dashboard-feed",
        &[("RIVULET_DATA_DIR", &data_dir), ("RIVULET_DEVICE", "cpu")],
    );
    let base = d.base.clone();
    let (chromium, mut cdp) = open_dashboard(&base, &get_json);
    // The page is subscribed before anything happens (the feed does not replay).
    wait_for("the feed to connect", Duration::from_secs(30), || {
        let v = cdp.eval(FEED_TABLES_JS);
        if v["feed"] == "connected" && v["stages"] == json!([]) && v["jobs"] == json!([]) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });

    // A stream through a two-stage graph: an element stage, then a pipeline stage.
    let mid = "dashfeed";
    rt.block_on(async {
        for suffix in ["", "-out"] {
            common::create_channel(&http, &base, &format!("{mid}{suffix}"), "video/MP2T").await;
        }
    });
    let (code, body) = post(
        format!("{base}/live-video-to-video"),
        json!({
            "subscribe_url": format!("{base}/trickle/{mid}"),
            "publish_url": format!("{base}/trickle/{mid}-out"),
            "model_id": "noop", "params": {},
            "pipeline": [
                {"id": "flip", "element": "videoflip", "params": {"method": "horizontal-flip"}},
                {"id": "ai", "pipeline": "noop"}],
            "gateway_request_id": "req-dash-feed", "manifest_id": mid, "stream_id": "s-dash-feed"
        }),
    );
    assert_eq!(code, 200, "{body}");
    let input = input_pipeline(&format!("{base}/trickle/{mid}"));
    input.set_state(gst::State::Playing).unwrap();

    // Both stages' rows: running, frames through, fps, the provider the daemon reports, and the
    // pipeline stage's latency.
    let frames_out = |r: &Value| -> u64 {
        r["frames"]
            .as_str()
            .and_then(|f| f.split(" / ").nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let stage_rows = |v: &Value| -> Option<(Value, Value)> {
        let rows = v["stages"].as_array()?;
        let find = |id: &str| rows.iter().find(|r| r["id"] == id).cloned();
        Some((find("flip")?, find("ai")?))
    };
    let mut before = wait_for(
        "both stages' figures on the page",
        Duration::from_secs(60),
        || {
            let v = cdp.eval(FEED_TABLES_JS);
            let ok = stage_rows(&v).is_some_and(|(flip, ai)| {
                [&flip, &ai]
                    .iter()
                    .all(|r| r["state"] == "running" && num(&r["fps"]) > 0.0 && frames_out(r) > 0)
                    && num(&ai["latency"]) >= 0.0
                    && flip["latency"] == "-"
            });
            if ok { Ok(v) } else { Err(v.to_string()) }
        },
    );
    eprintln!("stages: {before}");
    let status = get_json(format!("{base}/api/status"));
    let (flip, ai) = stage_rows(&before).unwrap();
    assert_eq!(
        flip["provider"], status["stages"][0]["provider"],
        "{status}"
    );
    assert_eq!(flip["provider"], "element videoflip");
    assert_eq!(ai["provider"], status["stages"][1]["provider"], "{status}");
    assert_eq!(flip["errors"], "0");
    assert_eq!(ai["misses"], "0");
    // Live: the figures move with each stage_stats event.
    for round in 1..=2 {
        let prev = before.clone();
        before = wait_for("the stage figures to move", Duration::from_secs(30), || {
            let v = cdp.eval(FEED_TABLES_JS);
            let (f0, a0) = stage_rows(&prev).unwrap();
            let ok = stage_rows(&v).is_some_and(|(f, a)| {
                frames_out(&f) > frames_out(&f0) && frames_out(&a) > frames_out(&a0)
            });
            if ok { Ok(v) } else { Err(v.to_string()) }
        });
        eprintln!("stages {round}: {before}");
    }

    // A file job: its row shows its progress up to 100 % and done, every frame, stages done.
    let output = files.0.join("out.ts");
    let (code, job) = post(
        format!("{base}/v1/jobs"),
        json!({"input": input_file, "output": output, "pipeline": "noop"}),
    );
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let done = wait_job_row(
        &mut cdp,
        &id,
        "done",
        "the job done on the page",
        Duration::from_secs(120),
    );
    eprintln!("job: {done}");
    assert_eq!(done["job"], id.as_str());
    assert_eq!(done["pipeline"], "noop");
    assert!(
        done["progress"].as_str().unwrap().ends_with("100.0%"),
        "{done}"
    );
    assert_eq!(done["bar"], "100%");
    assert_eq!(done["frames"], format!("{JOB_FRAMES} / {JOB_FRAMES}"));
    assert_eq!(done["stages"], "1 / 1");
    assert_eq!(done["error"], "");
    // A slow job (100 ms a frame) cancelled from its row's button: the row ends `cancelled`.
    let (code, t) = post(
        format!("{base}/v1/pipelines"),
        json!({"id": "slow", "pipeline": [
            {"id": "wait", "element": "identity", "params": {"sleep-time": 100000}}]}),
    );
    assert_eq!(code, 201, "{t}");
    let (code, job) = post(
        format!("{base}/v1/jobs"),
        json!({"input": input_file, "output": files.0.join("slow.ts"), "pipeline": "slow"}),
    );
    assert_eq!(code, 201, "{job}");
    let slow = job["id"].as_str().unwrap().to_owned();
    let sel = format!("#jobs tr[data-id=\"{slow}\"] td[data-k=cancel] button");
    wait_for(
        "the running job's cancel button",
        Duration::from_secs(60),
        || {
            let v = cdp.eval(&format!(
                "(() => {{ const b = document.querySelector('{sel}'); \
               const st = document.querySelector('#jobs tr[data-id=\"{slow}\"] td[data-k=state]'); \
               if (b && st && st.textContent === 'running') {{ b.click(); return true; }} \
               return st ? st.textContent : null; }})()"
            ));
            if v == true {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    let row = wait_job_row(
        &mut cdp,
        &slow,
        "cancelled",
        "the job cancelled on the page",
        Duration::from_secs(60),
    );
    eprintln!("cancelled job: {row}");
    assert_eq!(row["error"], "cancelled");
    assert_eq!(row["cancel"], "", "no button once ended");
    assert_eq!(
        get_json(format!("{base}/v1/jobs/{slow}"))["state"],
        "cancelled"
    );

    // The jobs' own stage events did not go into the stream's stage table.
    let v = cdp.eval(FEED_TABLES_JS);
    let ids: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, ["flip", "ai"], "{v}");

    drop(cdp);
    drop(chromium);
    input.set_state(gst::State::Null).unwrap();
    drop(d);
}

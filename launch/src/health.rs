// SPDX-License-Identifier: MPL-2.0
//! The runner's health state machine (docs/runner.md, "Health state machine"), as a pure
//! function of its inputs and a clock, so that every rule is unit-tested with an injected time.

use serde::Serialize;

/// The internal state (`/api/status` `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Loading,
    Online,
    DegradedInput,
    DegradedInference,
    Error,
    Offline,
}

impl State {
    /// `GET /health` mapping (docs/runner.md, "HTTP API").
    pub fn health(self) -> &'static str {
        match self {
            State::Loading => "LOADING",
            State::Offline => "IDLE",
            State::Error => "ERROR",
            State::Online | State::DegradedInput | State::DegradedInference => "OK",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Loading => "LOADING",
            State::Online => "ONLINE",
            State::DegradedInput => "DEGRADED_INPUT",
            State::DegradedInference => "DEGRADED_INFERENCE",
            State::Error => "ERROR",
            State::Offline => "OFFLINE",
        }
    }
}

/// Everything the rules look at. Times are Unix seconds.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub inference_alive: bool,
    pub pipeline_ready: bool,
    pub stream_running: bool,
    /// When the current inference process (or in-process pipeline) started.
    pub process_start_time: f64,
    /// Start of the current stream (0 before any stream).
    pub stream_start_time: f64,
    pub last_input_time: Option<f64>,
    pub last_output_time: Option<f64>,
    pub last_params_update_time: Option<f64>,
    pub pipeline_ready_time: Option<f64>,
    pub input_fps: f64,
    pub output_fps: f64,
    pub last_error_time: Option<f64>,
    pub last_restart_time: Option<f64>,
    /// The pipeline name: `comfyui` has T = 30 s.
    pub pipeline: String,
}

/// What the supervisor must do after an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Rule 5: the input has been idle for 60 s (the machine's `idle_stop`): stop the stream
    /// (asked once).
    StopStreamIdle,
    /// Computed ERROR: stop the stream, then restart inference (or store ERROR, see `fatal`).
    ComputedError { fatal: bool },
    /// The state became OFFLINE: clear logging ids, restore the initial params.
    BecameOffline,
}

/// The stored part of the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub state: State,
    pub last_state_update_time: Option<f64>,
    idle_stop_requested: bool,
    /// Rule 5's idle time in seconds (60 in the runner); ERROR 30 s after it.
    idle_stop: f64,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    /// The state starts as LOADING; rule 5 stops a stream after 60 s without input.
    pub fn new() -> Self {
        Self::with_idle_stop(60.0)
    }

    /// As [`Machine::new`], with rule 5's idle time in seconds (the runner's is 60; a shorter
    /// one lets tests see the rule act).
    pub fn with_idle_stop(idle_stop: f64) -> Self {
        Machine {
            state: State::Loading,
            last_state_update_time: None,
            idle_stop_requested: false,
            idle_stop,
        }
    }

    /// Stream start: the state is set to ONLINE at once.
    pub fn on_stream_start(&mut self, now: f64) {
        self.idle_stop_requested = false;
        if self.state != State::Error {
            self.set(State::Online, now);
        }
    }

    /// Stores ERROR for good (restart limit reached, comfyui, restart failed).
    pub fn store_error(&mut self, now: f64) {
        self.set(State::Error, now);
    }

    /// An inference restart: LOADING until the new process is ready.
    pub fn on_restart(&mut self, now: f64) {
        if self.state != State::Error {
            self.set(State::Loading, now);
        }
    }

    fn set(&mut self, state: State, now: f64) {
        if self.state != state {
            self.state = state;
            self.last_state_update_time = Some(now);
        }
    }

    /// One evaluation (every second). `restart_count` decides whether a computed ERROR is fatal.
    pub fn evaluate(&mut self, i: &Inputs, now: f64, restart_count: u32) -> Vec<Action> {
        let mut actions = Vec::new();
        let computed = self.compute(i, now, &mut actions);
        match computed {
            State::Error if self.state != State::Error => {
                let fatal = restart_count >= 3 || i.pipeline == "comfyui";
                actions.push(Action::ComputedError { fatal });
                if fatal {
                    self.set(State::Error, now);
                } else {
                    self.set(State::Loading, now);
                }
            }
            State::Offline => {
                if self.state != State::Offline {
                    actions.push(Action::BecameOffline);
                }
                self.set(State::Offline, now);
            }
            s => self.set(s, now),
        }
        actions
    }

    fn compute(&mut self, i: &Inputs, now: f64, actions: &mut Vec<Action>) -> State {
        // 1. Sticky ERROR.
        if self.state == State::Error {
            return State::Error;
        }
        // 2. Inference process not alive.
        if !i.inference_alive {
            return State::Error;
        }
        let start = i.process_start_time.max(i.stream_start_time);
        let since_in = now - i.last_input_time.unwrap_or(start);
        let since_out = now - i.last_output_time.unwrap_or(0.0);
        let load_time = i
            .last_params_update_time
            .unwrap_or(f64::MIN)
            .max(i.pipeline_ready_time.unwrap_or(f64::MIN))
            .max(start);
        let since_load = (now - load_time - 2.0).max(0.0);
        let t = if i.pipeline == "comfyui" { 30.0 } else { 10.0 };
        // 3. Pipeline not ready.
        if !i.pipeline_ready {
            return if since_load > 180.0 {
                State::Error
            } else {
                State::Loading
            };
        }
        // 4. No stream.
        if !i.stream_running {
            return if i.last_input_time.is_none() || since_in > 3.0 {
                State::Offline
            } else {
                State::DegradedInput
            };
        }
        // 5. Input idle for 60 s.
        if since_in > self.idle_stop {
            if !self.idle_stop_requested {
                self.idle_stop_requested = true;
                actions.push(Action::StopStreamIdle);
            }
            return if since_in < self.idle_stop + 30.0 {
                State::DegradedInput
            } else {
                State::Error
            };
        }
        // 6. No output since the last load.
        if since_out >= since_load {
            return if since_load < 2.0 {
                State::Online
            } else if since_in > since_load {
                State::DegradedInput
            } else if since_load < t {
                State::DegradedInference
            } else {
                State::Error
            };
        }
        // 7. Output stalled while input continues.
        if since_out > since_in + 1.0 && since_out > 5.0 {
            return State::Error;
        }
        // 8. Recent error or restart.
        let recent = |t: Option<f64>, window: f64| t.is_some_and(|t| now - t < window);
        if recent(i.last_error_time, 15.0) || recent(i.last_restart_time, 60.0) {
            return State::DegradedInference;
        }
        // 9. Unhealthy input.
        if since_in > 2.0 || i.input_fps < 15.0 {
            return State::DegradedInput;
        }
        // 10. Unhealthy output.
        if since_out > 2.0 || i.output_fps < (10.0f64).min(0.8 * i.input_fps) {
            return State::DegradedInference;
        }
        // 11.
        State::Online
    }
}

/// Frames-per-second over fixed windows (docs/runner.md, "Health state machine"): recomputed
/// every `window` seconds; the first frame only opens the window.
#[derive(Debug, Clone)]
pub struct FpsWindow {
    window: f64,
    opened: Option<f64>,
    count: u64,
    fps: f64,
}

impl FpsWindow {
    pub fn new(window: f64) -> Self {
        FpsWindow {
            window,
            opened: None,
            count: 0,
            fps: 0.0,
        }
    }

    pub fn frame(&mut self, now: f64) {
        match self.opened {
            None => self.opened = Some(now),
            Some(_) => self.count += 1,
        }
        self.tick(now);
    }

    /// Closes the window when it has run its length.
    pub fn tick(&mut self, now: f64) {
        if let Some(opened) = self.opened {
            let elapsed = now - opened;
            if elapsed >= self.window {
                self.fps = self.count as f64 / elapsed;
                self.opened = Some(now);
                self.count = 0;
            }
        }
    }

    pub fn fps(&self) -> f64 {
        self.fps
    }

    pub fn reset(&mut self) {
        *self = FpsWindow::new(self.window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: f64 = 1_000_000.0;

    /// A healthy running stream at `now`: input and output flowing at 24 fps.
    fn healthy(now: f64) -> Inputs {
        Inputs {
            inference_alive: true,
            pipeline_ready: true,
            stream_running: true,
            process_start_time: T0,
            stream_start_time: T0 + 10.0,
            last_input_time: Some(now - 0.04),
            last_output_time: Some(now - 0.05),
            last_params_update_time: Some(T0 + 10.0),
            pipeline_ready_time: Some(T0 + 5.0),
            input_fps: 24.0,
            output_fps: 24.0,
            last_error_time: None,
            last_restart_time: None,
            pipeline: "noop".into(),
        }
    }

    fn eval(i: &Inputs, now: f64) -> (State, Vec<Action>) {
        let mut m = Machine::new();
        m.state = State::Online;
        let a = m.evaluate(i, now, 0);
        (m.state, a)
    }

    #[test]
    fn starts_loading_then_offline_when_ready_without_stream() {
        let mut m = Machine::new();
        assert_eq!(m.state, State::Loading);
        let mut i = healthy(T0 + 1.0);
        i.pipeline_ready = false;
        i.stream_running = false;
        i.last_input_time = None;
        i.stream_start_time = 0.0;
        m.evaluate(&i, T0 + 1.0, 0);
        assert_eq!(m.state, State::Loading);
        i.pipeline_ready = true;
        let a = m.evaluate(&i, T0 + 2.0, 0);
        assert_eq!(m.state, State::Offline);
        assert_eq!(a, vec![Action::BecameOffline]);
        assert_eq!(m.state.health(), "IDLE");
        assert_eq!(m.last_state_update_time, Some(T0 + 2.0));
    }

    #[test]
    fn rule1_error_is_sticky() {
        let now = T0 + 100.0;
        let mut m = Machine::new();
        m.store_error(now);
        m.evaluate(&healthy(now), now + 1.0, 0);
        assert_eq!(m.state, State::Error);
        m.on_stream_start(now + 2.0);
        assert_eq!(m.state, State::Error);
    }

    #[test]
    fn rule2_dead_inference_is_computed_error_and_restarts() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.inference_alive = false;
        let mut m = Machine::new();
        m.state = State::Online;
        let a = m.evaluate(&i, now, 0);
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
        assert_eq!(m.state, State::Loading);
        // With three restarts behind it, the error is stored for good.
        let mut m = Machine::new();
        m.state = State::Online;
        let a = m.evaluate(&i, now, 3);
        assert_eq!(a, vec![Action::ComputedError { fatal: true }]);
        assert_eq!(m.state, State::Error);
        // comfyui: every computed ERROR is permanent.
        i.pipeline = "comfyui".into();
        let mut m = Machine::new();
        m.state = State::Online;
        assert_eq!(
            m.evaluate(&i, now, 0),
            vec![Action::ComputedError { fatal: true }]
        );
    }

    #[test]
    fn rule3_loading_until_180s_then_error() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.pipeline_ready = false;
        // load_time = max(params update T0+10, ready T0+5, start T0+10) = T0+10.
        assert_eq!(eval(&i, T0 + 10.0 + 182.0).0, State::Loading);
        let (s, a) = eval(&i, T0 + 10.0 + 182.5);
        assert_eq!(s, State::Loading); // computed ERROR -> restart -> LOADING
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
    }

    #[test]
    fn rule4_no_stream_offline_or_grace() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.stream_running = false;
        i.last_input_time = Some(now - 2.0);
        assert_eq!(eval(&i, now).0, State::DegradedInput);
        i.last_input_time = Some(now - 3.5);
        let (s, a) = eval(&i, now);
        assert_eq!(s, State::Offline);
        assert_eq!(a, vec![Action::BecameOffline]);
        i.last_input_time = None;
        assert_eq!(eval(&i, now).0, State::Offline);
    }

    #[test]
    fn rule5_idle_input_stops_once_then_error_at_90s() {
        let now = T0 + 200.0;
        let mut i = healthy(now);
        i.last_input_time = Some(now - 61.0);
        let mut m = Machine::new();
        m.state = State::Online;
        assert_eq!(m.evaluate(&i, now, 0), vec![Action::StopStreamIdle]);
        assert_eq!(m.state, State::DegradedInput);
        // asked only once
        assert_eq!(m.evaluate(&i, now + 1.0, 0), vec![]);
        // still running at 90 s -> computed error
        let a = m.evaluate(&i, now + 30.0, 0);
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
    }

    #[test]
    fn rule5_with_a_shorter_idle_time() {
        let now = T0 + 200.0;
        let mut i = healthy(now);
        i.last_input_time = Some(now - 2.5);
        let mut m = Machine::with_idle_stop(2.0);
        m.state = State::Online;
        assert_eq!(m.evaluate(&i, now, 0), vec![Action::StopStreamIdle]);
        assert_eq!(m.state, State::DegradedInput);
        assert_eq!(m.evaluate(&i, now + 1.0, 0), vec![]);
        let a = m.evaluate(&i, now + 30.0, 0);
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
    }

    #[test]
    fn rule6_no_output_since_load() {
        // Load at T0+10 (params update), no output yet; input flowing.
        let mut i = healthy(T0 + 11.0);
        i.last_output_time = None;
        // since_load < 2 -> ONLINE
        i.last_input_time = Some(T0 + 13.0);
        assert_eq!(eval(&i, T0 + 13.5).0, State::Online);
        // since_load = 3, since_in 0.5 -> DEGRADED_INFERENCE (< T)
        i.last_input_time = Some(T0 + 14.5);
        assert_eq!(eval(&i, T0 + 15.0).0, State::DegradedInference);
        // input older than the load -> DEGRADED_INPUT
        i.last_input_time = Some(T0 + 10.5);
        assert_eq!(eval(&i, T0 + 15.0).0, State::DegradedInput);
        // since_load >= T with input flowing -> ERROR
        i.last_input_time = Some(T0 + 21.9);
        let (_, a) = eval(&i, T0 + 22.0);
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
        // comfyui has T = 30
        i.pipeline = "comfyui".into();
        assert_eq!(eval(&i, T0 + 22.0).0, State::DegradedInference);
    }

    #[test]
    fn rule7_output_stall_is_error() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.last_output_time = Some(now - 5.5);
        let (_, a) = eval(&i, now);
        assert_eq!(a, vec![Action::ComputedError { fatal: false }]);
        // 4 s stall is only degraded (rule 10)
        i.last_output_time = Some(now - 4.0);
        assert_eq!(eval(&i, now).0, State::DegradedInference);
    }

    #[test]
    fn rule8_recent_error_or_restart() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.last_error_time = Some(now - 14.0);
        assert_eq!(eval(&i, now).0, State::DegradedInference);
        i.last_error_time = Some(now - 16.0);
        assert_eq!(eval(&i, now).0, State::Online);
        i.last_restart_time = Some(now - 59.0);
        assert_eq!(eval(&i, now).0, State::DegradedInference);
        i.last_restart_time = Some(now - 61.0);
        assert_eq!(eval(&i, now).0, State::Online);
    }

    #[test]
    fn rule9_input_health() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.input_fps = 14.0;
        assert_eq!(eval(&i, now).0, State::DegradedInput);
        i.input_fps = 24.0;
        i.last_input_time = Some(now - 2.5);
        i.last_output_time = Some(now - 2.6);
        assert_eq!(eval(&i, now).0, State::DegradedInput);
    }

    #[test]
    fn rule10_output_health_and_rule11_online() {
        let now = T0 + 100.0;
        let mut i = healthy(now);
        i.output_fps = 9.0; // < min(10, 19.2)
        assert_eq!(eval(&i, now).0, State::DegradedInference);
        i.output_fps = 10.0;
        assert_eq!(eval(&i, now).0, State::Online);
        // With input >= 15 fps (rule 9), min(10, 0.8 x input) is always 10.
        i.input_fps = 15.0;
        i.output_fps = 9.9;
        assert_eq!(eval(&i, now).0, State::DegradedInference);
        i.last_output_time = Some(now - 2.5);
        i.output_fps = 24.0;
        assert_eq!(eval(&i, now).0, State::DegradedInference);
    }

    #[test]
    fn stream_start_sets_online_and_state_changes_are_timestamped() {
        let mut m = Machine::new();
        m.on_stream_start(T0);
        assert_eq!(m.state, State::Online);
        assert_eq!(m.last_state_update_time, Some(T0));
        // Right after start, input_fps is 0: rule 9 reports DEGRADED_INPUT (kept on purpose).
        let mut i = healthy(T0 + 3.0);
        i.stream_start_time = T0;
        i.last_params_update_time = Some(T0);
        i.pipeline_ready_time = Some(T0 - 100.0);
        i.input_fps = 0.0;
        m.evaluate(&i, T0 + 5.0, 0);
        assert_eq!(m.state, State::DegradedInput);
        assert_eq!(m.state.health(), "OK");
    }

    #[test]
    fn fps_window_first_frame_only_opens() {
        let mut w = FpsWindow::new(10.0);
        for k in 0..241 {
            w.frame(T0 + k as f64 / 24.0);
        }
        assert_eq!(w.fps(), 24.0);
        let mut w = FpsWindow::new(10.0);
        w.frame(T0);
        w.tick(T0 + 9.9);
        assert_eq!(w.fps(), 0.0);
    }
}

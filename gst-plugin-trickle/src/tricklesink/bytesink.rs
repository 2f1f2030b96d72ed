// SPDX-License-Identifier: MPL-2.0
//! The byte sink inside `tricklesink`: a `GstBaseSink` that cuts the MPEG-TS byte stream into
//! trickle segments and writes every buffer (list) to the current segment's POST at once.
//! Not registered as an element of its own; `tricklesink` creates it.

use gst::glib;
use gst::subclass::prelude::*;

glib::wrapper! {
    pub struct TrickleByteSink(ObjectSubclass<imp::TrickleByteSink>) @extends gst_base::BaseSink, gst::Element, gst::Object;
}

impl TrickleByteSink {
    pub(super) fn new(name: &str, shared: std::sync::Arc<super::imp::Shared>) -> Self {
        let obj: Self = glib::Object::builder().property("name", name).build();
        *obj.imp().shared.lock().unwrap() = Some(shared);
        obj
    }
}

mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, LazyLock, Mutex};
    use std::time::{Duration, Instant};

    use bytes::{Bytes, BytesMut};
    use gst::glib;
    use gst::prelude::*;
    use gst::subclass::prelude::*;
    use gst_base::prelude::*;
    use gst_base::subclass::prelude::*;

    use super::super::imp::{Settings, Shared};
    use super::super::ts;
    use crate::protocol::client::{
        ClientError, Publisher, PublisherConfig, SegmentOutcome, SegmentWriter,
    };
    use crate::runtime::{self, Canceller, WaitError};

    static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
        gst::DebugCategory::new(
            "tricklesink",
            gst::DebugColorFlags::empty(),
            Some("Trickle publisher sink"),
        )
    });

    /// Bound on the final flush / close on EOS and stop.
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

    struct Segment {
        writer: SegmentWriter,
        seq: i64,
        start_ts: Option<gst::ClockTime>,
        last_ts: Option<gst::ClockTime>,
        start_wall: Instant,
        bytes: u64,
    }

    #[derive(Default)]
    struct Psi {
        pat: Option<Bytes>,
        pmt_pid: Option<u16>,
        pmt: Option<Bytes>,
        /// Per table (0: PAT, 1: PMT): copies re-inserted so far (mod 16), added to the
        /// continuity counter of every later packet of that PID.
        cc_shift: [u8; 2],
        /// Per table: the continuity counter of the last packet sent.
        last_cc: [Option<u8>; 2],
    }

    impl Psi {
        fn table(&self, pid: Option<u16>) -> Option<usize> {
            match pid? {
                0 => Some(0),
                pid if Some(pid) == self.pmt_pid => Some(1),
                _ => None,
            }
        }

        /// Re-inserted copies of PAT/PMT take the next counter of their PID (a repeated
        /// counter is a discontinuity to a reader that reads across segments: tsdemux then
        /// re-reads the PAT as a new one and re-creates its streams); the muxer's later
        /// packets of that PID are shifted past them.
        fn number_copies(&mut self, packets: &mut [u8]) {
            for p in packets.chunks_exact_mut(ts::PACKET) {
                if let Some(t) = self.table(ts::pid(p)) {
                    let cc = self.last_cc[t].map_or(0, |c| (c + 1) & 0x0f);
                    p[3] = (p[3] & 0xf0) | cc;
                    self.last_cc[t] = Some(cc);
                    self.cc_shift[t] = (self.cc_shift[t] + 1) & 0x0f;
                }
            }
        }

        /// Shift the counters of the muxer's PAT/PMT packets past the inserted copies.
        fn renumber(&mut self, packets: &mut [u8]) {
            for p in packets.chunks_exact_mut(ts::PACKET) {
                if let Some(t) = self.table(ts::pid(p)) {
                    let cc = ((p[3] & 0x0f) + self.cc_shift[t]) & 0x0f;
                    p[3] = (p[3] & 0xf0) | cc;
                    self.last_cc[t] = Some(cc);
                }
            }
        }
    }

    /// Set by the tasks that finish segments in the background.
    #[derive(Default)]
    struct Flags {
        closed: AtomicBool,
        failed: AtomicBool,
    }

    struct Running {
        url: String,
        publisher: Option<Publisher>,
        segment: Option<Segment>,
        psi: Psi,
        pending: BytesMut,
        finishing: Vec<tokio::task::JoinHandle<()>>,
        flags: Arc<Flags>,
        min_duration: gst::ClockTime,
    }

    #[derive(Default)]
    pub struct TrickleByteSink {
        pub(super) shared: Mutex<Option<Arc<Shared>>>,
        running: Mutex<Option<Running>>,
        canceller: Canceller,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for TrickleByteSink {
        const NAME: &'static str = "GstTrickleByteSink";
        type Type = super::TrickleByteSink;
        type ParentType = gst_base::BaseSink;
    }

    impl ObjectImpl for TrickleByteSink {
        fn constructed(&self) {
            self.parent_constructed();
            // Upstream paces the stream; waiting on the clock would only add latency.
            self.obj().set_sync(false);
        }
    }

    impl GstObjectImpl for TrickleByteSink {}

    impl ElementImpl for TrickleByteSink {
        fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
            static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
                gst::subclass::ElementMetadata::new(
                    "Trickle byte sink",
                    "Sink/Network/HTTP",
                    "Internal part of tricklesink: publishes an MPEG-TS byte stream segment by segment",
                    "Rivulet developers",
                )
            });
            Some(&*META)
        }

        fn pad_templates() -> &'static [gst::PadTemplate] {
            static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
                vec![
                    gst::PadTemplate::new(
                        "sink",
                        gst::PadDirection::Sink,
                        gst::PadPresence::Always,
                        &super::super::imp::ts_sink_caps(),
                    )
                    .unwrap(), // static, valid template
                ]
            });
            TEMPLATES.as_ref()
        }
    }

    /// The element messages and errors come from the enclosing `tricklesink`.
    fn poster_of(obj: &super::TrickleByteSink) -> gst::Element {
        obj.parent()
            .and_then(|p| p.downcast::<gst::Element>().ok())
            .unwrap_or_else(|| obj.clone().upcast())
    }

    impl TrickleByteSink {
        fn shared(&self) -> Option<Arc<Shared>> {
            self.shared.lock().unwrap().clone()
        }

        fn client_error(&self, url: &str, err: &ClientError) -> gst::FlowError {
            match err {
                ClientError::Closed => {
                    gst::info!(CAT, imp = self, "{url} was closed: EOS");
                    return gst::FlowError::Eos;
                }
                ClientError::NotFound { .. } => gst::element_imp_error!(
                    self,
                    gst::ResourceError::NotFound,
                    [
                        "Trickle channel {url} not found (HTTP 404): check the URL and that the channel was created"
                    ]
                ),
                _ => gst::element_imp_error!(
                    self,
                    gst::ResourceError::Write,
                    [
                        "Cannot publish to {url}: {err}. Check that the trickle server is running and reachable"
                    ]
                ),
            }
            gst::FlowError::Error
        }

        fn wait_error(&self, url: &str, err: WaitError) -> gst::FlowError {
            if err == WaitError::Cancelled {
                return gst::FlowError::Flushing;
            }
            gst::element_imp_error!(
                self,
                gst::ResourceError::Write,
                ["Cannot publish to {url}: {err:?}"]
            );
            gst::FlowError::Error
        }

        /// Write what is pending to the current segment.
        fn flush(&self, running: &mut Running) -> Result<(), gst::FlowError> {
            if running.pending.is_empty() {
                return Ok(());
            }
            let data = running.pending.split().freeze();
            let Some(segment) = running.segment.as_mut() else {
                return Ok(());
            };
            let len = data.len() as u64;
            match runtime::block_on(&self.canceller, None, segment.writer.write(data)) {
                Ok(Ok(())) => {
                    segment.bytes += len;
                    gst::trace!(CAT, imp = self, "wrote {len} bytes to seq {}", segment.seq);
                    Ok(())
                }
                Ok(Err(ClientError::Closed)) => {
                    running.flags.closed.store(true, Ordering::SeqCst);
                    Err(gst::FlowError::Eos)
                }
                Ok(Err(err @ ClientError::NotFound { .. })) => {
                    Err(self.client_error(&running.url, &err))
                }
                Ok(Err(err @ ClientError::RetriesExhausted { .. })) => {
                    Err(self.client_error(&running.url, &err))
                }
                Ok(Err(err)) => {
                    let seq = segment.seq;
                    gst::element_imp_warning!(
                        self,
                        gst::ResourceError::Write,
                        [
                            "Segment {seq} of {} failed: {err}; it was dropped, publishing resumes at the next keyframe",
                            running.url
                        ]
                    );
                    running.segment = None;
                    if let Some(shared) = self.shared() {
                        shared.stats.lock().unwrap().failed_segments += 1;
                    }
                    Ok(())
                }
                Err(err) => Err(self.wait_error(&running.url, err)),
            }
        }

        /// Finish the current segment in the background (its answer is not on the critical
        /// path) and post its message when the server has answered.
        fn finish_segment(&self, running: &mut Running) -> Result<(), gst::FlowError> {
            self.flush(running)?;
            let Some(segment) = running.segment.take() else {
                return Ok(());
            };
            let rt = runtime::runtime().map_err(|err| {
                gst::element_imp_error!(self, gst::ResourceError::Failed, ["{err}"]);
                gst::FlowError::Error
            })?;
            let duration = match (segment.start_ts, segment.last_ts) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => gst::ClockTime::from_nseconds(
                    u64::try_from(segment.start_wall.elapsed().as_nanos()).unwrap_or(u64::MAX),
                ),
            };
            let poster = poster_of(&self.obj());
            let flags = running.flags.clone();
            let shared = self.shared();
            let url = running.url.clone();
            running.finishing.retain(|h| !h.is_finished());
            running.finishing.push(rt.spawn(async move {
                let Segment {
                    writer, seq, bytes, ..
                } = segment;
                let t0 = Instant::now();
                let result = writer.finish().await;
                let publish_time = gst::ClockTime::from_nseconds(
                    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
                );
                match result {
                    Ok(SegmentOutcome::Done) => {
                        if let Some(shared) = &shared {
                            let mut stats = shared.stats.lock().unwrap();
                            stats.segments += 1;
                            stats.bytes += bytes;
                            stats.last_seq = seq;
                            stats.last_publish_time = publish_time;
                        }
                        if poster.find_property("stats").is_some() {
                            poster.notify("stats");
                        }
                        let s = gst::Structure::builder("trickle-segment")
                            .field("seq", seq)
                            .field("bytes", bytes)
                            .field("duration", duration)
                            .field("publish-time", publish_time)
                            .build();
                        let _ = poster
                            .post_message(gst::message::Element::builder(s).src(&poster).build());
                    }
                    Ok(SegmentOutcome::ChannelClosed) | Err(ClientError::Closed) => {
                        flags.closed.store(true, Ordering::SeqCst);
                    }
                    Err(err @ ClientError::RetriesExhausted { .. }) => {
                        flags.failed.store(true, Ordering::SeqCst);
                        gst::element_error!(
                            poster,
                            gst::ResourceError::Write,
                            ["Cannot publish segment {seq} to {url}: {err}. Check that the trickle server is running and reachable"]
                        );
                    }
                    Err(err @ ClientError::NotFound { .. }) => {
                        flags.failed.store(true, Ordering::SeqCst);
                        gst::element_error!(
                            poster,
                            gst::ResourceError::NotFound,
                            ["Trickle channel {url} not found (HTTP 404) while publishing segment {seq}: {err}"]
                        );
                    }
                    Err(err) => {
                        if let Some(shared) = &shared {
                            shared.stats.lock().unwrap().failed_segments += 1;
                        }
                        gst::element_warning!(
                            poster,
                            gst::ResourceError::Write,
                            ["Segment {seq} of {url} failed: {err}"]
                        );
                    }
                }
            }));
            Ok(())
        }

        fn begin_segment(
            &self,
            running: &mut Running,
            ts: Option<gst::ClockTime>,
        ) -> Result<(), gst::FlowError> {
            let Some(publisher) = running.publisher.as_mut() else {
                return Err(gst::FlowError::Eos);
            };
            let writer = match runtime::block_on(&self.canceller, None, publisher.begin_segment()) {
                Ok(Ok(writer)) => writer,
                Ok(Err(err)) => {
                    if matches!(err, ClientError::Closed) {
                        running.flags.closed.store(true, Ordering::SeqCst);
                    }
                    return Err(self.client_error(&running.url, &err));
                }
                Err(err) => return Err(self.wait_error(&running.url, err)),
            };
            let seq = writer.seq();
            gst::debug!(CAT, imp = self, "segment {seq} begins at {}", ts.display());
            running.segment = Some(Segment {
                writer,
                seq,
                start_ts: ts,
                last_ts: ts,
                start_wall: Instant::now(),
                bytes: 0,
            });
            Ok(())
        }

        fn handle_buffer(
            &self,
            running: &mut Running,
            buffer: &gst::BufferRef,
        ) -> Result<(), gst::FlowError> {
            let map = buffer.map_readable().map_err(|_| {
                gst::element_imp_error!(self, gst::CoreError::Failed, ["Cannot map a buffer"]);
                gst::FlowError::Error
            })?;
            let data = map.as_slice();
            if data.is_empty() {
                return Ok(());
            }
            let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
            let ts = buffer.dts_or_pts();
            let cut = match &running.segment {
                None => keyframe,
                Some(seg) => {
                    keyframe && {
                        let elapsed = match (seg.start_ts, ts) {
                            (Some(a), Some(b)) => b.saturating_sub(a),
                            _ => gst::ClockTime::from_nseconds(
                                u64::try_from(seg.start_wall.elapsed().as_nanos())
                                    .unwrap_or(u64::MAX),
                            ),
                        };
                        elapsed >= running.min_duration
                    }
                }
            };
            if cut {
                self.finish_segment(running)?;
                self.begin_segment(running, ts)?;
                // Every segment must begin with PAT/PMT: re-insert the last ones seen when the
                // keyframe came without them.
                if ts::pid(data) != Some(0)
                    && let (Some(pat), Some(pmt)) = (&running.psi.pat, &running.psi.pmt)
                {
                    gst::debug!(CAT, imp = self, "re-inserting PAT/PMT at segment start");
                    let at = running.pending.len();
                    running.pending.extend_from_slice(pat);
                    running.pending.extend_from_slice(pmt);
                    running.psi.number_copies(&mut running.pending[at..]);
                }
            }
            // Remember the PSI tables (whole, aligned packets only).
            if data.len() % ts::PACKET == 0 {
                for packet in data.chunks_exact(ts::PACKET) {
                    match ts::pid(packet) {
                        Some(0) => {
                            if let Some(pmt_pid) = ts::pat_pmt_pid(packet) {
                                running.psi.pat = Some(Bytes::copy_from_slice(packet));
                                running.psi.pmt_pid = Some(pmt_pid);
                            }
                        }
                        Some(pid)
                            if Some(pid) == running.psi.pmt_pid
                                && ts::payload_unit_start(packet) =>
                        {
                            running.psi.pmt = Some(Bytes::copy_from_slice(packet));
                        }
                        _ => {}
                    }
                }
            }
            match running.segment.as_mut() {
                Some(seg) => {
                    if ts.is_some() {
                        seg.last_ts = ts;
                    }
                    let at = running.pending.len();
                    running.pending.extend_from_slice(data);
                    if data.len() % ts::PACKET == 0 {
                        running.psi.renumber(&mut running.pending[at..]);
                    }
                }
                None => {
                    if let Some(shared) = self.shared() {
                        shared.stats.lock().unwrap().dropped_buffers += 1;
                    }
                }
            }
            Ok(())
        }

        fn with_running(
            &self,
            f: impl FnOnce(&mut Running) -> Result<(), gst::FlowError>,
        ) -> Result<gst::FlowSuccess, gst::FlowError> {
            // Take the running state out so that no lock is held during network waits;
            // stop() runs only after the streaming thread has left render().
            let Some(mut running) = self.running.lock().unwrap().take() else {
                return Err(gst::FlowError::Flushing);
            };
            let result = if running.flags.failed.load(Ordering::SeqCst) {
                Err(gst::FlowError::Error)
            } else if running.flags.closed.load(Ordering::SeqCst) {
                Err(gst::FlowError::Eos)
            } else {
                f(&mut running)
            };
            *self.running.lock().unwrap() = Some(running);
            result.map(|()| gst::FlowSuccess::Ok)
        }

        /// EOS or stop: finish the current segment, wait for the background finishes, then end the
        /// preconnected POST with an empty body and DELETE the channel (`docs/trickle.md`, P7).
        fn close(&self, running: &mut Running, canceller: &Canceller) {
            if let Err(err) = self.finish_segment(running) {
                gst::debug!(CAT, imp = self, "final segment: {err:?}");
            }
            let finishing = std::mem::take(&mut running.finishing);
            let publisher = running.publisher.take();
            let url = running.url.clone();
            let result = runtime::block_on(canceller, Some(CLOSE_TIMEOUT), async move {
                for handle in finishing {
                    let _ = handle.await;
                }
                match publisher {
                    Some(publisher) => publisher.close().await,
                    None => Ok(()),
                }
            });
            match result {
                Ok(Ok(())) => gst::info!(CAT, imp = self, "closed {url}"),
                Ok(Err(err)) => gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Close,
                    ["Cannot close trickle channel {url} cleanly: {err}"]
                ),
                Err(err) => gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Close,
                    ["Cannot close trickle channel {url} cleanly: {err:?}"]
                ),
            }
        }
    }

    impl BaseSinkImpl for TrickleByteSink {
        fn start(&self) -> Result<(), gst::ErrorMessage> {
            let settings: Settings = match self.shared() {
                Some(shared) => shared.settings.lock().unwrap().clone(),
                None => {
                    return Err(gst::error_msg!(
                        gst::CoreError::Failed,
                        ["Internal trickle byte sink used outside tricklesink"]
                    ));
                }
            };
            let Some(url) = settings.url.clone().filter(|u| !u.is_empty()) else {
                return Err(gst::error_msg!(
                    gst::ResourceError::Settings,
                    ["No trickle URL set: set the `url` property of tricklesink"]
                ));
            };
            let rt = runtime::runtime()
                .map_err(|err| gst::error_msg!(gst::ResourceError::Failed, ["{err}"]))?;
            let config = PublisherConfig {
                mime: "video/MP2T".to_owned(),
                retry_pause: settings.retry_pause,
                delete_on_close: settings.delete_on_close,
                tls_verify: settings.tls_verify,
                connect_timeout: settings.connect_timeout,
                bearer_token: settings.auth_token.clone(),
            };
            // Continue a channel that already has data (a restarted publisher) from the
            // server's next seq, with Lp-Trickle-Reset; servers without /next start at 0. A
            // malformed URL fails here, before any I/O.
            let local = Canceller::default();
            let attached = runtime::block_on(
                &local,
                Some(settings.connect_timeout + Duration::from_secs(5)),
                Publisher::reattach(&url, config.clone()),
            );
            let publisher = match attached {
                Ok(Ok(publisher)) => publisher,
                Ok(Err(ClientError::NotFound { .. })) => {
                    // The channel may be auto-created by the first POST.
                    let _guard = rt.enter();
                    Publisher::new(&url, config).map_err(|err| {
                        gst::error_msg!(
                            gst::ResourceError::Settings,
                            ["Cannot publish to {url}: {err}"]
                        )
                    })?
                }
                Ok(Err(err @ ClientError::InvalidUrl { .. })) => {
                    return Err(gst::error_msg!(
                        gst::ResourceError::Settings,
                        ["Cannot publish to {url}: {err}"]
                    ));
                }
                other => {
                    // Server unreachable or /next unusable: start at seq 0; the first
                    // segment's POST is retried with back-off, then reported as an error.
                    let why = match other {
                        Ok(Err(err)) => err.to_string(),
                        Err(err) => format!("{err:?}"),
                        Ok(Ok(_)) => String::new(),
                    };
                    gst::warning!(
                        CAT,
                        imp = self,
                        "cannot ask {url}/next ({why}); starting at seq 0"
                    );
                    let _guard = rt.enter();
                    Publisher::new(&url, config).map_err(|err| {
                        gst::error_msg!(
                            gst::ResourceError::Settings,
                            ["Cannot publish to {url}: {err}"]
                        )
                    })?
                }
            };
            if let Some(shared) = self.shared() {
                *shared.stats.lock().unwrap() = Default::default();
            }
            gst::info!(
                CAT,
                imp = self,
                "publishing to {url} from seq {}",
                publisher.next_seq()
            );
            self.canceller.reset();
            *self.running.lock().unwrap() = Some(Running {
                url,
                publisher: Some(publisher),
                segment: None,
                psi: Psi::default(),
                pending: BytesMut::new(),
                finishing: Vec::new(),
                flags: Arc::default(),
                min_duration: settings.min_segment_duration,
            });
            Ok(())
        }

        fn stop(&self) -> Result<(), gst::ErrorMessage> {
            let running = self.running.lock().unwrap().take();
            if let Some(mut running) = running {
                if running.publisher.is_some() {
                    // Stopped without EOS: abandon nothing silently (`docs/trickle.md`, P7).
                    self.close(&mut running, &Canceller::default());
                }
                if let Ok(rt) = runtime::runtime() {
                    let _guard = rt.enter();
                    drop(running);
                }
            }
            gst::info!(CAT, imp = self, "stopped");
            Ok(())
        }

        fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
            self.with_running(|running| {
                self.handle_buffer(running, buffer)?;
                self.flush(running)
            })
        }

        fn render_list(&self, list: &gst::BufferList) -> Result<gst::FlowSuccess, gst::FlowError> {
            self.with_running(|running| {
                for buffer in list.iter() {
                    self.handle_buffer(running, buffer)?;
                }
                self.flush(running)
            })
        }

        fn event(&self, event: gst::Event) -> bool {
            if let gst::EventView::Eos(_) = event.view() {
                let running = self.running.lock().unwrap().take();
                if let Some(mut running) = running {
                    if !running.flags.closed.load(Ordering::SeqCst) {
                        self.close(&mut running, &self.canceller);
                    } else {
                        running.publisher = None;
                    }
                    *self.running.lock().unwrap() = Some(running);
                }
            }
            self.parent_event(event)
        }

        fn unlock(&self) -> Result<(), gst::ErrorMessage> {
            self.canceller.cancel();
            Ok(())
        }

        fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
            self.canceller.reset();
            Ok(())
        }
    }
}

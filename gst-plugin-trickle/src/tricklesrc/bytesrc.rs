// SPDX-License-Identifier: MPL-2.0
//! The byte source inside `tricklesrc`: a live `GstPushSrc` whose `create()` hands out each HTTP
//! chunk of the subscribed segments as one buffer, as soon as it arrives (`docs/trickle.md`,
//! "Subscriber (Rivulet's client)": bodies concatenated, bytes passed on as they come). Not registered as an element of its own; `tricklesrc` creates it.

use gst::glib;
use gst::subclass::prelude::*;

glib::wrapper! {
    pub struct TrickleByteSrc(ObjectSubclass<imp::TrickleByteSrc>) @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

impl TrickleByteSrc {
    pub(super) fn new(name: &str, shared: std::sync::Arc<super::imp::Shared>) -> Self {
        let obj: Self = glib::Object::builder().property("name", name).build();
        *obj.imp().shared.lock().unwrap() = Some(shared);
        obj
    }
}

/// TS packet size.
pub(crate) const TS_PACKET: usize = 188;

/// The offset, within the segment, of the first packet in `data` that does not begin with the
/// TS sync byte; `segment_offset` is how many bytes of the segment came before `data`.
pub(crate) fn first_bad_packet(segment_offset: u64, data: &[u8]) -> Option<u64> {
    let rem = (segment_offset % TS_PACKET as u64) as usize;
    let mut i = if rem == 0 { 0 } else { TS_PACKET - rem };
    while let Some(&b) = data.get(i) {
        if b != 0x47 {
            return Some(segment_offset + i as u64);
        }
        i += TS_PACKET;
    }
    None
}

mod imp {
    use std::sync::{Arc, LazyLock, Mutex};

    use gst::glib;
    use gst::prelude::*;
    use gst::subclass::prelude::*;
    use gst_base::prelude::*;
    use gst_base::subclass::base_src::CreateSuccess;
    use gst_base::subclass::prelude::*;

    use super::first_bad_packet;
    use crate::protocol::client::{ClientError, SubscribedSegment, Subscriber, SubscriberConfig};
    use crate::runtime::{self, Canceller, WaitError};
    use crate::tricklesrc::delimit::AuDelimiter;
    use crate::tricklesrc::imp::{Settings, Shared};

    static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
        gst::DebugCategory::new(
            "tricklesrc",
            gst::DebugColorFlags::empty(),
            Some("Trickle subscriber source"),
        )
    });

    struct Cursor {
        segment: SubscribedSegment,
        seq: i64,
        bytes: u64,
        lag: i64,
    }

    struct Running {
        url: String,
        subscriber: Subscriber,
        segment: Option<Cursor>,
        /// The next buffer gets DISCONT (start, resync, skipped or broken segment).
        discont: bool,
        /// A segment has been received.
        received: bool,
        /// Decode mode with `au-per-pes`: releases each access unit when complete.
        delimiter: Option<AuDelimiter>,
    }

    /// How long an access unit whose end cannot be seen in the bytes (it ends exactly on a
    /// packet boundary) may wait for more bytes before it is taken as complete.
    const QUIET_END: std::time::Duration = std::time::Duration::from_millis(200);

    #[derive(Default)]
    pub struct TrickleByteSrc {
        pub(super) shared: Mutex<Option<Arc<Shared>>>,
        running: Mutex<Option<Running>>,
        canceller: Canceller,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for TrickleByteSrc {
        const NAME: &'static str = "GstTrickleByteSrc";
        type Type = super::TrickleByteSrc;
        type ParentType = gst_base::PushSrc;
    }

    impl ObjectImpl for TrickleByteSrc {
        fn constructed(&self) {
            self.parent_constructed();
            let obj = self.obj();
            obj.set_live(true);
            obj.set_format(gst::Format::Bytes);
        }
    }

    impl GstObjectImpl for TrickleByteSrc {}

    impl ElementImpl for TrickleByteSrc {
        fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
            static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
                gst::subclass::ElementMetadata::new(
                    "Trickle byte source",
                    "Source/Network/HTTP",
                    "Internal part of tricklesrc: the MPEG-TS bytes of a trickle channel",
                    "Rivulet developers",
                )
            });
            Some(&*META)
        }

        fn pad_templates() -> &'static [gst::PadTemplate] {
            static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
                vec![
                    gst::PadTemplate::new(
                        "src",
                        gst::PadDirection::Src,
                        gst::PadPresence::Always,
                        &crate::tricklesrc::imp::ts_caps(),
                    )
                    .unwrap(), // static, valid template
                ]
            });
            TEMPLATES.as_ref()
        }
    }

    impl TrickleByteSrc {
        fn shared(&self) -> Option<Arc<Shared>> {
            self.shared.lock().unwrap().clone()
        }

        /// Post an element message from the enclosing `tricklesrc` (or from this element when
        /// used alone).
        fn post_segment_message(&self, structure: gst::Structure) {
            let obj = self.obj();
            let parent = obj.parent().and_then(|p| p.downcast::<gst::Element>().ok());
            let poster: gst::Element = parent.unwrap_or_else(|| obj.clone().upcast());
            let msg = gst::message::Element::builder(structure)
                .src(&poster)
                .build();
            let _ = poster.post_message(msg);
        }

        fn end_segment(&self, running: &mut Running, corrupt: bool) {
            let Some(cursor) = running.segment.take() else {
                return;
            };
            if cursor.bytes == 0 || corrupt {
                running.discont = true;
                if let Some(d) = running.delimiter.as_mut() {
                    d.discont();
                }
            }
            gst::debug!(
                CAT,
                imp = self,
                "segment {} of {} ended: {} bytes{}",
                cursor.seq,
                running.url,
                cursor.bytes,
                if corrupt {
                    " (corrupt, rest skipped)"
                } else {
                    ""
                }
            );
            if let Some(shared) = self.shared() {
                let mut stats = shared.stats.lock().unwrap();
                stats.segments += 1;
                if cursor.bytes == 0 {
                    stats.empty_segments += 1;
                }
                if corrupt {
                    stats.corrupt_segments += 1;
                }
                stats.last_seq = cursor.seq;
                stats.lag = cursor.lag;
            }
            if let Some(parent) = self.obj().parent() {
                parent.notify("stats");
            }
            let s = gst::Structure::builder("trickle-segment")
                .field("seq", cursor.seq)
                .field("bytes", cursor.bytes)
                .field("discont", running.discont)
                .field("corrupt", corrupt)
                .field("lag", cursor.lag)
                .build();
            self.post_segment_message(s);
        }

        fn fatal(&self, url: &str, err: &ClientError) -> gst::FlowError {
            match err {
                ClientError::NotFound { .. } => gst::element_imp_error!(
                    self,
                    gst::ResourceError::NotFound,
                    [
                        "Trickle channel {url} not found (HTTP 404): check the URL and that the channel was created"
                    ]
                ),
                ClientError::RetriesExhausted { .. } => gst::element_imp_error!(
                    self,
                    gst::ResourceError::OpenRead,
                    [
                        "Cannot subscribe to {url}: {err}. Check that the trickle server is running and reachable"
                    ]
                ),
                _ => gst::element_imp_error!(
                    self,
                    gst::ResourceError::Read,
                    ["Cannot subscribe to {url}: {err}"]
                ),
            }
            gst::FlowError::Error
        }

        fn produce(&self, running: &mut Running) -> Result<gst::Buffer, gst::FlowError> {
            loop {
                if running.segment.is_none() {
                    let next =
                        runtime::block_on(&self.canceller, None, running.subscriber.next_segment());
                    match next {
                        Err(WaitError::Cancelled) => return Err(gst::FlowError::Flushing),
                        Err(other) => {
                            gst::element_imp_error!(
                                self,
                                gst::ResourceError::Failed,
                                ["Cannot subscribe to {}: {other:?}", running.url]
                            );
                            return Err(gst::FlowError::Error);
                        }
                        Ok(Ok(None)) | Ok(Err(ClientError::Closed)) => {
                            gst::info!(CAT, imp = self, "{} was closed: EOS", running.url);
                            return Err(gst::FlowError::Eos);
                        }
                        Ok(Err(ClientError::NotFound { .. })) if running.received => {
                            // The channel was deleted after the stream began: the publisher
                            // ended it (a subscriber that lags sees 404 instead of
                            // Lp-Trickle-Closed). Report it and end the stream.
                            gst::element_imp_warning!(
                                self,
                                gst::ResourceError::NotFound,
                                [
                                    "Trickle channel {} is gone (HTTP 404) after the stream began; treating it as end of stream",
                                    running.url
                                ]
                            );
                            return Err(gst::FlowError::Eos);
                        }
                        Ok(Err(err)) => return Err(self.fatal(&running.url, &err)),
                        Ok(Ok(Some(segment))) => {
                            let seq = segment.seq();
                            if segment.discont() {
                                gst::info!(
                                    CAT,
                                    imp = self,
                                    "gap before segment {seq} of {}",
                                    running.url
                                );
                                running.discont = true;
                                if let Some(d) = running.delimiter.as_mut() {
                                    d.discont();
                                }
                                if let Some(shared) = self.shared() {
                                    shared.stats.lock().unwrap().resyncs += 1;
                                }
                            }
                            running.received = true;
                            let lag = segment.latest().map_or(-1, |latest| latest - seq - 1);
                            gst::debug!(CAT, imp = self, "segment {seq} begins (lag {lag})");
                            running.segment = Some(Cursor {
                                segment,
                                seq,
                                bytes: 0,
                                lag,
                            });
                        }
                    }
                }
                let Some(cursor) = running.segment.as_mut() else {
                    continue;
                };
                // An access unit that may be complete waits only a short while for more bytes.
                let wait = running
                    .delimiter
                    .as_ref()
                    .filter(|d| d.unknown_end())
                    .map(|_| QUIET_END);
                let chunk = runtime::block_on(&self.canceller, wait, cursor.segment.chunk());
                match chunk {
                    Err(WaitError::Cancelled) => return Err(gst::FlowError::Flushing),
                    Err(WaitError::Timeout) => {
                        let ends = running
                            .delimiter
                            .as_mut()
                            .map(AuDelimiter::terminate_open)
                            .unwrap_or_default();
                        if !ends.is_empty() {
                            gst::log!(
                                CAT,
                                imp = self,
                                "no bytes for {QUIET_END:?}: access unit released"
                            );
                            return Ok(gst::Buffer::from_mut_slice(ends));
                        }
                    }
                    Err(other) => {
                        gst::element_imp_error!(
                            self,
                            gst::ResourceError::Failed,
                            ["Cannot read from {}: {other:?}", running.url]
                        );
                        return Err(gst::FlowError::Error);
                    }
                    Ok(Ok(Some(bytes))) => {
                        if bytes.is_empty() {
                            continue;
                        }
                        if let Some(offset) = first_bad_packet(cursor.bytes, &bytes) {
                            let seq = cursor.seq;
                            gst::element_imp_warning!(
                                self,
                                gst::StreamError::Demux,
                                [
                                    "Segment {seq} of {} is not valid MPEG-TS (no sync byte at offset {offset}); skipping the rest of it",
                                    running.url
                                ]
                            );
                            self.end_segment(running, true);
                            continue;
                        }
                        let len = bytes.len() as u64;
                        cursor.bytes += len;
                        if let Some(shared) = self.shared() {
                            shared.stats.lock().unwrap().bytes += len;
                        }
                        let mut buffer = match running.delimiter.as_mut() {
                            Some(d) => {
                                let out = d.push(&bytes);
                                if out.is_empty() {
                                    continue;
                                }
                                gst::Buffer::from_mut_slice(out)
                            }
                            None => gst::Buffer::from_slice(bytes),
                        };
                        if std::mem::take(&mut running.discont) {
                            buffer
                                .get_mut()
                                .map(|b| b.set_flags(gst::BufferFlags::DISCONT))
                                .unwrap_or_default(); // a fresh buffer is writable
                            if let Some(shared) = self.shared() {
                                shared.stats.lock().unwrap().discont_buffers += 1;
                            }
                        }
                        gst::trace!(CAT, imp = self, "chunk of {len} bytes");
                        return Ok(buffer);
                    }
                    Ok(Ok(None)) => {
                        self.end_segment(running, false);
                        // A segment ends between access units: one still open is complete.
                        let ends = running
                            .delimiter
                            .as_mut()
                            .map(AuDelimiter::terminate_open)
                            .unwrap_or_default();
                        if !ends.is_empty() {
                            return Ok(gst::Buffer::from_mut_slice(ends));
                        }
                    }
                    Ok(Err(ClientError::Closed)) => {
                        self.end_segment(running, false);
                        gst::info!(CAT, imp = self, "{} was closed: EOS", running.url);
                        return Err(gst::FlowError::Eos);
                    }
                    Ok(Err(err)) => {
                        gst::element_imp_warning!(
                            self,
                            gst::ResourceError::Read,
                            [
                                "Segment {} of {} broke off: {err}; going on with the next segment",
                                cursor.seq,
                                running.url
                            ]
                        );
                        self.end_segment(running, true);
                    }
                }
            }
        }
    }

    impl BaseSrcImpl for TrickleByteSrc {
        fn start(&self) -> Result<(), gst::ErrorMessage> {
            let settings: Settings = match self.shared() {
                Some(shared) => shared.settings.lock().unwrap().clone(),
                None => {
                    return Err(gst::error_msg!(
                        gst::CoreError::Failed,
                        ["Internal trickle byte source used outside tricklesrc"]
                    ));
                }
            };
            let Some(url) = settings.url.clone().filter(|u| !u.is_empty()) else {
                return Err(gst::error_msg!(
                    gst::ResourceError::Settings,
                    ["No trickle URL set: set the `url` property of tricklesrc"]
                ));
            };
            let rt = runtime::runtime()
                .map_err(|err| gst::error_msg!(gst::ResourceError::Failed, ["{err}"]))?;
            let config = SubscriberConfig {
                start_seq: settings.start_seq,
                max_retries: settings.max_retries,
                retry_pause: settings.retry_pause,
                preconnect_refresh: settings.preconnect_refresh,
                connect_timeout: settings.connect_timeout,
                tls_verify: settings.tls_verify,
            };
            let subscriber = {
                let _guard = rt.enter();
                Subscriber::new(&url, config)
            }
            .map_err(|err| {
                gst::error_msg!(
                    gst::ResourceError::Settings,
                    ["Cannot subscribe to {url}: {err}"]
                )
            })?;
            if let Some(shared) = self.shared() {
                *shared.stats.lock().unwrap() = Default::default();
            }
            gst::info!(
                CAT,
                imp = self,
                "subscribing to {url} from seq {}",
                settings.start_seq
            );
            self.obj().set_do_timestamp(settings.do_timestamp);
            self.canceller.reset();
            *self.running.lock().unwrap() = Some(Running {
                url,
                subscriber,
                segment: None,
                discont: true,
                received: false,
                delimiter: (settings.mode == crate::tricklesrc::TrickleSrcMode::Decode
                    && settings.au_per_pes)
                    .then(AuDelimiter::default),
            });
            Ok(())
        }

        fn stop(&self) -> Result<(), gst::ErrorMessage> {
            let running = self.running.lock().unwrap().take();
            if let Ok(rt) = runtime::runtime() {
                // Dropping the subscriber cancels its pending GETs; do it in the runtime's
                // context.
                let _guard = rt.enter();
                drop(running);
            }
            gst::info!(CAT, imp = self, "stopped");
            Ok(())
        }

        fn is_seekable(&self) -> bool {
            false
        }

        fn query(&self, query: &mut gst::QueryRef) -> bool {
            if let gst::QueryViewMut::Latency(q) = query.view_mut() {
                // Live, no latency of its own; and unlike a capture device it can wait as long
                // as downstream needs (the bytes wait in the socket and on the server), so no
                // maximum: a synced sink's processing deadline fits.
                q.set(true, gst::ClockTime::ZERO, gst::ClockTime::NONE);
                return true;
            }
            BaseSrcImplExt::parent_query(self, query)
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

    impl PushSrcImpl for TrickleByteSrc {
        fn create(
            &self,
            _buffer: Option<&mut gst::BufferRef>,
        ) -> Result<CreateSuccess, gst::FlowError> {
            // Take the running state out so that no lock is held during network waits;
            // stop() runs only after the streaming thread has left create().
            let Some(mut running) = self.running.lock().unwrap().take() else {
                return Err(gst::FlowError::Flushing);
            };
            let result = self.produce(&mut running);
            *self.running.lock().unwrap() = Some(running);
            result.map(CreateSuccess::NewBuffer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_byte_check_follows_the_packet_grid_across_chunks() {
        let mut seg = vec![0u8; 188 * 3];
        for p in 0..3 {
            seg[p * 188] = 0x47;
        }
        assert_eq!(first_bad_packet(0, &seg), None);
        // Split at an odd place: the second chunk starts mid-packet.
        assert_eq!(first_bad_packet(0, &seg[..200]), None);
        assert_eq!(first_bad_packet(200, &seg[200..]), None);
        seg[376] = 0;
        assert_eq!(first_bad_packet(200, &seg[200..]), Some(376));
        assert_eq!(first_bad_packet(0, b"garbage"), Some(0));
    }
}

// SPDX-License-Identifier: MPL-2.0
//! The one-slot mailbox between the streaming thread and the inference thread.

use std::collections::VecDeque;
use std::time::Instant;

/// Serialized events waiting in the mailbox before the streaming thread waits (bounded queue).
pub(super) const MAX_QUEUED_EVENTS: usize = 64;

pub(super) enum Item {
    Buffer(gst::Buffer, Instant),
    Caps(gst_video::VideoInfo),
    Event(gst::Event),
}

/// The one-slot mailbox between the streaming thread and the inference thread. Serialized
/// events travel through it too, so they stay in order with buffers; at most one buffer waits.
pub(super) struct Mailbox {
    pub(super) items: VecDeque<Item>,
    pub(super) events: usize,
    pub(super) flushing: bool,
    pub(super) shutdown: bool,
    pub(super) busy: bool,
    pub(super) flow: Result<gst::FlowSuccess, gst::FlowError>,
}

impl Default for Mailbox {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            events: 0,
            flushing: false,
            shutdown: true,
            busy: false,
            flow: Ok(gst::FlowSuccess::Ok),
        }
    }
}

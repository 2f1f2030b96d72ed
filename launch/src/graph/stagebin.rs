// SPDX-License-Identifier: MPL-2.0
//! The bin of one stage: a `gst::Bin` that lets its stage see the messages of its children
//! first, synchronously, in the posting thread, and keep one from going up (an element
//! provider's error that the stage answers with a live failover instead of ending the stream).

use gst::glib;
use gst::subclass::prelude::*;

/// Returns true when the message was handled (it then goes no further).
pub(super) type Filter = Box<dyn Fn(&gst::Message) -> bool + Send + Sync>;

mod imp {
    use super::*;
    use std::sync::OnceLock;

    #[derive(Default)]
    pub struct StageBin {
        pub(super) filter: OnceLock<Filter>,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for StageBin {
        const NAME: &'static str = "RivuletStageBin";
        type Type = super::StageBin;
        type ParentType = gst::Bin;
    }

    impl ObjectImpl for StageBin {}
    impl GstObjectImpl for StageBin {}
    impl ElementImpl for StageBin {}

    impl BinImpl for StageBin {
        fn handle_message(&self, msg: gst::Message) {
            if let Some(f) = self.filter.get()
                && f(&msg)
            {
                return;
            }
            self.parent_handle_message(msg)
        }
    }
}

glib::wrapper! {
    pub struct StageBin(ObjectSubclass<imp::StageBin>)
        @extends gst::Bin, gst::Element, gst::Object,
        @implements gst::ChildProxy;
}

impl StageBin {
    pub(super) fn new(name: &str) -> StageBin {
        glib::Object::builder().property("name", name).build()
    }

    /// Sets the filter (once; later calls are ignored).
    pub(super) fn set_filter(&self, f: Filter) {
        let _ = self.imp().filter.set(f);
    }
}

// SPDX-License-Identifier: MPL-2.0
//! The buffer pool the element proposes upstream (ALLOCATION query) when it runs its own
//! inference child: each buffer's memory is an input slot of the element's input area
//! ([`InputArea`]), so upstream writes (decodes) the frame straight into memory the child
//! reads, and the frame is not copied on its way there.

use std::sync::{Arc, Mutex};

use gst::glib;
use gst::subclass::prelude::*;

use super::shm::InputArea;

glib::wrapper! {
    /// A pool of video buffers in the input area's shared memory.
    pub struct ShmInputPool(ObjectSubclass<imp::ShmInputPool>)
        @extends gst::BufferPool, gst::Object;
}

impl ShmInputPool {
    /// A pool whose buffers live in `area`; configure it with caps (video) as any pool.
    pub fn new(area: Arc<InputArea>) -> Self {
        let pool: Self = glib::Object::new();
        *pool.imp().area.lock().unwrap() = Some(area);
        pool
    }
}

mod imp {
    use super::*;

    static CAT: std::sync::LazyLock<gst::DebugCategory> = std::sync::LazyLock::new(|| {
        gst::DebugCategory::new(
            "aipipelineshmpool",
            gst::DebugColorFlags::empty(),
            Some("aipipeline shared-memory input pool"),
        )
    });

    #[derive(Default)]
    pub struct ShmInputPool {
        pub(super) area: Mutex<Option<Arc<InputArea>>>,
        conf: Mutex<Option<Conf>>,
    }

    struct Conf {
        size: usize,
        info: gst_video::VideoInfo,
        video_meta: bool,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for ShmInputPool {
        const NAME: &'static str = "GstAiPipelineShmInputPool";
        type Type = super::ShmInputPool;
        type ParentType = gst::BufferPool;
    }

    impl ObjectImpl for ShmInputPool {}
    impl GstObjectImpl for ShmInputPool {}

    impl BufferPoolImpl for ShmInputPool {
        fn options() -> &'static [&'static str] {
            static OPTIONS: std::sync::LazyLock<[&'static str; 1]> =
                std::sync::LazyLock::new(|| [gst_video::BUFFER_POOL_OPTION_VIDEO_META.as_str()]);
            &*OPTIONS
        }

        fn set_config(&self, config: &mut gst::BufferPoolConfigRef) -> bool {
            let Some((Some(caps), size, _, _)) = config.params() else {
                gst::warning!(CAT, imp = self, "config without caps");
                return false;
            };
            let Ok(info) = gst_video::VideoInfo::from_caps(&caps) else {
                gst::warning!(CAT, imp = self, "config caps {caps} are not raw video");
                return false;
            };
            let video_meta = config.has_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
            *self.conf.lock().unwrap() = Some(Conf {
                size: (size as usize).max(info.size()),
                info,
                video_meta,
            });
            self.parent_set_config(config)
        }

        fn alloc_buffer(
            &self,
            _params: Option<&gst::BufferPoolAcquireParams>,
        ) -> Result<gst::Buffer, gst::FlowError> {
            let conf = self.conf.lock().unwrap();
            let area = self.area.lock().unwrap().clone();
            let (Some(conf), Some(area)) = (conf.as_ref(), area) else {
                return Err(gst::FlowError::NotNegotiated);
            };
            let slot = area.alloc(conf.size).map_err(|e| {
                gst::error!(CAT, imp = self, "cannot allocate an input slot: {e}");
                gst::FlowError::Error
            })?;
            let mut buffer = gst::Buffer::from_mut_slice(slot);
            if conf.video_meta
                && let Some(b) = buffer.get_mut()
            {
                let info = &conf.info;
                gst_video::VideoMeta::add_full(
                    b,
                    gst_video::VideoFrameFlags::empty(),
                    info.format(),
                    info.width(),
                    info.height(),
                    info.offset(),
                    info.stride(),
                )
                .map_err(|e| {
                    gst::error!(CAT, imp = self, "cannot add a video meta: {e}");
                    gst::FlowError::Error
                })?;
            }
            Ok(buffer)
        }
    }
}

// SPDX-License-Identifier: MPL-2.0
//! Batch groups (`batch-group`): elements of this process with the same group name and the
//! same pipeline selection (pipeline, model, pipelines-dir, device, precision, child program)
//! share one inference child, which runs the frames that arrive together as one batch.
//!
//! There is no batching thread: the first element whose frame finds no batch open opens one
//! and leads it. Each element copies its own frame into the child's shared memory (its slot is
//! its place in the batch); the leader waits until `max-batch` frames are in or
//! `batch-timeout-ms` has passed, sends the batch, and every element copies its own output
//! out. While a batch is in the child, new frames wait and then form the next batch.
//!
//! A lost child (died, hung, out of memory) is replaced once, by the group, in the
//! background; its `generation` counts the losses, so every member element sees each loss
//! (by the generation its frames see changing) and announces its own restart. The group ends
//! (its child shut down) when its last member leaves; a member leaving never stops the others.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use super::imp::{CAT, lock};
use super::loader::{Iso, start_child};
use crate::child::{BatchItem, ChildProc, InputLayout};
use crate::pipeline::Params;

/// What makes elements share a child: the group name and everything the child loads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct GroupKey {
    pub(super) name: String,
    pub(super) pipeline: String,
    pub(super) model: Option<String>,
    pub(super) pipelines_dir: Option<String>,
    pub(super) device: String,
    pub(super) fp16: bool,
    pub(super) program: PathBuf,
}

/// The live groups of this process (a group is dropped with its last member).
static GROUPS: LazyLock<Mutex<HashMap<GroupKey, Weak<Group>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

struct Open {
    id: u64,
    items: Vec<BatchItem>,
    cursor: usize,
    deadline: Instant,
}

struct Done {
    /// Per item: Ok, or its error; Err: the batch was lost with the child.
    results: Result<Vec<Result<(), String>>, String>,
    /// Items not picked up yet: the slots are not reused before.
    remaining: usize,
    /// Items in the batch.
    size: usize,
    /// Model forwards the child ran for the batch.
    forwards: u32,
}

/// The batch that carried a member's frame: its items and the model forwards the child ran
/// for it (items of the same size whose params differ at most in per-sample inputs share one).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct BatchShape {
    pub(super) size: usize,
    pub(super) forwards: u32,
}

struct St {
    child: Option<ChildProc>,
    /// Losses so far.
    generation: u64,
    /// A child is loaded for `generation`.
    online: bool,
    /// Why the last child was lost.
    loss: String,
    /// The last restart's load failed (no more restarts).
    failed: Option<String>,
    open: Option<Open>,
    /// A batch is in the child or its outputs are not all picked up.
    busy: bool,
    done: HashMap<u64, Done>,
    next_id: u64,
    /// Params JSON and params a restart loads with (the last member's that started).
    json: String,
    params: Option<Params>,
    pid: u32,
}

pub(super) struct Group {
    iso: Arc<Iso>,
    /// The device the child runs on.
    pub(super) device: String,
    batch_timeout: Duration,
    max_batch: usize,
    st: Mutex<St>,
    cond: Condvar,
    /// `restart-child` while a batch is collected or in the child: that batch's wait ends
    /// (the child is then replaced as lost).
    cancel: std::sync::atomic::AtomicBool,
}

/// What a member's frame got.
pub(super) enum GroupFrame {
    /// Processed; the output was handed to the writer.
    Done,
    /// This frame failed (the child is fine): skip it with this warning.
    Failed(String),
    /// The child of `generation` is lost or being replaced: pass the frame through.
    Restarting { generation: u64, reason: String },
    /// Replacing the child failed: an element error.
    Broken(String),
}

impl Group {
    /// The group for `key`, joined, or made with a child loaded with `json` / `params`
    /// (blocking: called from the element's `start()`). Also returns the child's device and
    /// the params JSON in force (a new child may fall back to `{}`).
    pub(super) fn join(
        key: GroupKey,
        iso: Arc<Iso>,
        json: &str,
        params: &Params,
        batch_timeout: Duration,
        max_batch: u32,
    ) -> Result<(Arc<Group>, String, String), String> {
        let mut groups = lock(&GROUPS);
        groups.retain(|_, g| g.strong_count() > 0);
        if let Some(g) = groups.get(&key).and_then(Weak::upgrade) {
            gst::info!(CAT, "joining batch group '{}'", key.name);
            return Ok((g.clone(), g.device.clone(), json.to_string()));
        }
        // Loading under the registry lock: a second element of the same group waits for
        // this load rather than starting another child.
        let (c, _warm, used) = start_child(&iso, json, Some(params), true, &|| false)?;
        let device = c.device().to_string();
        gst::info!(
            CAT,
            "batch group '{}': inference child {} on {device}",
            key.name,
            c.pid()
        );
        let g = Arc::new(Group {
            iso,
            device: device.clone(),
            batch_timeout,
            max_batch: (max_batch as usize).clamp(1, ChildProc::MAX_BATCH),
            st: Mutex::new(St {
                pid: c.pid(),
                child: Some(c),
                generation: 0,
                online: true,
                loss: String::new(),
                failed: None,
                open: None,
                busy: false,
                done: HashMap::new(),
                next_id: 0,
                json: used.clone(),
                params: Some(params.clone()),
            }),
            cond: Condvar::new(),
            cancel: std::sync::atomic::AtomicBool::new(false),
        });
        groups.insert(key, Arc::downgrade(&g));
        Ok((g, device, used))
    }

    /// The child's pid (0 while it is being replaced) and the generation.
    pub(super) fn child(&self) -> (u32, u64, bool) {
        let st = lock(&self.st);
        (st.pid, st.generation, st.online)
    }

    /// Whether generation `seen` is in service (Done), else the state after it.
    pub(super) fn status(&self, seen: u64) -> GroupFrame {
        let st = lock(&self.st);
        if let Some(e) = &st.failed {
            return GroupFrame::Broken(e.clone());
        }
        if st.generation != seen || !st.online {
            return GroupFrame::Restarting {
                generation: st.generation,
                reason: st.loss.clone(),
            };
        }
        GroupFrame::Done
    }

    /// Runs one frame of a member as part of a batch; `write` gets the output (tightly
    /// packed RGB, out_w×out_h×3) while the slot is reserved for it.
    #[allow(clippy::too_many_arguments)] // the frame's geometry, as ChildProc::frame takes it
    pub(super) fn frame(
        self: &Arc<Self>,
        seen: u64,
        planes: &[&[u8]],
        strides: &[usize],
        size: (u32, u32),
        layout: InputLayout,
        (out_w, out_h): (u32, u32),
        params: &Params,
        write: &mut dyn FnMut(&[u8]) -> Result<(), String>,
        batch: &mut BatchShape,
    ) -> GroupFrame {
        let mut st = lock(&self.st);
        loop {
            if let Some(e) = &st.failed {
                return GroupFrame::Broken(e.clone());
            }
            if st.generation != seen || !st.online {
                return GroupFrame::Restarting {
                    generation: st.generation,
                    reason: st.loss.clone(),
                };
            }
            let full = st
                .open
                .as_ref()
                .is_some_and(|o| o.items.len() >= self.max_batch);
            if !st.busy && !full {
                break;
            }
            st = self.cond.wait(st).unwrap();
        }
        let leader = st.open.is_none();
        if leader {
            let id = st.next_id;
            st.next_id += 1;
            st.open = Some(Open {
                id,
                items: Vec::with_capacity(self.max_batch),
                cursor: ChildProc::BATCH_START,
                deadline: Instant::now() + self.batch_timeout,
            });
        }
        let St { child, open, .. } = &mut *st;
        let (Some(child), Some(open)) = (child.as_mut(), open.as_mut()) else {
            // Not reached (online and not busy: the child is in place); no batch is left
            // open without its leader.
            if leader {
                st.open = None;
            }
            return GroupFrame::Failed("batch group: no child in service".into());
        };
        let slot = open.items.len();
        let id = open.id;
        match child.put_batch_item(
            &mut open.cursor,
            planes,
            strides,
            size,
            layout,
            (out_w, out_h),
            slot,
            params,
        ) {
            Ok(item) => open.items.push(item),
            Err(e) => {
                if leader && open.items.is_empty() {
                    st.open = None;
                }
                self.cond.notify_all();
                return GroupFrame::Failed(format!("{e}; frame skipped"));
            }
        }
        self.cond.notify_all();
        if leader {
            st = self.lead(st);
        }
        // Wait for the batch's results; copy this frame's output out.
        loop {
            if let Some(d) = st.done.get_mut(&id) {
                d.remaining -= 1;
                *batch = BatchShape {
                    size: d.size,
                    forwards: d.forwards,
                };
                let last = d.remaining == 0;
                let res = match &d.results {
                    Ok(r) => Ok(r
                        .get(slot)
                        .cloned()
                        .unwrap_or_else(|| Err("no result".into()))),
                    Err(e) => Err(e.clone()),
                };
                let out = match res {
                    Ok(Ok(())) => {
                        let len = out_w as usize * out_h as usize * 3;
                        match st.child.as_ref() {
                            Some(c) => match write(c.batch_output(slot, len)) {
                                Ok(()) => GroupFrame::Done,
                                Err(e) => GroupFrame::Failed(format!(
                                    "Cannot write an output frame: {e}; frame skipped"
                                )),
                            },
                            None => GroupFrame::Failed("batch group: child gone".into()),
                        }
                    }
                    Ok(Err(e)) => GroupFrame::Failed(format!("{e}; frame skipped")),
                    Err(reason) => GroupFrame::Restarting {
                        generation: st.generation,
                        reason,
                    },
                };
                if last {
                    st.done.remove(&id);
                    st.busy = false;
                    self.cond.notify_all();
                }
                return out;
            }
            st = self.cond.wait(st).unwrap();
        }
    }

    /// The leader: waits for the batch to fill or time out, runs it with no lock held,
    /// publishes the results (or replaces a lost child).
    fn lead<'a>(
        self: &'a Arc<Self>,
        mut st: std::sync::MutexGuard<'a, St>,
    ) -> std::sync::MutexGuard<'a, St> {
        loop {
            let Some(open) = st.open.as_ref() else {
                return st;
            };
            let now = Instant::now();
            if open.items.len() >= self.max_batch || now >= open.deadline {
                break;
            }
            let left = open.deadline - now;
            st = self.cond.wait_timeout(st, left).unwrap().0;
        }
        let Some(open) = st.open.take() else {
            return st;
        };
        let n = open.items.len();
        st.busy = true;
        let Some(mut child) = st.child.take() else {
            // Not reached (see `frame`); the members waiting for this batch are answered.
            st.done.insert(
                open.id,
                Done {
                    results: Err("batch group: no child in service".into()),
                    remaining: n,
                    size: n,
                    forwards: 0,
                },
            );
            self.cond.notify_all();
            return st;
        };
        drop(st);
        let cancel = &self.cancel;
        let res = child.run_batch(open.items, self.iso.hang_timeout, &|| {
            cancel.load(std::sync::atomic::Ordering::SeqCst)
        });
        let mut st = lock(&self.st);
        let mut forwards = 0;
        let results = match res {
            Ok((r, f)) => {
                st.child = Some(child);
                forwards = f;
                Ok(r)
            }
            Err(e) if !e.is_fatal() => {
                st.child = Some(child);
                let msg = e.to_string();
                Ok((0..n).map(|_| Err(msg.clone())).collect())
            }
            Err(e) => {
                let pid = child.pid();
                let logs = child.kill();
                let reason = if logs.is_empty() {
                    format!("{e} (pid {pid})")
                } else {
                    format!("{e} (pid {pid}; last log lines: {})", logs.join(" | "))
                };
                gst::warning!(CAT, "batch group child lost: {reason}; replacing it");
                self.cancel
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                st.generation += 1;
                st.online = false;
                st.pid = 0;
                st.loss = reason.clone();
                self.restart(&mut st);
                Err(reason)
            }
        };
        st.done.insert(
            open.id,
            Done {
                results,
                remaining: n,
                size: n,
                forwards,
            },
        );
        self.cond.notify_all();
        st
    }

    /// Starts a new child in the background for the current generation.
    fn restart(self: &Arc<Self>, st: &mut St) {
        let weak = Arc::downgrade(self);
        let iso = self.iso.clone();
        let generation = st.generation;
        let json = st.json.clone();
        let params = st.params.clone();
        let spawned = std::thread::Builder::new()
            .name("aipipeline-batch-loader".into())
            .spawn(move || {
                let cancelled = || weak.strong_count() == 0;
                let res = start_child(&iso, &json, params.as_ref(), true, &cancelled);
                let Some(g) = weak.upgrade() else {
                    return;
                };
                let mut st = lock(&g.st);
                if st.generation != generation {
                    return;
                }
                match res {
                    Ok((c, _, used)) => {
                        gst::info!(CAT, "batch group: new inference child {}", c.pid());
                        st.pid = c.pid();
                        st.child = Some(c);
                        st.online = true;
                        st.json = used;
                    }
                    Err(e) => st.failed = Some(format!("restart failed: {e}")),
                }
                g.cond.notify_all();
            });
        if let Err(e) = spawned {
            st.failed = Some(format!("cannot start the loader thread: {e}"));
        }
    }

    /// A member asks for the child to be replaced (`restart-child`): a loss of generation
    /// `seen`, unless that generation is already gone.
    pub(super) fn replace(self: &Arc<Self>, seen: u64, reason: &str) {
        let mut st = lock(&self.st);
        if st.generation != seen || !st.online {
            return;
        }
        if st.busy || st.open.is_some() {
            // The batch under way ends at once and its child is replaced as lost.
            self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        if let Some(c) = st.child.take() {
            let _ = c.kill();
        }
        st.generation += 1;
        st.online = false;
        st.pid = 0;
        st.loss = reason.to_string();
        self.restart(&mut st);
        self.cond.notify_all();
    }
}

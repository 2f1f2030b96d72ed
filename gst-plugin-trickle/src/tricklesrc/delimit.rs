// SPDX-License-Identifier: MPL-2.0
//! Releases each video access unit as soon as its last TS packet has arrived (issue 11).
//!
//! A video PES in MPEG-TS may be unbounded (`PES_packet_length` = 0, what every muxer writes
//! for an access unit of 64 KiB or more): tsdemux then cannot see where it ends and holds it
//! until the next PES of the same PID begins, i.e. until the next frame is published. A
//! publisher that pauses after a frame (or a segment's last frame) would keep that frame back.
//!
//! [`AuDelimiter`] sits between the byte source and tsdemux. It follows every unbounded video
//! PES and, when its last packet arrives, inserts right after it a *terminator*: one TS packet
//! on the same PID that starts an empty PES (header only, no PTS). The
//! payload-unit start makes tsdemux push the finished access unit at once; the empty PES
//! yields no buffer. To keep the PID's continuity counter sequence valid for tsdemux, every
//! later packet of that PID has its counter shifted by the number of terminators inserted.
//!
//! The last packet of a PES is the one whose adaptation field is stuffing: muxers (mpegtsmux,
//! FFmpeg) fill the end of the final packet of a PES with adaptation-field stuffing and no
//! other packet of the PES has stuffing. When the PES happens to end exactly on a packet
//! boundary (no stuffing), the end is not visible in the bytes: [`AuDelimiter::unknown_end`]
//! reports it so the caller can terminate after a quiet spell ([`AuDelimiter::terminate_open`]),
//! and a segment end terminates it too.

use std::collections::HashMap;

use super::bytesrc::TS_PACKET;

/// Per-PID state.
#[derive(Debug, Default, Clone, Copy)]
struct Pid {
    /// An unbounded video PES is open (its end not yet seen).
    open: bool,
    /// Added (mod 16) to this PID's continuity counters: terminators inserted so far.
    cc_shift: u8,
    /// The continuity counter of the last packet passed on (after the shift).
    last_cc: u8,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct AuDelimiter {
    /// The start of a packet split across chunks.
    carry: Vec<u8>,
    pids: HashMap<u16, Pid>,
    /// Terminators inserted (for statistics and tests).
    pub(crate) terminators: u64,
}

/// What the adaptation field of `p` says: (payload offset, carries stuffing).
fn adaptation(p: &[u8]) -> Option<(usize, bool)> {
    let afc = (p[3] >> 4) & 3;
    if afc & 2 == 0 {
        return Some((4, false));
    }
    let len = usize::from(p[4]);
    if 5 + len > TS_PACKET {
        return None;
    }
    if len == 0 {
        // An empty adaptation field is one byte of stuffing.
        return Some((5, true));
    }
    let flags = p[5];
    let mut need = 1;
    if flags & 0x10 != 0 {
        need += 6; // PCR
    }
    if flags & 0x08 != 0 {
        need += 6; // OPCR
    }
    if flags & 0x04 != 0 {
        need += 1; // splice countdown
    }
    if flags & 0x02 != 0 {
        // transport private data
        let at = 5 + need;
        need += 1 + usize::from(*p.get(at)?);
    }
    if flags & 0x01 != 0 {
        // adaptation field extension
        let at = 5 + need;
        need += 1 + usize::from(*p.get(at)?);
    }
    Some((5 + len, len > need))
}

/// One TS packet on `pid` that starts an empty video PES (header only).
fn terminator(pid: u16, cc: u8) -> [u8; TS_PACKET] {
    let mut p = [0xffu8; TS_PACKET];
    p[0] = 0x47;
    p[1] = 0x40 | ((pid >> 8) as u8 & 0x1f);
    p[2] = pid as u8;
    p[3] = 0x30 | (cc & 0x0f);
    // PES header: start code, stream_id 0xE0, PES_packet_length 0 (as for any video PES),
    // '10' marker bits, no PTS (tsdemux then pushes an empty buffer with no timestamp, which
    // the parser drops), header_data_length 0.
    let pes = [0x00, 0x00, 0x01, 0xe0, 0x00, 0x00, 0x80, 0x00, 0x00];
    // Adaptation field: fills the packet up to the PES header.
    let af_len = TS_PACKET - 4 - 1 - pes.len();
    p[4] = af_len as u8;
    p[5] = 0x00;
    p[TS_PACKET - pes.len()..].copy_from_slice(&pes);
    p
}

impl AuDelimiter {
    /// Forget a partial packet and the open PES (a discontinuity: the demuxer starts over).
    pub(crate) fn discont(&mut self) {
        self.carry.clear();
        for pid in self.pids.values_mut() {
            pid.open = false;
        }
    }

    /// Whether an unbounded video PES is open whose end could not be seen in the bytes so
    /// far (all packets complete, the last one full): it may or may not be complete.
    pub(crate) fn unknown_end(&self) -> bool {
        self.carry.is_empty() && self.pids.values().any(|p| p.open)
    }

    /// Terminate every open PES now; returns the terminator packets (empty if none is open).
    pub(crate) fn terminate_open(&mut self) -> Vec<u8> {
        if !self.carry.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut pids: Vec<u16> = self
            .pids
            .iter()
            .filter(|(_, p)| p.open)
            .map(|(pid, _)| *pid)
            .collect();
        pids.sort_unstable();
        for pid in pids {
            self.terminate(pid, &mut out);
        }
        out
    }

    fn terminate(&mut self, pid: u16, out: &mut Vec<u8>) {
        let state = self.pids.entry(pid).or_default();
        let cc = (state.last_cc + 1) & 0x0f;
        state.last_cc = cc;
        state.cc_shift = (state.cc_shift + 1) & 0x0f;
        state.open = false;
        self.terminators += 1;
        out.extend_from_slice(&terminator(pid, cc));
    }

    /// Passes `data` on (complete packets only; a split packet waits for its rest), with a
    /// terminator after each finished unbounded video PES.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(data);
        let whole = input.len() / TS_PACKET * TS_PACKET;
        let mut out = Vec::with_capacity(whole + TS_PACKET);
        for packet in input[..whole].chunks_exact(TS_PACKET) {
            let start = out.len();
            out.extend_from_slice(packet);
            self.packet(start, &mut out);
        }
        self.carry = input[whole..].to_vec();
        out
    }

    /// Handle the packet at `out[start..]` (already copied there).
    fn packet(&mut self, start: usize, out: &mut Vec<u8>) {
        let p = &mut out[start..start + TS_PACKET];
        if p[0] != 0x47 {
            return;
        }
        let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
        if pid == 0x1fff {
            return;
        }
        let pusi = p[1] & 0x40 != 0;
        let has_payload = (p[3] >> 4) & 1 != 0;
        let Some((payload_at, stuffed)) = adaptation(p) else {
            return;
        };
        let tracked = self.pids.get(&pid).copied();
        // Keep the counter sequence valid after inserted terminators.
        let cc = if let Some(state) = tracked {
            let cc = ((p[3] & 0x0f) + state.cc_shift) & 0x0f;
            p[3] = (p[3] & 0xf0) | cc;
            cc
        } else {
            p[3] & 0x0f
        };
        if !has_payload || payload_at >= TS_PACKET {
            if let Some(state) = self.pids.get_mut(&pid) {
                state.last_cc = cc;
            }
            return;
        }
        let payload = &p[payload_at..];
        let mut open = tracked.is_some_and(|s| s.open);
        let mut first = false;
        if pusi {
            // A new PES: an unbounded video one is followed; anything else is not.
            open = payload.len() >= 6
                && payload[..3] == [0, 0, 1]
                && (0xe0..=0xef).contains(&payload[3])
                && payload[4] == 0
                && payload[5] == 0;
            first = true;
        }

        if !open && tracked.is_none() {
            return;
        }
        let state = self.pids.entry(pid).or_default();
        state.last_cc = cc;
        state.open = open;

        // Stuffing ends the PES; on its first packet only real stuffing bytes count (a
        // flags-only field there may just carry the random-access flag).
        let ends = if first {
            stuffed && p_af_len(&out[start..]) > 1
        } else {
            stuffed
        };
        if open && ends {
            let mut term = Vec::with_capacity(TS_PACKET);
            self.terminate(pid, &mut term);
            out.extend_from_slice(&term);
        }
    }
}

/// The adaptation field length of a packet that has one.
fn p_af_len(p: &[u8]) -> usize {
    if (p[3] >> 4) & 2 != 0 {
        usize::from(p[4])
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet on `pid` with `payload` (at most 184 bytes; shorter ones are stuffed).
    fn packet(pid: u16, pusi: bool, cc: u8, pcr: bool, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x47,
            (pid >> 8) as u8 | if pusi { 0x40 } else { 0 },
            pid as u8,
        ];
        let room = TS_PACKET - 4;
        let af_needed = pcr || payload.len() < room;
        if af_needed {
            p.push(0x30 | cc);
            let af_len = room - 1 - payload.len();
            p.push(af_len as u8);
            if af_len > 0 {
                let mut af = vec![0xffu8; af_len];
                af[0] = if pcr { 0x10 } else { 0x00 };
                if pcr {
                    af[1..7].fill(0);
                }
                p.extend_from_slice(&af);
            }
        } else {
            p.push(0x10 | cc);
        }
        p.extend_from_slice(payload);
        assert_eq!(p.len(), TS_PACKET);
        p
    }

    fn pes_start(len: u16) -> Vec<u8> {
        let mut v = vec![0, 0, 1, 0xe0, (len >> 8) as u8, len as u8, 0x80, 0x80, 5];
        v.extend_from_slice(&[0x21, 0, 1, 0, 1]);
        v
    }

    fn ccs(out: &[u8], pid: u16) -> Vec<u8> {
        out.chunks(TS_PACKET)
            .filter(|p| (u16::from(p[1] & 0x1f) << 8 | u16::from(p[2])) == pid)
            .map(|p| p[3] & 0x0f)
            .collect()
    }

    /// An unbounded PES of three packets (PCR in the first, stuffing in the last).
    fn frame(first_cc: u8) -> Vec<u8> {
        let mut head = pes_start(0);
        head.resize(176, 0xaa);
        let mut v = packet(0x41, true, first_cc, true, &head);
        v.extend(packet(
            0x41,
            false,
            (first_cc + 1) & 15,
            false,
            &[0xbb; 184],
        ));
        v.extend(packet(0x41, false, (first_cc + 2) & 15, false, &[0xcc; 50]));
        v
    }

    #[test]
    fn terminator_follows_the_stuffed_last_packet_and_counters_stay_continuous() {
        let mut d = AuDelimiter::default();
        let out = d.push(&frame(0));
        assert_eq!(out.len(), 4 * TS_PACKET, "three packets and a terminator");
        let term = &out[3 * TS_PACKET..];
        assert_eq!(term[1] & 0x40, 0x40, "terminator starts a PES");
        assert_eq!(&term[TS_PACKET - 9..], &[0, 0, 1, 0xe0, 0, 0, 0x80, 0, 0]);
        assert_eq!(d.terminators, 1);
        assert!(!d.unknown_end());
        // The next frame's counters are shifted past the terminator's.
        let out2 = d.push(&frame(3));
        let mut all = out.clone();
        all.extend(out2);
        assert_eq!(ccs(&all, 0x41), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn split_chunks_and_other_pids_pass_unchanged() {
        let mut d = AuDelimiter::default();
        let f = frame(0);
        let mut out = d.push(&f[..100]);
        assert!(out.is_empty());
        out.extend(d.push(&f[100..376]));
        assert_eq!(out.len(), 2 * TS_PACKET);
        assert!(d.unknown_end(), "open, last packet full");
        out.extend(d.push(&f[376..400]));
        assert!(!d.unknown_end(), "a packet is half there");
        out.extend(d.push(&f[400..]));
        assert_eq!(out.len(), 4 * TS_PACKET);
        assert_eq!(&out[..3 * TS_PACKET], &f[..]);
        // Audio (bounded PES, other stream id) is never touched.
        let mut audio_pes = vec![0, 0, 1, 0xc0, 0, 20];
        audio_pes.resize(26, 1);
        let a = packet(0x42, true, 7, false, &audio_pes);
        assert_eq!(d.push(&a), a);
    }

    #[test]
    fn bounded_video_pes_and_exact_fit_end() {
        let mut d = AuDelimiter::default();
        // PES_packet_length set: tsdemux sees the end itself.
        let mut head = pes_start(100);
        head.resize(109, 0);
        let p = packet(0x41, true, 0, false, &head);
        assert_eq!(d.push(&p), p);
        // Unbounded, ending exactly on a full packet: unknown end, terminated on request.
        let mut head = pes_start(0);
        head.resize(184, 0);
        let p = packet(0x41, true, 1, false, &head);
        assert_eq!(d.push(&p), p);
        assert!(d.unknown_end());
        let t = d.terminate_open();
        assert_eq!(t.len(), TS_PACKET);
        assert_eq!(t[3] & 0x0f, 2);
        assert!(!d.unknown_end());
        assert!(d.terminate_open().is_empty());
    }
}

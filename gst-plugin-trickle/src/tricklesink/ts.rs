// SPDX-License-Identifier: MPL-2.0
//! Just enough MPEG-TS parsing for segment boundaries: packet PIDs and the PMT PID of a PAT.

/// TS packet size.
pub(crate) const PACKET: usize = 188;
/// TS sync byte.
pub(crate) const SYNC: u8 = 0x47;

/// The PID of a packet (None if it is not a TS packet).
pub(crate) fn pid(packet: &[u8]) -> Option<u16> {
    if packet.len() < 4 || packet[0] != SYNC {
        return None;
    }
    Some((u16::from(packet[1] & 0x1f) << 8) | u16::from(packet[2]))
}

/// Whether the packet starts a payload unit (PES or section start).
pub(crate) fn payload_unit_start(packet: &[u8]) -> bool {
    packet.len() >= 4 && packet[1] & 0x40 != 0
}

/// The payload of a packet (after the adaptation field), if any.
pub(crate) fn payload(packet: &[u8]) -> Option<&[u8]> {
    if packet.len() != PACKET || packet[0] != SYNC {
        return None;
    }
    let afc = (packet[3] >> 4) & 0x3;
    if afc & 0x1 == 0 {
        return None;
    }
    let start = if afc & 0x2 != 0 {
        5 + usize::from(*packet.get(4)?)
    } else {
        4
    };
    packet.get(start..)
}

/// The PMT PID of the first program in a PAT packet (PID 0, section start).
pub(crate) fn pat_pmt_pid(packet: &[u8]) -> Option<u16> {
    if pid(packet)? != 0 || !payload_unit_start(packet) {
        return None;
    }
    let payload = payload(packet)?;
    let pointer = usize::from(*payload.first()?);
    let section = payload.get(1 + pointer..)?;
    if *section.first()? != 0 {
        return None;
    }
    let section_length =
        (usize::from(*section.get(1)? & 0x0f) << 8) | usize::from(*section.get(2)?);
    // 3 header bytes + section_length, of which the last 4 are the CRC.
    let end = (3 + section_length).checked_sub(4)?;
    let mut i = 8;
    while i + 4 <= end {
        let entry = section.get(i..i + 4)?;
        let program = (u16::from(entry[0]) << 8) | u16::from(entry[1]);
        let pid = (u16::from(entry[2] & 0x1f) << 8) | u16::from(entry[3]);
        if program != 0 {
            return Some(pid);
        }
        i += 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PAT as mpegtsmux writes it: program 1 -> PMT PID 0x20.
    fn pat() -> Vec<u8> {
        let mut p = vec![0xffu8; PACKET];
        p[..4].copy_from_slice(&[0x47, 0x40, 0x00, 0x10]);
        let section = [
            0x00, // pointer
            0x00, 0xb0, 0x0d, 0x00, 0x01, 0xc1, 0x00, 0x00, // header, section_length 13
            0x00, 0x01, 0xe0, 0x20, // program 1 -> PID 0x20
            0x00, 0x00, 0x00, 0x00, // CRC (not checked)
        ];
        p[4..4 + section.len()].copy_from_slice(&section);
        p
    }

    #[test]
    fn parses_pat() {
        let p = pat();
        assert_eq!(pid(&p), Some(0));
        assert!(payload_unit_start(&p));
        assert_eq!(pat_pmt_pid(&p), Some(0x20));
        assert_eq!(pat_pmt_pid(&p[..10]), None);
        let mut not_pat = p.clone();
        not_pat[2] = 0x20;
        assert_eq!(pat_pmt_pid(&not_pat), None);
        assert_eq!(pid(b"xyz1"), None);
    }
}

// SPDX-License-Identifier: MPL-2.0
//! The trickle protocol as Rivulet speaks it (`docs/trickle.md`, which also marks the go-livepeer
//! 2026 additions: `GET /{channel}/next`, `Lp-Trickle-Seq` on POST answers, `Lp-Trickle-Reset`,
//! empty writes consuming a seq): an async server ([`server`], axum/hyper) and an async client
//! ([`client`], reqwest).
//!
//! A *channel* is a named publish/subscribe topic; its data is cut into numbered *segments*
//! (seq 0, 1, 2, …), one HTTP request per segment. The server keeps a ring of the last
//! [`RING_SIZE`] segments per channel and relays every chunk to every waiting subscriber as it
//! arrives. Clients preconnect the request for the next segment so that connection set-up is
//! never on the critical path.
//!
//! Deviations from the reference implementations (all documented where they apply):
//! - the server does not send the `100 Continue` keepalive every 10 s on a POST waiting for its
//!   first byte (hyper 1 has no API for unsolicited informational responses; see [`server`]);
//! - the server refuses channel names outside `[A-Za-z0-9_-]{1,256}` with 400, caps segments (413)
//!   and channels (503), and answers 400 to negative seqs other than -1/-2 (Rivulet's own rules:
//!   `docs/trickle.md`, "URLs and channel names", "Seq rules" and "Server limits");
//! - the server bounds connections (503 + close), request heads (408), idle POST bodies (408,
//!   the segment closed), stuck response writes (dropped) and waiting subscribers (503), and
//!   closes a segment whose POST body failed mid-way once it has been idle that long (the
//!   reference leaves it open: `docs/trickle.md`, "Publishing a segment", step 6); see
//!   "Limits" in [`server`];
//! - an empty write (an empty body, or a preconnect released by a close) moves `nextWrite` to
//!   seq + 1 but never backwards, so a preconnect released late cannot pull the write head
//!   back behind segments already written (`docs/trickle.md`, "Empty writes");
//! - the publisher re-POSTs an untouched segment at most [`client::MAX_UNTOUCHED_RETRIES`] times
//!   (the gateway retries "while the next segment has not started"); the writer then fails, its
//!   unsent data is dropped and the next segment is sent under that seq (`docs/trickle.md`,
//!   publisher rule P5);
//! - the optional before-create / before-delete hooks of the reference server are not
//!   implemented (nothing in Rivulet needs them).

pub mod client;
pub mod server;

/// Header: the seq actually served (GET) or written (POST response).
pub const HEADER_SEQ: &str = "Lp-Trickle-Seq";
/// Header: the server's `nextWrite` when the request was handled.
pub const HEADER_LATEST: &str = "Lp-Trickle-Latest";
/// Header: the channel was closed or deleted (any non-empty value means end of stream).
pub const HEADER_CLOSED: &str = "Lp-Trickle-Closed";
/// Header (publisher → server): "the publisher restarted"; close every older ring segment.
pub const HEADER_RESET: &str = "Lp-Trickle-Reset";
/// Header on an explicit create POST: the channel's MIME type.
pub const HEADER_EXPECT_CONTENT: &str = "Expect-Content";

/// Number of segment slots per channel (`maxSegmentsPerStream`).
pub const RING_SIZE: usize = 5;

/// Custom status: the channel exists, the segment does not.
pub const STATUS_SEGMENT_NOT_FOUND: u16 = 470;

/// The longest channel name the server accepts.
pub const MAX_CHANNEL_NAME_LEN: usize = 256;

/// Whether `name` is an acceptable channel name: 1 to [`MAX_CHANNEL_NAME_LEN`] characters of
/// `[A-Za-z0-9_-]` (`docs/trickle.md`, "URLs and channel names"; other characters are refused).
pub fn is_valid_channel_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `name` is reserved for internal channels (begins with `_`): never swept, never
/// auto-created by client requests.
pub fn is_reserved_channel_name(name: &str) -> bool {
    name.starts_with('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(is_valid_channel_name("abc"));
        assert!(is_valid_channel_name("0123abcd-out"));
        assert!(is_valid_channel_name("_changes"));
        assert!(is_valid_channel_name(&"a".repeat(128)));
        assert!(is_valid_channel_name(&"a".repeat(MAX_CHANNEL_NAME_LEN)));
        assert!(!is_valid_channel_name(
            &"a".repeat(MAX_CHANNEL_NAME_LEN + 1)
        ));
        assert!(!is_valid_channel_name(""));
        assert!(!is_valid_channel_name("a b"));
        assert!(!is_valid_channel_name("a.b"));
        assert!(!is_valid_channel_name("a/b"));
        assert!(!is_valid_channel_name("é"));
        assert!(is_reserved_channel_name("_x"));
        assert!(!is_reserved_channel_name("x_"));
    }
}

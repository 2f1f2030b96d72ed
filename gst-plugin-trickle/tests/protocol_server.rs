// SPDX-License-Identifier: MPL-2.0
//! Trickle server tests (`docs/trickle.md`, "Concepts" to "Server limits"): a real server on
//! 127.0.0.1:0, driven with reqwest or raw TCP where the exact bytes on the wire matter.

mod protocol_common;

use std::time::Duration;

use gsttrickle::protocol::server::{ServerConfig, ServerError, TrickleServer};
use protocol_common::*;
use tokio::io::AsyncWriteExt;

// ---- Endpoints (docs/trickle.md) ------------------------------------------------------------

#[tokio::test]
async fn create_endpoint_dev_and_orchestrator_mode() {
    let dev = start_dev().await;
    let url = dev.url("created");
    let r = http()
        .post(&url)
        .header("Expect-Content", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(dev.server().channel_names().contains(&"created".to_owned()));
    // Again: exists -> 200.
    let r = http().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The MIME type from Expect-Content is served as Content-Type.
    assert_eq!(post(&format!("{url}/0"), b"{}").await.status(), 200);
    let r = get(&format!("{url}/0")).await;
    assert_eq!(hdr(&r, "content-type").as_deref(), Some("application/json"));

    let orch = start(ServerConfig::default()).await;
    let url = orch.url("nope");
    let r = http().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "Stream not found");
    orch.server().create_channel("nope", "video/MP2T").unwrap();
    assert_eq!(http().post(&url).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn publish_then_subscribe_headers_and_body() {
    let h = start_dev().await;
    let url = h.url("pub");
    let r = post(&format!("{url}/0"), b"hello").await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    let r = get(&format!("{url}/0")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("1"));
    assert_eq!(hdr(&r, "content-type").as_deref(), Some("video/MP2T"));
    assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    assert_eq!(&r.bytes().await.unwrap()[..], b"hello");
}

#[tokio::test]
async fn post_minus_one_is_next_write_and_get_minus_two_is_current() {
    let h = start_dev().await;
    let url = h.url("neg");
    let r = post(&format!("{url}/-1"), b"a").await;
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    let r = post(&format!("{url}/-1"), b"b").await;
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("1"));
    let r = get(&format!("{url}/-2")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("1"));
    assert_eq!(&r.bytes().await.unwrap()[..], b"b");
    // -1 waits for the next segment (2).
    let waiting = spawn_get(format!("{url}/-1"));
    wait_attached(h.server(), "neg", 2, 1, 0).await;
    let r = post(&format!("{url}/2"), b"c").await;
    assert_eq!(r.status(), 200);
    let r = bounded("GET -1", waiting).await.unwrap();
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("2"));
    assert_eq!(&r.bytes().await.unwrap()[..], b"c");
}

#[tokio::test]
async fn get_minus_two_on_fresh_channel_waits_for_seq_zero() {
    let h = start_dev().await;
    h.server().create_channel("fresh", "video/MP2T").unwrap();
    let url = h.url("fresh");
    let waiting = spawn_get(format!("{url}/-2"));
    assert_eq!(post(&format!("{url}/0"), b"x").await.status(), 200);
    let r = bounded("GET -2", waiting).await.unwrap();
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    assert_eq!(&r.bytes().await.unwrap()[..], b"x");
}

#[tokio::test]
async fn next_endpoint() {
    let h = start_dev().await;
    let url = h.url("nx");
    assert_eq!(get(&format!("{url}/next")).await.status(), 404);
    h.server().create_channel("nx", "video/MP2T").unwrap();
    let r = get(&format!("{url}/next")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("0"));
    assert_eq!(r.text().await.unwrap(), "0");
    post(&format!("{url}/0"), b"a").await;
    post(&format!("{url}/1"), b"b").await;
    let r = get(&format!("{url}/next")).await;
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("2"));
    assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    assert_eq!(r.text().await.unwrap(), "2");
    // POST to /next is not an integer seq.
    assert_eq!(post(&format!("{url}/next"), b"z").await.status(), 400);
}

#[tokio::test]
async fn delete_segment_and_channel() {
    let h = start_dev().await;
    let url = h.url("del");
    let c = http();
    // Unknown channel: DELETE seq -> 404, DELETE channel -> 400 Invalid stream.
    assert_eq!(
        c.delete(format!("{url}/0")).send().await.unwrap().status(),
        404
    );
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), "Invalid stream");

    post(&format!("{url}/0"), b"a").await;
    assert_eq!(
        c.delete(format!("{url}/0")).send().await.unwrap().status(),
        200
    );
    let r = c.delete(format!("{url}/3")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), "Nonexistent segment");
    let r = c.delete(format!("{url}/x")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    assert_eq!(c.delete(&url).send().await.unwrap().status(), 200);
    assert!(!h.server().channel_names().contains(&"del".to_owned()));
    assert_eq!(get(&format!("{url}/0")).await.status(), 404);
}

#[tokio::test]
async fn delete_segment_releases_waiting_subscriber_and_publisher() {
    let h = start_dev().await;
    h.server().create_channel("dsr", "video/MP2T").unwrap();
    let url = h.url("dsr");
    let sub = spawn_get(format!("{url}/0"));
    // A preconnected POST waiting for its first byte (raw: headers only, no body yet).
    let mut publisher = raw(h.local_addr(), &chunked_post("/dsr/0", "")).await;
    wait_attached(h.server(), "dsr", 0, 1, 1).await;
    let del = http().delete(format!("{url}/0")).send().await.unwrap();
    assert_eq!(del.status(), 200);
    let r = bounded("released GET", sub).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    assert!(r.bytes().await.unwrap().is_empty());
    let head = bounded("released POST", read_head(&mut publisher)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-seq"), Some("0"));
    assert_eq!(head.header("connection"), Some("close"));
}

// ---- Status codes (docs/trickle.md) ---------------------------------------------------------

#[tokio::test]
async fn status_codes_for_bad_requests() {
    let h = start_dev().await;
    let url = h.url("bad");
    post(&format!("{url}/0"), b"a").await;
    for (method, path, want) in [
        ("GET", "abc", 400),
        ("GET", "1.5", 400),
        ("GET", "-3", 400),
        ("GET", "-100", 400),
        ("POST", "abc", 400),
        ("POST", "-2", 400),
        ("POST", "-3", 400),
        ("DELETE", "-1", 400),
    ] {
        let r = http()
            .request(method.parse().unwrap(), format!("{url}/{path}"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{method} {path}");
    }
    let r = get(&format!("{url}/abc")).await;
    assert_eq!(r.text().await.unwrap(), "Invalid idx");
    // Unknown channel.
    assert_eq!(get(&h.url("unknown/0")).await.status(), 404);
    // GET never auto-creates, even in development mode.
    assert!(!h.server().channel_names().contains(&"unknown".to_owned()));
    // The server is still healthy.
    assert_eq!(get(&format!("{url}/0")).await.status(), 200);
}

#[tokio::test]
async fn bad_channel_names_are_refused() {
    let h = start_dev().await;
    let base = format!("http://{}/", h.local_addr());
    let long = "a".repeat(300);
    for name in ["a.b", "a%20b", "%C3%A9", long.as_str()] {
        let r = post(&format!("{base}{name}/0"), b"x").await;
        assert_eq!(r.status(), 400, "{name}");
        let r = http().post(format!("{base}{name}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{name}");
    }
    // Names of the documented families are accepted.
    let ok = "runner1-0123456789abcdef-o2r";
    assert_eq!(post(&format!("{base}{ok}/0"), b"x").await.status(), 200);
    assert_eq!(
        post(&format!("{base}{}/0", "b".repeat(128)), b"x")
            .await
            .status(),
        200
    );
    assert_eq!(
        TrickleServer::new(ServerConfig::default()).create_channel("a b", "x"),
        Err(ServerError::InvalidName("a b".to_owned()))
    );
    // Clients cannot auto-create reserved names.
    assert_eq!(post(&format!("{base}_mine/0"), b"x").await.status(), 404);
}

#[tokio::test]
async fn missing_segment_is_470_with_latest_and_seq() {
    let h = start_dev().await;
    let url = h.url("miss");
    // nextWrite == 0: seq 1 is precreated (waits), seq 2 is missing.
    let r = get(&format!("{url}/2")).await;
    assert_eq!(r.status(), 404, "channel does not exist yet");
    h.server().create_channel("miss", "video/MP2T").unwrap();
    let r = get(&format!("{url}/2")).await;
    assert_eq!(r.status(), 470);
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("0"));
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("2"));
    assert_eq!(r.text().await.unwrap(), "Entry not found");
    let pre1 = spawn_get(format!("{url}/1"));
    post(&format!("{url}/0"), b"zero").await;
    post(&format!("{url}/1"), b"one").await;
    let r = bounded("precreated seq 1", pre1).await.unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], b"one");
}

#[tokio::test]
async fn ring_of_five_evicts_old_segments() {
    let h = start_dev().await;
    let url = h.url("ring");
    for i in 0..7 {
        post(&format!("{url}/{i}"), b"data").await;
    }
    // Slots hold 2..=6; 0 and 1 were evicted.
    for old in [0, 1] {
        let r = get(&format!("{url}/{old}")).await;
        assert_eq!(r.status(), 470, "seq {old}");
        assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("7"));
        assert_eq!(
            hdr(&r, "lp-trickle-seq").as_deref(),
            Some(old.to_string().as_str())
        );
    }
    for kept in 2..7 {
        let r = get(&format!("{url}/{kept}")).await;
        assert_eq!(r.status(), 200, "seq {kept}");
        assert_eq!(&r.bytes().await.unwrap()[..], b"data");
    }
    // Too far ahead.
    assert_eq!(get(&format!("{url}/9")).await.status(), 470);
}

#[tokio::test]
async fn channel_cap_gives_503() {
    let h = start(ServerConfig {
        max_channels: 2,
        ..ServerConfig::development()
    })
    .await;
    assert_eq!(post(&h.url("c1/0"), b"x").await.status(), 200);
    assert_eq!(post(&h.url("c2/0"), b"x").await.status(), 200);
    let r = post(&h.url("c3/0"), b"x").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("Too many"));
    assert_eq!(http().post(h.url("c3")).send().await.unwrap().status(), 503);
    assert_eq!(
        h.server().create_channel("c3", "video/MP2T"),
        Err(ServerError::TooManyChannels(2))
    );
    // The changefeed channel does not count, and existing channels still work.
    assert_eq!(post(&h.url("c1/1"), b"y").await.status(), 200);
}

// ---- Size cap (docs/trickle.md, "Server limits") --------------------------------------------

fn small_cap() -> ServerConfig {
    ServerConfig {
        max_segment_bytes: 1000,
        ..ServerConfig::development()
    }
}

#[tokio::test]
async fn oversize_content_length_is_413_at_once() {
    let h = start(small_cap()).await;
    h.server().create_channel("cap", "video/MP2T").unwrap();
    // Headers only: the server must answer before any body byte is sent.
    let mut s = raw(
        h.local_addr(),
        b"POST /cap/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
    )
    .await;
    let head = bounded("413", read_head(&mut s)).await;
    assert_eq!(head.status, 413);
    // An exact-cap body is fine.
    let body = vec![7u8; 1000];
    let r = http().post(h.url("cap/1")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        get(&h.url("cap/1")).await.bytes().await.unwrap().len(),
        1000
    );
}

#[tokio::test]
async fn oversize_chunked_body_is_cut_with_413_and_readers_see_the_end() {
    let h = start(small_cap()).await;
    h.server().create_channel("capc", "video/MP2T").unwrap();
    let sub = spawn_get(h.url("capc/0"));
    let mut s = raw(h.local_addr(), &chunked_post("/capc/0", "")).await;
    s.write_all(&chunk(&[1u8; 600])).await.unwrap();
    s.write_all(&chunk(&[2u8; 600])).await.unwrap();
    let head = bounded("413", read_head(&mut s)).await;
    assert_eq!(head.status, 413);
    assert_eq!(head.header("connection"), Some("close"));
    // The reader got the accepted part and then the end of the segment.
    let r = bounded("subscriber", sub).await.unwrap();
    let body = bounded("body", r.bytes()).await.unwrap();
    assert_eq!(&body[..], &[1u8; 600][..]);
    // Still healthy.
    assert_eq!(post(&h.url("capc/1"), b"ok").await.status(), 200);
}

// ---- Publishing a segment (docs/trickle.md) ------------------------------------------------

#[tokio::test]
async fn headers_only_with_first_byte_and_live_relay() {
    let h = start_dev().await;
    h.server().create_channel("live", "video/MP2T").unwrap();
    let mut sub = raw(h.local_addr(), b"GET /live/0 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut publisher = raw(h.local_addr(), &chunked_post("/live/0", "")).await;
    // A waiting GET gets nothing at all, not even headers, until data exists.
    let mut probe = [0u8; 1];
    let early = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::io::AsyncReadExt::read(&mut sub, &mut probe),
    )
    .await;
    assert!(
        early.is_err(),
        "the subscriber got bytes before any data was published"
    );
    publisher.write_all(&chunk(b"first-chunk")).await.unwrap();
    let head = bounded("subscriber head", read_head(&mut sub)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-seq"), Some("0"));
    assert_eq!(head.header("content-type"), Some("video/MP2T"));
    // The first chunk arrives while the publisher has not finished.
    let got = bounded(
        "first chunk",
        read_until(&mut sub, head.rest, b"first-chunk"),
    )
    .await;
    publisher.write_all(&chunk(b"second")).await.unwrap();
    let got = bounded("second chunk", read_until(&mut sub, got, b"second")).await;
    publisher.write_all(b"0\r\n\r\n").await.unwrap();
    let phead = bounded("publisher response", read_head(&mut publisher)).await;
    assert_eq!(phead.status, 200);
    assert_eq!(phead.header("lp-trickle-seq"), Some("0"));
    // The chunked response ends.
    bounded("terminal chunk", read_until(&mut sub, got, b"0\r\n\r\n")).await;
}

#[tokio::test]
async fn many_subscribers_and_late_joiner_get_identical_bytes() {
    let h = start_dev().await;
    h.server().create_channel("fan", "video/MP2T").unwrap();
    let url = h.url("fan/0");
    let early: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await.bytes().await.unwrap() })
        })
        .collect();
    let mut s = raw(h.local_addr(), &chunked_post("/fan/0", "")).await;
    let mut expected = Vec::new();
    for i in 0..50u8 {
        let data = vec![i; 1000 + i as usize];
        expected.extend_from_slice(&data);
        s.write_all(&chunk(&data)).await.unwrap();
        if i == 25 {
            // A late joiner mid-segment still gets everything from byte 0. Wait until the
            // server has the bytes so far (a reader sees them).
            let mid = get(&url).await;
            assert_eq!(mid.status(), 200);
        }
    }
    let late = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await.bytes().await.unwrap() }
    });
    s.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(bounded("publish", read_head(&mut s)).await.status, 200);
    for t in early {
        assert_eq!(
            &bounded("early subscriber", t).await.unwrap()[..],
            &expected[..]
        );
    }
    assert_eq!(
        &bounded("late subscriber", late).await.unwrap()[..],
        &expected[..]
    );
    assert_eq!(&get(&url).await.bytes().await.unwrap()[..], &expected[..]);
}

#[tokio::test]
async fn empty_post_advances_next_write_and_serves_empty_200() {
    let h = start_dev().await;
    let url = h.url("empty");
    post(&format!("{url}/0"), b"a").await;
    let r = post(&format!("{url}/1"), b"").await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("1"));
    assert_eq!(hdr(&r, "connection").as_deref(), Some("close"));
    let r = get(&format!("{url}/next")).await;
    assert_eq!(r.text().await.unwrap(), "2");
    let r = get(&format!("{url}/1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("1"));
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("2"));
    assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn re_post_appends_to_the_same_segment() {
    let h = start_dev().await;
    let url = h.url("again");
    post(&format!("{url}/0"), b"abc").await;
    assert_eq!(
        &get(&format!("{url}/0")).await.bytes().await.unwrap()[..],
        b"abc"
    );
    post(&format!("{url}/0"), b"def").await;
    assert_eq!(
        &get(&format!("{url}/0")).await.bytes().await.unwrap()[..],
        b"abcdef"
    );
}

#[tokio::test]
async fn reset_header_closes_older_open_segments() {
    let h = start_dev().await;
    h.server().create_channel("rst", "video/MP2T").unwrap();
    // Seq 0 is left open by a publisher that stopped sending.
    let mut dead = raw(h.local_addr(), &chunked_post("/rst/0", "")).await;
    dead.write_all(&chunk(b"partial")).await.unwrap();
    let stuck = get(&h.url("rst/0")).await;
    assert_eq!(stuck.status(), 200);
    let stuck = tokio::spawn(stuck.bytes());
    let r = http()
        .post(h.url("rst/1"))
        .header("Lp-Trickle-Reset", "1")
        .body("fresh")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = bounded("released reader", stuck).await.unwrap().unwrap();
    assert_eq!(&body[..], b"partial");
}

#[tokio::test]
async fn publisher_disconnect_mid_body_leaves_segment_open_until_delete() {
    let h = start_dev().await;
    h.server().create_channel("cut", "video/MP2T").unwrap();
    let mut s = raw(h.local_addr(), &chunked_post("/cut/0", "")).await;
    s.write_all(&chunk(b"part-one")).await.unwrap();
    let r = get(&h.url("cut/0")).await;
    assert_eq!(r.status(), 200);
    let reader = tokio::spawn(r.bytes());
    drop(s); // abrupt disconnect
    // The segment is not closed: the reader keeps waiting...
    let mut reader = reader;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut reader)
            .await
            .is_err(),
        "the reader ended although nothing closed the segment"
    );
    // ...until the publisher DELETEs it.
    assert_eq!(
        http().delete(h.url("cut/0")).send().await.unwrap().status(),
        200
    );
    let body = bounded("reader", reader).await.unwrap().unwrap();
    assert_eq!(&body[..], b"part-one");
    // The server is healthy.
    assert_eq!(post(&h.url("cut/1"), b"ok").await.status(), 200);
    assert_eq!(
        &get(&h.url("cut/1")).await.bytes().await.unwrap()[..],
        b"ok"
    );
}

#[tokio::test]
async fn subscriber_disconnect_affects_nobody_else() {
    let h = start_dev().await;
    h.server().create_channel("sd", "video/MP2T").unwrap();
    let mut p = raw(h.local_addr(), &chunked_post("/sd/0", "")).await;
    p.write_all(&chunk(b"one")).await.unwrap();
    let mut gone = raw(h.local_addr(), b"GET /sd/0 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let head = bounded("head", read_head(&mut gone)).await;
    assert_eq!(head.status, 200);
    drop(gone);
    let stay = get(&h.url("sd/0")).await;
    let stay = tokio::spawn(stay.bytes());
    p.write_all(&chunk(b"two")).await.unwrap();
    p.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(bounded("publish", read_head(&mut p)).await.status, 200);
    assert_eq!(
        &bounded("stay", stay).await.unwrap().unwrap()[..],
        b"onetwo"
    );
}

// ---- Close, idle sweep, changefeed, modes (docs/trickle.md) ---------------------------------

#[tokio::test]
async fn closing_a_channel_releases_subscribers_and_preconnected_publishers() {
    let h = start_dev().await;
    h.server().create_channel("bye", "video/MP2T").unwrap();
    let sub = spawn_get(h.url("bye/0"));
    let mut publisher = raw(h.local_addr(), &chunked_post("/bye/0", "")).await;
    wait_attached(h.server(), "bye", 0, 1, 1).await;
    let c = http();
    assert_eq!(c.delete(h.url("bye")).send().await.unwrap().status(), 200);
    let r = bounded("released subscriber", sub).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-closed").as_deref(), Some("terminated"));
    let head = bounded("released publisher", read_head(&mut publisher)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-closed"), Some("terminated"));
    // Later requests: 404.
    assert_eq!(get(&h.url("bye/0")).await.status(), 404);
    assert_eq!(
        post(&h.url("bye/5"), b"x").await.status(),
        200,
        "dev mode re-creates on POST"
    );
    assert_eq!(
        h.server().channel_info("bye").map(|i| i.next_write),
        Some(6)
    );
}

#[tokio::test]
async fn in_process_close_ends_streaming_subscriber_body() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("ip", "video/MP2T").unwrap();
    assert_eq!(h.server().channel_names(), vec!["ip".to_owned()]);
    let mut p = raw(h.local_addr(), &chunked_post("/ip/0", "")).await;
    p.write_all(&chunk(b"some")).await.unwrap();
    let r = get(&h.url("ip/0")).await;
    assert_eq!(r.status(), 200);
    let body = tokio::spawn(r.bytes());
    assert!(h.server().close_channel("ip"));
    assert!(!h.server().close_channel("ip"));
    assert_eq!(
        &bounded("body end", body).await.unwrap().unwrap()[..],
        b"some"
    );
    assert!(h.server().channel_names().is_empty());
}

#[tokio::test]
async fn orchestrator_mode_post_to_unknown_channel_is_404_with_connection_close() {
    let h = start(ServerConfig::default()).await;
    let mut s = raw(h.local_addr(), &chunked_post("/ghost/0", "")).await;
    let head = bounded("404", read_head(&mut s)).await;
    assert_eq!(head.status, 404);
    assert_eq!(head.header("connection"), Some("close"));
    assert!(h.server().channel_names().is_empty());
}

#[tokio::test]
async fn base_path_is_honoured() {
    let h = start(ServerConfig {
        base_path: "/ai/trickle/".to_owned(),
        ..ServerConfig::development()
    })
    .await;
    assert_eq!(
        h.url("bp"),
        format!("http://{}/ai/trickle/bp", h.local_addr())
    );
    assert_eq!(post(&h.url("bp/0"), b"x").await.status(), 200);
    assert_eq!(&get(&h.url("bp/0")).await.bytes().await.unwrap()[..], b"x");
    let outside = format!("http://{}/bp/0", h.local_addr());
    assert_eq!(get(&outside).await.status(), 404);
    // Normalisation of a base without slashes.
    let s = TrickleServer::new(ServerConfig {
        base_path: "x/y".to_owned(),
        ..ServerConfig::default()
    });
    assert_eq!(s.base_path(), "/x/y/");
}

async fn next_change(url: &str, seq: i64) -> serde_json::Value {
    let r = bounded("change", get(&format!("{url}/{seq}"))).await;
    assert_eq!(r.status(), 200);
    let body = bounded("change body", r.bytes()).await.unwrap();
    serde_json::from_slice(&body).expect("changefeed JSON")
}

#[tokio::test]
async fn changefeed_reports_adds_and_removes() {
    let h = start_dev().await;
    let feed = h.url("_changes");
    post(&h.url("cf1/0"), b"x").await;
    assert_eq!(
        next_change(&feed, 0).await,
        serde_json::json!({"added": ["cf1"]})
    );
    h.server()
        .create_channel("cf2", "application/json")
        .unwrap();
    assert_eq!(
        next_change(&feed, 1).await,
        serde_json::json!({"added": ["cf2"]})
    );
    http().delete(h.url("cf1")).send().await.unwrap();
    assert_eq!(
        next_change(&feed, 2).await,
        serde_json::json!({"removed": ["cf1"]})
    );
    // Off in orchestrator mode.
    let o = start(ServerConfig::default()).await;
    assert_eq!(get(&o.url("_changes/0")).await.status(), 404);
}

#[tokio::test]
async fn idle_sweep_closes_idle_channels_but_not_internal_ones() {
    // The periodic sweeper, with short settings.
    let h = start(ServerConfig {
        idle_timeout: Duration::from_millis(100),
        sweep_interval: Duration::from_millis(20),
        ..ServerConfig::development()
    })
    .await;
    let feed = h.url("_changes");
    h.server().create_channel("idle", "video/MP2T").unwrap();
    assert_eq!(
        next_change(&feed, 0).await,
        serde_json::json!({"added": ["idle"]})
    );
    assert_eq!(
        next_change(&feed, 1).await,
        serde_json::json!({"removed": ["idle"]})
    );
    assert_eq!(h.server().channel_names(), vec!["_changes".to_owned()]);
    assert_eq!(get(&h.url("idle/0")).await.status(), 404);
}

#[tokio::test]
async fn sweep_releases_waiting_subscribers_and_spares_active_channels() {
    // Sweeps run by hand here (the periodic sweeper is set to an hour).
    let config = |idle| ServerConfig {
        idle_timeout: idle,
        sweep_interval: Duration::from_secs(3600),
        ..ServerConfig::development()
    };
    let busy = start(config(Duration::from_secs(3600))).await;
    busy.server().create_channel("busy", "video/MP2T").unwrap();
    assert!(busy.server().sweep_idle().is_empty());
    assert!(busy.server().channel_info("busy").is_some());

    let h = start(config(Duration::ZERO)).await;
    h.server().create_channel("idle", "video/MP2T").unwrap();
    let sub = spawn_get(h.url("idle/0"));
    wait_attached(h.server(), "idle", 0, 1, 0).await;
    assert_eq!(h.server().sweep_idle(), vec!["idle".to_owned()]);
    let r = bounded("released subscriber", sub).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-closed").as_deref(), Some("terminated"));
    // Internal channels are never swept.
    assert_eq!(h.server().channel_names(), vec!["_changes".to_owned()]);
}

#[tokio::test]
async fn shutdown_releases_waiters() {
    let h = start_dev().await;
    h.server().create_channel("sh", "video/MP2T").unwrap();
    let sub = spawn_get(h.url("sh/0"));
    wait_attached(h.server(), "sh", 0, 1, 0).await;
    let server = h.server().clone();
    bounded("shutdown", h.shutdown()).await;
    assert!(server.channel_names().is_empty());
    let r = bounded("subscriber after shutdown", sub).await.unwrap();
    assert_eq!(hdr(&r, "lp-trickle-closed").as_deref(), Some("terminated"));
}

#[tokio::test]
async fn waiting_subscriber_that_disconnects_is_dropped() {
    let h = start_dev().await;
    h.server().create_channel("gone", "video/MP2T").unwrap();
    let s = raw(h.local_addr(), b"GET /gone/0 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    wait_attached(h.server(), "gone", 0, 1, 0).await;
    drop(s);
    wait_until("the server to drop the waiting GET", || {
        h.server()
            .channel_info("gone")
            .is_some_and(|i| i.segments.iter().all(|s| s.readers == 0))
    })
    .await;
}

#[tokio::test]
async fn extreme_seqs_do_not_break_the_server() {
    let h = start_dev().await;
    let max = i64::MAX;
    let r = post(&h.url(&format!("ext/{max}")), b"x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq"), Some(max.to_string()));
    let r = get(&h.url(&format!("ext/{max}"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], b"x");
    // Beyond i64 is not an integer seq.
    assert_eq!(get(&h.url("ext/99999999999999999999")).await.status(), 400);
    assert_eq!(
        get(&h.url(&format!("ext/{}", i64::MIN))).await.status(),
        400
    );
    assert_eq!(post(&h.url("ext/0"), b"ok").await.status(), 200);
}

#[tokio::test]
async fn body_read_error_is_500_and_leaves_the_segment_open() {
    let h = start_dev().await;
    h.server().create_channel("broken", "video/MP2T").unwrap();
    let mut s = raw(h.local_addr(), &chunked_post("/broken/0", "")).await;
    s.write_all(&chunk(b"good")).await.unwrap();
    let r = get(&h.url("broken/0")).await;
    assert_eq!(r.status(), 200);
    let mut reader = tokio::spawn(r.bytes());
    // Invalid chunked encoding: a body read error.
    s.write_all(b"zz\r\nnot hex\r\n").await.unwrap();
    let head = bounded("500", read_head(&mut s)).await;
    assert_eq!(head.status, 500);
    let rest = bounded("connection close", read_to_close(&mut s, head.rest)).await;
    assert!(String::from_utf8_lossy(&rest).contains("Server error"));
    // The segment is not closed on this path (`docs/trickle.md`, "Publishing a segment", step 6).
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut reader)
            .await
            .is_err(),
        "the reader ended although nothing closed the segment"
    );
    let info = h.server().channel_info("broken").unwrap();
    assert!(
        info.segments
            .iter()
            .any(|s| s.seq == 0 && !s.closed && s.bytes == 4)
    );
    assert!(h.server().close_channel("broken"));
    assert_eq!(
        &bounded("reader", reader).await.unwrap().unwrap()[..],
        b"good"
    );
}

#[tokio::test]
async fn mixed_tiny_and_large_chunks_reach_every_reader_intact() {
    let h = start_dev().await;
    h.server().create_channel("mix", "video/MP2T").unwrap();
    let url = h.url("mix/0");
    let early = spawn_get(url.clone());
    let mut s = raw(h.local_addr(), &chunked_post("/mix/0", "")).await;
    let sizes = [
        1usize, 5000, 3, 10_000, 4095, 4096, 1, 1, 1, 70_000, 2, 4097, 100,
    ];
    let mut expected = Vec::new();
    let mut mid = None;
    for (round, &n) in sizes.iter().cycle().take(200).enumerate() {
        let data: Vec<u8> = (0..n).map(|i| (i + round) as u8).collect();
        expected.extend_from_slice(&data);
        s.write_all(&chunk(&data)).await.unwrap();
        if round == 100 {
            // A reader joining mid-segment, wherever the tail buffer happens to be.
            let r = get(&url).await;
            assert_eq!(r.status(), 200);
            mid = Some(tokio::spawn(r.bytes()));
        }
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(bounded("publish", read_head(&mut s)).await.status, 200);
    let r = bounded("early", early).await.unwrap();
    assert_eq!(
        &bounded("early body", r.bytes()).await.unwrap()[..],
        &expected[..]
    );
    let mid = bounded("mid", mid.expect("mid reader"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&mid[..], &expected[..]);
    let late = get(&url).await.bytes().await.unwrap();
    assert_eq!(&late[..], &expected[..]);
    let info = h.server().channel_info("mix").unwrap();
    assert_eq!(info.segments[0].bytes, expected.len() as u64);
}

// ---- go-livepeer 2026 wire (docs/trickle.md) ------------------------------------------------

#[tokio::test]
async fn next_endpoint_is_plain_text_and_read_only() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("ro", "video/MP2T").unwrap();
    let url = h.url("ro");
    for _ in 0..3 {
        let r = get(&format!("{url}/next")).await;
        assert_eq!(r.status(), 200);
        let ct = hdr(&r, "content-type").unwrap_or_default();
        assert!(ct.starts_with("text/plain"), "{ct}");
        assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("0"));
        assert_eq!(hdr(&r, "lp-trickle-seq"), None);
        assert_eq!(r.text().await.unwrap(), "0");
    }
    // Asking created no segment and moved nothing.
    let info = h.server().channel_info("ro").unwrap();
    assert_eq!(info.next_write, 0);
    assert!(info.segments.is_empty(), "{:?}", info.segments);
    // A GET of /next on a channel whose segments are being written follows nextWrite as soon
    // as a first byte arrives (not when the segment ends).
    let mut s = raw(h.local_addr(), &chunked_post("/ro/0", "")).await;
    s.write_all(&chunk(b"first")).await.unwrap();
    wait_until("nextWrite 1", || {
        h.server().channel_info("ro").unwrap().next_write == 1
    })
    .await;
    let r = get(&format!("{url}/next")).await;
    assert_eq!(r.text().await.unwrap(), "1");
    s.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(bounded("POST 0", read_head(&mut s)).await.status, 200);
    // Unknown channel: 404; a deleted channel: 404 too.
    assert_eq!(get(&h.url("nope/next")).await.status(), 404);
    assert!(h.server().close_channel("ro"));
    assert_eq!(get(&format!("{url}/next")).await.status(), 404);
}

#[tokio::test]
async fn post_answers_carry_the_seq_written() {
    let h = start_dev().await;
    let url = h.url("sq");
    // Explicit seqs are echoed; -1 reports the seq it resolved to.
    for (path, want) in [("0", "0"), ("1", "1"), ("-1", "2"), ("-1", "3")] {
        let r = post(&format!("{url}/{path}"), b"data").await;
        assert_eq!(r.status(), 200, "POST {path}");
        assert_eq!(
            hdr(&r, "lp-trickle-seq").as_deref(),
            Some(want),
            "POST {path}"
        );
        assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    }
    // An empty body under -1 still consumes (and reports) a seq.
    let r = post(&format!("{url}/-1"), b"").await;
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("4"));
    assert_eq!(hdr(&r, "connection").as_deref(), Some("close"));
    assert_eq!(get(&format!("{url}/next")).await.text().await.unwrap(), "5");
    // Error answers carry no seq.
    let r = post(&format!("{url}/-3"), b"x").await;
    assert_eq!(r.status(), 400);
    assert_eq!(hdr(&r, "lp-trickle-seq"), None);
}

#[tokio::test]
async fn reset_on_minus_one_closes_older_segments_and_spares_preconnects() {
    let h = start_dev().await;
    h.server().create_channel("rs1", "video/MP2T").unwrap();
    let url = h.url("rs1");
    // Seq 0 was written, seq 1 is stuck half-way (its publisher died) with a reader on it.
    assert_eq!(post(&format!("{url}/0"), b"zero").await.status(), 200);
    let mut dead = raw(h.local_addr(), &chunked_post("/rs1/1", "")).await;
    dead.write_all(&chunk(b"half")).await.unwrap();
    wait_until("nextWrite 2", || {
        h.server().channel_info("rs1").unwrap().next_write == 2
    })
    .await;
    let stuck = get(&format!("{url}/1")).await;
    assert_eq!(stuck.status(), 200);
    let stuck = tokio::spawn(stuck.bytes());
    // A preconnect ahead of the restart point (seq 3), with a subscriber waiting on it.
    let mut ahead = raw(h.local_addr(), &chunked_post("/rs1/3", "")).await;
    let ahead_reader = spawn_get(format!("{url}/3"));
    wait_attached(h.server(), "rs1", 3, 1, 1).await;

    // The restarted publisher posts -1 (= nextWrite 2) with Lp-Trickle-Reset.
    let r = http()
        .post(format!("{url}/-1"))
        .header("Lp-Trickle-Reset", "1")
        .body("two")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("2"));
    // The stuck reader is released with what it had; seq 3 is untouched and still waiting.
    let body = bounded("released reader", stuck).await.unwrap().unwrap();
    assert_eq!(&body[..], b"half");
    let info = h.server().channel_info("rs1").unwrap();
    let seg = |n: i64| info.segments.iter().find(|s| s.seq == n).cloned();
    assert!(seg(0).unwrap().closed && seg(1).unwrap().closed);
    let s3 = seg(3).expect("seq 3 kept");
    assert!(!s3.closed && s3.writers == 1 && s3.readers == 1, "{s3:?}");
    // The preconnect of seq 3 then delivers normally.
    ahead.write_all(&chunk(b"three")).await.unwrap();
    ahead.write_all(b"0\r\n\r\n").await.unwrap();
    let head = bounded("POST 3", read_head(&mut ahead)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-seq"), Some("3"));
    let r = bounded("reader of 3", ahead_reader).await.unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], b"three");
    drop(dead);
}

#[tokio::test]
async fn reset_releases_an_older_preconnect_as_an_empty_segment() {
    let h = start_dev().await;
    h.server().create_channel("rs2", "video/MP2T").unwrap();
    // A preconnected POST for seq 0 that never sends a byte, and a subscriber waiting on it.
    let mut old = raw(h.local_addr(), &chunked_post("/rs2/0", "")).await;
    let waiting = spawn_get(h.url("rs2/0"));
    wait_attached(h.server(), "rs2", 0, 1, 1).await;
    // A reset POST at seq 1 closes seq 0: its POST is answered as an empty write.
    let r = http()
        .post(h.url("rs2/1"))
        .header("Lp-Trickle-Reset", "yes")
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("1"));
    let head = bounded("released preconnect", read_head(&mut old)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-seq"), Some("0"));
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(head.header("lp-trickle-closed"), None);
    // Its subscriber gets an empty 200 and can move on.
    let r = bounded("released GET", waiting).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(
        &get(&h.url("rs2/1")).await.bytes().await.unwrap()[..],
        b"one"
    );
    // The late release of seq 0 did not pull the write head back behind seq 1.
    assert_eq!(h.server().channel_info("rs2").unwrap().next_write, 2);
}

#[tokio::test]
async fn preconnect_released_by_a_ring_overwrite_does_not_rewind_next_write() {
    let h = start_dev().await;
    h.server().create_channel("ov", "video/MP2T").unwrap();
    // A preconnect for seq 0 that never sends a byte...
    let mut idle = raw(h.local_addr(), &chunked_post("/ov/0", "")).await;
    wait_attached(h.server(), "ov", 0, 0, 1).await;
    // ...while the publisher goes on to seq 5, which takes over slot 0.
    for i in 1..=5 {
        assert_eq!(post(&h.url(&format!("ov/{i}")), b"x").await.status(), 200);
    }
    let head = bounded("released preconnect", read_head(&mut idle)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("lp-trickle-seq"), Some("0"));
    assert_eq!(h.server().channel_info("ov").unwrap().next_write, 6);
    assert_eq!(get(&h.url("ov/next")).await.text().await.unwrap(), "6");
}

#[tokio::test]
async fn empty_write_releases_waiting_subscriber_and_the_next_seq_waits() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("ew", "video/MP2T").unwrap();
    let url = h.url("ew");
    // A subscriber is waiting on seq 0 of a fresh channel.
    let waiting = spawn_get(format!("{url}/0"));
    wait_attached(h.server(), "ew", 0, 1, 0).await;
    // The publisher sends an empty body for seq 0.
    let r = post(&format!("{url}/0"), b"").await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    // The subscriber gets an empty segment, told that the next write is seq 1.
    let r = bounded("released GET", waiting).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "lp-trickle-seq").as_deref(), Some("0"));
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("1"));
    assert_eq!(hdr(&r, "lp-trickle-closed"), None);
    assert!(r.bytes().await.unwrap().is_empty());
    // Its next request, seq 1, is the write head: it waits (no 470) and gets the data.
    let next = spawn_get(format!("{url}/1"));
    wait_attached(h.server(), "ew", 1, 1, 0).await;
    assert_eq!(post(&format!("{url}/1"), b"one").await.status(), 200);
    let r = bounded("GET 1", next).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], b"one");
    // Two empty writes in a row each consume a seq; seq 4 is then the write head.
    post(&format!("{url}/2"), b"").await;
    post(&format!("{url}/3"), b"").await;
    assert_eq!(get(&format!("{url}/next")).await.text().await.unwrap(), "4");
    let r = get(&format!("{url}/6")).await;
    assert_eq!(r.status(), 470);
    assert_eq!(hdr(&r, "lp-trickle-latest").as_deref(), Some("4"));
}

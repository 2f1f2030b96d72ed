// SPDX-License-Identifier: MPL-2.0
//! Trickle client tests (`docs/trickle.md`, publisher rules P1-P10, subscriber rules S1-S10): the
//! Publisher and Subscriber against a real server on 127.0.0.1:0, or against a raw TCP fake where
//! exact server behaviour is needed.

mod protocol_common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use gsttrickle::protocol::client::{
    ClientError, MAX_UNTOUCHED_RETRIES, Publisher, PublisherConfig, SegmentOutcome,
    SubscribedSegment, Subscriber, SubscriberConfig,
};
use gsttrickle::protocol::server::ServerConfig;
use protocol_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

fn sub_config(start_seq: i64) -> SubscriberConfig {
    SubscriberConfig {
        start_seq,
        retry_pause: Duration::from_millis(20),
        ..SubscriberConfig::default()
    }
}

fn pub_config() -> PublisherConfig {
    PublisherConfig {
        retry_pause: Duration::from_millis(50),
        ..PublisherConfig::default()
    }
}

async fn next(sub: &mut Subscriber) -> SubscribedSegment {
    bounded("next segment", sub.next_segment())
        .await
        .expect("next_segment")
        .expect("a segment, not EOS")
}

async fn body(seg: SubscribedSegment) -> Vec<u8> {
    bounded("segment body", seg.read_all(1 << 20))
        .await
        .expect("read_all")
        .to_vec()
}

#[tokio::test]
async fn publish_and_subscribe_stream_live_in_order() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("live", "video/MP2T").unwrap();
    let url = h.url("live");
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut sub = Subscriber::new(&url, sub_config(0)).unwrap();
    assert_eq!(sub.position(), 0);

    let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
    assert_eq!(w.seq(), 0);
    w.write(Bytes::from_static(b"first ")).await.unwrap();
    // The subscriber gets the first chunk before the publisher has finished the segment.
    let mut seg = next(&mut sub).await;
    assert_eq!(seg.seq(), 0);
    assert!(!seg.discont());
    assert_eq!(seg.content_type(), Some("video/MP2T"));
    let first = bounded("first chunk", seg.chunk()).await.unwrap().unwrap();
    assert_eq!(&first[..], b"first ");
    assert_eq!(sub.position(), 1);
    w.write(Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(
        bounded("finish", w.finish()).await.unwrap(),
        SegmentOutcome::Done
    );
    let mut rest = Vec::new();
    while let Some(c) = bounded("chunk", seg.chunk()).await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"second");

    for i in 1..4u8 {
        let msg = Bytes::from(vec![i; 10]);
        assert_eq!(
            bounded("send", publisher.send_message(msg.clone()))
                .await
                .unwrap(),
            SegmentOutcome::Done
        );
        let seg = next(&mut sub).await;
        assert_eq!(seg.seq(), i as i64);
        assert_eq!(body(seg).await, msg.to_vec());
    }
    assert_eq!(publisher.next_seq(), 4);
    bounded("close", publisher.close()).await.unwrap();
    // The close (empty segment, then DELETE) ends the subscriber: with EOS if its preconnect was
    // waiting when the DELETE came, with 404 if it asked after (`docs/trickle.md`, "Close, idle
    // sweep, changefeed").
    let end = bounded("EOS", sub.next_segment()).await;
    assert!(
        matches!(end, Ok(None) | Err(ClientError::NotFound { .. })),
        "{end:?}"
    );
}

#[tokio::test]
async fn subscriber_resyncs_on_470_and_marks_discont() {
    let h = start_dev().await;
    for i in 0..7 {
        post(&h.url(&format!("rs/{i}")), b"old").await;
    }
    let mut sub = Subscriber::new(&h.url("rs"), sub_config(0)).unwrap();
    let reader = tokio::spawn(async move {
        let seg = next(&mut sub).await;
        (seg.seq(), seg.discont(), body(seg).await)
    });
    // Publish seq 7 once the subscriber (told Latest = 7 by the 470) waits on it.
    wait_attached(h.server(), "rs", 7, 1, 0).await;
    assert_eq!(post(&h.url("rs/7"), b"new").await.status(), 200);
    let (seq, discont, data) = bounded("resynced segment", reader).await.unwrap();
    assert_eq!(seq, 7);
    assert!(discont, "a 470 resync must be flagged");
    assert_eq!(data, b"new");
}

#[tokio::test]
async fn subscriber_skips_empty_segment_with_discont() {
    let h = start_dev().await;
    post(&h.url("sk/0"), b"a").await;
    post(&h.url("sk/1"), b"").await;
    post(&h.url("sk/2"), b"c").await;
    let mut sub = Subscriber::new(&h.url("sk"), sub_config(0)).unwrap();
    let s0 = next(&mut sub).await;
    assert_eq!((s0.seq(), s0.discont()), (0, false));
    assert_eq!(body(s0).await, b"a");
    let s2 = next(&mut sub).await;
    assert_eq!((s2.seq(), s2.discont()), (2, true));
    assert_eq!(s2.latest(), Some(3));
    assert_eq!(body(s2).await, b"c");
    let s3 = tokio::spawn(async move { next(&mut sub).await.seq() });
    wait_attached(h.server(), "sk", 3, 1, 0).await;
    post(&h.url("sk/3"), b"d").await;
    assert_eq!(bounded("seq 3", s3).await.unwrap(), 3);
}

#[tokio::test]
async fn subscriber_current_and_next_start_positions() {
    let h = start_dev().await;
    post(&h.url("pos/0"), b"zero").await;
    post(&h.url("pos/1"), b"one").await;
    let mut current = Subscriber::new(&h.url("pos"), sub_config(-2)).unwrap();
    assert_eq!(current.position(), -2);
    let seg = next(&mut current).await;
    assert_eq!(seg.seq(), 1);
    assert_eq!(current.position(), 2);
    assert_eq!(body(seg).await, b"one");
    let mut nxt = Subscriber::new(&h.url("pos"), sub_config(-1)).unwrap();
    let waiting = tokio::spawn(async move { body(next(&mut nxt).await).await });
    wait_attached(h.server(), "pos", 2, 2, 0).await;
    post(&h.url("pos/2"), b"two").await;
    assert_eq!(bounded("next", waiting).await.unwrap(), b"two");
}

#[tokio::test]
async fn subscriber_eos_on_channel_close() {
    let h = start_dev().await;
    h.server().create_channel("eos", "video/MP2T").unwrap();
    let mut sub = Subscriber::new(&h.url("eos"), sub_config(-1)).unwrap();
    let t = tokio::spawn(async move {
        let first = sub.next_segment().await.map(|s| s.is_none());
        let again = sub.next_segment().await.map(|s| s.is_none());
        (first, again)
    });
    wait_attached(h.server(), "eos", 0, 1, 0).await;
    assert!(h.server().close_channel("eos"));
    let (first, again) = bounded("EOS", t).await.unwrap();
    assert!(first.unwrap(), "Lp-Trickle-Closed must end the stream");
    assert!(again.unwrap(), "EOS is final");
}

#[tokio::test]
async fn subscriber_404_is_fatal() {
    let h = start_dev().await;
    let mut sub = Subscriber::new(&h.url("ghost"), sub_config(-2)).unwrap();
    match bounded("404", sub.next_segment()).await {
        Err(ClientError::NotFound { url }) => assert_eq!(url, h.url("ghost")),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn subscriber_retries_exhausted_against_closed_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/nobody");
    let mut sub = Subscriber::new(
        &url,
        SubscriberConfig {
            max_retries: 3,
            ..sub_config(0)
        },
    )
    .unwrap();
    let err = bounded("retries", sub.next_segment()).await.unwrap_err();
    match &err {
        ClientError::RetriesExhausted {
            url: u, attempts, ..
        } => {
            assert_eq!(u, &format!("{url}/0"));
            assert_eq!(*attempts, 3);
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn subscriber_refreshes_a_silent_preconnect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/quiet", listener.local_addr().unwrap());
    let mut sub = Subscriber::new(
        &url,
        SubscriberConfig {
            preconnect_refresh: Duration::from_millis(100),
            ..sub_config(5)
        },
    )
    .unwrap();
    let fake = tokio::spawn(async move {
        // First GET: never answered.
        let (mut c1, _) = listener.accept().await.unwrap();
        let h1 = String::from_utf8(read_until(&mut c1, Vec::new(), b"\r\n\r\n").await).unwrap();
        // The refresh: the same GET on a new connection; answer it.
        let (mut c2, _) = listener.accept().await.unwrap();
        let h2 = String::from_utf8(read_until(&mut c2, Vec::new(), b"\r\n\r\n").await).unwrap();
        c2.write_all(
            b"HTTP/1.1 200 OK\r\nLp-Trickle-Seq: 5\r\nContent-Length: 4\r\nConnection: close\r\n\r\ndata",
        )
        .await
        .unwrap();
        // Keep the connections until the client is done reading.
        let _ = read_to_close(&mut c2, Vec::new()).await;
        drop(c1);
        (h1, h2)
    });
    let seg = next(&mut sub).await;
    assert_eq!(seg.seq(), 5);
    assert_eq!(body(seg).await, b"data");
    drop(sub);
    let (h1, h2) = bounded("fake", fake).await.unwrap();
    assert!(h1.starts_with("GET /quiet/5 HTTP/1.1"), "{h1}");
    assert!(h2.starts_with("GET /quiet/5 HTTP/1.1"), "{h2}");
}

#[tokio::test]
async fn read_all_limit() {
    let h = start_dev().await;
    post(&h.url("big/0"), b"0123456789").await;
    let mut sub = Subscriber::new(&h.url("big"), sub_config(0)).unwrap();
    let seg = next(&mut sub).await;
    match seg.read_all(5).await {
        Err(ClientError::TooLarge { limit: 5, url }) => assert_eq!(url, h.url("big/0")),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_urls_are_refused_without_io() {
    for bad in [
        "",
        "nonsense",
        "ftp://host/ch",
        "http:///ch",
        "http://host",
        "http://host/",
        "http://host/ch?x=1",
    ] {
        assert!(
            matches!(
                Subscriber::new(bad, SubscriberConfig::default()),
                Err(ClientError::InvalidUrl { .. })
            ),
            "subscriber accepted {bad:?}"
        );
        assert!(
            matches!(
                Publisher::new(bad, PublisherConfig::default()),
                Err(ClientError::InvalidUrl { .. })
            ),
            "publisher accepted {bad:?}"
        );
    }
    assert!(
        Subscriber::new(
            "https://host:8935/ai/trickle/abc/",
            SubscriberConfig::default()
        )
        .is_ok()
    );
}

#[tokio::test]
async fn publisher_preconnects_seq_zero_with_headers_before_data() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/pc", listener.local_addr().unwrap());
    let publisher = Publisher::new(&url, pub_config()).unwrap();
    // No begin_segment, no data: the request head still arrives.
    let (mut c, _) = bounded("preconnect", listener.accept()).await.unwrap();
    let head = bounded("head", read_until(&mut c, Vec::new(), b"\r\n\r\n")).await;
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("post /pc/0 http/1.1"), "{head}");
    assert!(head.contains("content-type: video/mp2t"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("expect:"), "{head}");
    assert!(!head.contains("lp-trickle-reset"), "{head}");
    drop(publisher);
}

const OK_CLOSE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const BUSY: &str =
    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy";

#[tokio::test]
async fn publisher_retries_an_untouched_segment_after_the_pause() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/p5", listener.local_addr().unwrap());
    // A fake server: POSTs to seq 0 get 503 the first time and 200 the second time, once their
    // (chunked) body has ended; other requests are held open. Reports the seq 0 request lines.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let fake = tokio::spawn(async move {
        let mut seq0 = 0;
        let mut held = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let got = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
            let head = String::from_utf8_lossy(&got).to_string();
            if !head.starts_with("POST /p5/0 ") {
                held.push(c);
                continue;
            }
            let _ = read_until(&mut c, got, b"0\r\n\r\n").await;
            seq0 += 1;
            let answer = if seq0 == 1 { BUSY } else { OK_CLOSE };
            c.write_all(answer.as_bytes()).await.unwrap();
            let _ = seen_tx.send(head.lines().next().unwrap_or("").to_owned());
        }
    });
    let config = pub_config();
    let pause = config.retry_pause;
    let mut publisher = Publisher::new(&url, config).unwrap();
    let w = bounded("begin", publisher.begin_segment()).await.unwrap();
    assert_eq!(w.seq(), 0);
    let started = Instant::now();
    // An empty segment: no byte is ever sent, so the 503 is retried on the same seq.
    assert_eq!(
        bounded("finish", w.finish()).await.unwrap(),
        SegmentOutcome::Done
    );
    assert!(started.elapsed() >= pause, "retried before the pause");
    for _ in 0..2 {
        let line = bounded("fake", seen_rx.recv()).await.unwrap();
        assert!(line.starts_with("POST /p5/0 HTTP/1.1"), "{line}");
    }
    drop(publisher);
    fake.abort();
}

#[tokio::test]
async fn publisher_deletes_a_failed_segment_that_had_bytes() {
    let h = start_dev().await;
    h.server().create_channel("fail", "video/MP2T").unwrap();
    let url = h.url("fail");
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    let mut sub = Subscriber::new(&url, sub_config(0)).unwrap();
    let mut seg = next(&mut sub).await;
    assert_eq!(
        &bounded("chunk", seg.chunk()).await.unwrap().unwrap()[..],
        b"partial"
    );
    // Abandon the segment: the subscriber sees it end, the publisher continues with seq 1.
    bounded("abort", w.abort()).await;
    assert!(bounded("end", seg.chunk()).await.unwrap().is_none());
    assert_eq!(
        bounded("next", publisher.send_message(Bytes::from_static(b"ok")))
            .await
            .unwrap(),
        SegmentOutcome::Done
    );
    let seg = next(&mut sub).await;
    assert_eq!(seg.seq(), 1);
    assert_eq!(body(seg).await, b"ok");
}

#[tokio::test]
async fn publisher_close_sends_empty_segment_then_delete() {
    let h = start_dev().await;
    h.server().create_channel("cl", "video/MP2T").unwrap();
    let mut publisher = Publisher::new(
        &h.url("cl"),
        PublisherConfig {
            delete_on_close: false,
            ..pub_config()
        },
    )
    .unwrap();
    publisher
        .send_message(Bytes::from_static(b"m"))
        .await
        .unwrap();
    bounded("close", publisher.close()).await.unwrap();
    let info = h.server().channel_info("cl").expect("channel kept");
    // The empty segment 1 advanced nextWrite.
    assert_eq!(info.next_write, 2);
    let s1 = info
        .segments
        .iter()
        .find(|s| s.seq == 1)
        .expect("segment 1");
    assert!(s1.closed && s1.bytes == 0, "{s1:?}");

    // With delete_on_close (the default) the channel is removed; a second close of an
    // already deleted channel (400 Invalid stream) is not an error.
    let p = Publisher::new(&h.url("cl"), pub_config()).unwrap();
    bounded("close+delete", p.close()).await.unwrap();
    assert!(h.server().channel_info("cl").is_none());
    let orch = start(ServerConfig::default()).await;
    let p = Publisher::new(&orch.url("cl"), pub_config()).unwrap();
    bounded("close of a missing channel", p.close())
        .await
        .unwrap();
}

#[tokio::test]
async fn publisher_stops_when_the_channel_closes() {
    let h = start_dev().await;
    h.server()
        .create_channel("stop", "application/json")
        .unwrap();
    let mut publisher = Publisher::new(&h.url("stop"), pub_config()).unwrap();
    publisher
        .send_message(Bytes::from_static(b"{}"))
        .await
        .unwrap();
    // The preconnect for seq 1 is waiting on the server; close the channel under it.
    wait_attached(h.server(), "stop", 1, 0, 1).await;
    assert!(h.server().close_channel("stop"));
    let r = bounded("send", publisher.send_message(Bytes::from_static(b"{}"))).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Closed) | Ok(SegmentOutcome::ChannelClosed)
        ),
        "{r:?}"
    );
    assert!(matches!(
        publisher.begin_segment().await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn publisher_404_is_fatal() {
    let h = start(ServerConfig::default()).await;
    let mut publisher = Publisher::new(&h.url("none"), pub_config()).unwrap();
    let r = bounded("send", publisher.send_message(Bytes::from_static(b"x"))).await;
    assert!(matches!(r, Err(ClientError::NotFound { .. })), "{r:?}");
}

#[tokio::test]
async fn reattach_continues_after_next_with_reset() {
    let h = start_dev().await;
    let url = h.url("re");
    post(&h.url("re/0"), b"a").await;
    post(&h.url("re/1"), b"b").await;
    // A crashed publisher left seq 2 open; a subscriber is stuck on it.
    let mut dead = raw(h.local_addr(), &chunked_post("/re/2", "")).await;
    dead.write_all(&chunk(b"half")).await.unwrap();
    let mut sub = Subscriber::new(&url, sub_config(2)).unwrap();
    let mut stuck = next(&mut sub).await;
    assert_eq!(
        &bounded("chunk", stuck.chunk()).await.unwrap().unwrap()[..],
        b"half"
    );

    let mut p = bounded("reattach", Publisher::reattach(&url, pub_config()))
        .await
        .unwrap();
    assert_eq!(p.next_seq(), 3);
    // Lp-Trickle-Reset on the first POST (seq 3) closes the stuck seq 2.
    assert!(bounded("released", stuck.chunk()).await.unwrap().is_none());
    assert_eq!(
        p.send_message(Bytes::from_static(b"c")).await.unwrap(),
        SegmentOutcome::Done
    );
    let seg = next(&mut sub).await;
    assert_eq!(seg.seq(), 3);
    assert_eq!(body(seg).await, b"c");
    drop(dead);
}

#[tokio::test]
async fn reattach_without_next_endpoint_starts_at_zero() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/old", listener.local_addr().unwrap());
    let fake = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let head = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
        c.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\nInvalid idx",
        )
        .await
        .unwrap();
        // The preconnect of seq 0 follows, with the reset header.
        let (mut c2, _) = listener.accept().await.unwrap();
        let head2 = read_until(&mut c2, Vec::new(), b"\r\n\r\n").await;
        (
            String::from_utf8(head).unwrap(),
            String::from_utf8(head2).unwrap(),
        )
    });
    let p = bounded("reattach", Publisher::reattach(&url, pub_config()))
        .await
        .unwrap();
    assert_eq!(p.next_seq(), 0);
    let (h1, h2) = bounded("fake", fake).await.unwrap();
    assert!(h1.starts_with("GET /old/next HTTP/1.1"), "{h1}");
    assert!(h2.starts_with("POST /old/0 HTTP/1.1"), "{h2}");
    assert!(
        h2.to_ascii_lowercase().contains("lp-trickle-reset: 1"),
        "{h2}"
    );
    drop(p);
}

#[tokio::test]
async fn publisher_write_applies_back_pressure() {
    // A server that accepts the POST but never reads its body: write() must eventually wait
    // instead of buffering without limit.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        // Hold every connection open, reading nothing.
        let mut held = Vec::new();
        loop {
            let (c, _) = listener.accept().await.unwrap();
            held.push(c);
        }
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
    let chunk = Bytes::from(vec![0u8; 256 * 1024]);
    let mut accepted = 0usize;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(300), w.write(chunk.clone())).await {
            Ok(Ok(())) => accepted += chunk.len(),
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break true,
        }
        assert!(
            accepted < 512 * 1024 * 1024,
            "no back-pressure after {accepted} bytes"
        );
    };
    assert!(blocked);
    hold.abort();
}

#[tokio::test]
async fn publisher_tolerates_interim_1xx_responses() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ka", listener.local_addr().unwrap());
    let fake = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let got = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
            if !String::from_utf8_lossy(&got).starts_with("POST /ka/0 ") {
                held.push(c);
                continue;
            }
            // Two unsolicited keepalives while the body has not started, as the reference
            // server sends every 10 s.
            c.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
                .await
                .unwrap();
            let got = read_until(&mut c, got, b"0\r\n\r\n").await;
            c.write_all(OK_CLOSE.as_bytes()).await.unwrap();
            return (got, held);
        }
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
    w.write(Bytes::from_static(b"payload")).await.unwrap();
    assert_eq!(
        bounded("finish", w.finish()).await.unwrap(),
        SegmentOutcome::Done
    );
    let (got, _held) = bounded("fake", fake).await.unwrap();
    assert!(got.windows(7).any(|w| w == b"payload"));
}

#[tokio::test]
async fn many_segments_stream_in_order_without_loss() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("many", "video/MP2T").unwrap();
    let url = h.url("many");
    let segments = 60u8;
    let mut sub = Subscriber::new(&url, sub_config(0)).unwrap();
    // The reader reports each segment it has read, so the publisher never runs more than a
    // ring's worth ahead (which would legitimately make the reader resync).
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < segments as usize {
            let seg = next(&mut sub).await;
            assert!(!seg.discont(), "segment {} flagged discont", seg.seq());
            got.push((seg.seq(), body(seg).await));
            let _ = ack_tx.send(got.len());
        }
        got
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut read = 0usize;
    for i in 0..segments {
        while read + 3 < i as usize {
            read = bounded("reader progress", ack_rx.recv()).await.unwrap();
        }
        let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
        for part in 0..3u8 {
            w.write(Bytes::from(vec![i, part, 0xAA, 0x55]))
                .await
                .unwrap();
        }
        assert_eq!(
            bounded("finish", w.finish()).await.unwrap(),
            SegmentOutcome::Done
        );
    }
    let got = bounded("reader", reader).await.unwrap();
    for (i, (seq, data)) in got.into_iter().enumerate() {
        assert_eq!(seq, i as i64);
        let want: Vec<u8> = (0..3u8).flat_map(|p| [i as u8, p, 0xAA, 0x55]).collect();
        assert_eq!(data, want, "segment {i}");
    }
    bounded("close", publisher.close()).await.unwrap();
}

#[tokio::test]
async fn next_segment_is_cancel_safe() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("cancel", "video/MP2T").unwrap();
    let url = h.url("cancel");
    let mut sub = Subscriber::new(&url, sub_config(0)).unwrap();
    // The reader keeps abandoning next_segment() after 1 ms (as an element polling for a
    // flush would); no segment may be lost or reordered. (5 segments: the ring keeps them
    // all, so a slow reader can never be resynced past one.)
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 5 {
            match tokio::time::timeout(Duration::from_millis(1), sub.next_segment()).await {
                Err(_) => continue,
                Ok(r) => {
                    let seg = r.unwrap().unwrap();
                    got.push((seg.seq(), body(seg).await));
                }
            }
        }
        got
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    for i in 0..5u8 {
        let mut w = publisher.begin_segment().await.unwrap();
        w.write(Bytes::from(vec![i; 3])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        w.write(Bytes::from(vec![i; 3])).await.unwrap();
        w.finish().await.unwrap();
    }
    let got = bounded("reader", reader).await.unwrap();
    let want: Vec<(i64, Vec<u8>)> = (0..5u8).map(|i| (i as i64, vec![i; 6])).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn publisher_failure_after_bytes_deletes_the_seq_and_never_re_posts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/half", listener.local_addr().unwrap());
    // seq 0: read until the data arrives, then fail with 500. Report every request line.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let fake = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let got = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
            let line = String::from_utf8_lossy(&got)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let _ = seen_tx.send(line.clone());
            if line.starts_with("POST /half/0 ") {
                let _ = read_until(&mut c, got, b"some-bytes").await;
                c.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 12\r\nConnection: close\r\n\r\nServer error",
                )
                .await
                .unwrap();
            } else if line.starts_with("DELETE ") {
                c.write_all(OK_CLOSE.as_bytes()).await.unwrap();
            } else {
                held.push(c);
            }
        }
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    let mut w = bounded("begin", publisher.begin_segment()).await.unwrap();
    w.write(Bytes::from_static(b"some-bytes")).await.unwrap();
    match bounded("finish", w.finish()).await {
        Err(ClientError::Http {
            status: 500,
            url: u,
            body,
        }) => {
            assert_eq!(u, format!("{url}/0"));
            assert_eq!(body, "Server error");
        }
        other => panic!("expected HTTP 500, got {other:?}"),
    }
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("DELETE /half/0 "))
    {
        lines.push(bounded("requests", seen_rx.recv()).await.unwrap());
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("POST /half/0 "))
            .count(),
        1,
        "seq 0 was POSTed again after bytes were sent: {lines:?}"
    );
    drop(publisher);
    fake.abort();
}

#[test]
fn publisher_created_outside_a_runtime_connects_lazily() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(start_dev());
    // Outside the runtime new() cannot spawn the preconnect...
    let mut publisher = Publisher::new(&h.url("lazy"), pub_config()).unwrap();
    assert_eq!(publisher.next_seq(), 0);
    rt.block_on(async {
        assert!(
            h.server().channel_info("lazy").is_none(),
            "nothing may be sent yet"
        );
        // ...so the first begin_segment opens it.
        assert_eq!(
            bounded("send", publisher.send_message(Bytes::from_static(b"late")))
                .await
                .unwrap(),
            SegmentOutcome::Done
        );
        assert_eq!(
            &get(&h.url("lazy/0")).await.bytes().await.unwrap()[..],
            b"late"
        );
        drop(publisher);
        h.shutdown().await;
    });
}

#[tokio::test]
async fn next_segment_takes_over_a_seq_that_never_got_a_byte() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/reuse", listener.local_addr().unwrap());
    // Every POST to seq 0 is refused before its body (503); others are held open.
    let fake = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let got = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
            if String::from_utf8_lossy(&got).starts_with("POST /reuse/0 ") {
                let _ = read_until(&mut c, got, b"0\r\n\r\n").await;
                c.write_all(BUSY.as_bytes()).await.unwrap();
            } else {
                held.push(c);
            }
        }
    });
    let mut publisher = Publisher::new(
        &url,
        PublisherConfig {
            retry_pause: Duration::from_millis(5),
            ..PublisherConfig::default()
        },
    )
    .unwrap();
    let w = bounded("begin", publisher.begin_segment()).await.unwrap();
    assert_eq!(w.seq(), 0);
    match bounded("finish", w.finish()).await {
        Err(ClientError::RetriesExhausted {
            url: u,
            attempts,
            last,
        }) => {
            assert_eq!(u, format!("{url}/0"));
            assert_eq!(attempts, MAX_UNTOUCHED_RETRIES + 1);
            assert!(last.contains("503"), "{last}");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    // Seq 0 never received a byte: the next segment is sent under it (`docs/trickle.md`, P5).
    let w = bounded("begin again", publisher.begin_segment())
        .await
        .unwrap();
    assert_eq!(w.seq(), 0);
    assert_eq!(publisher.next_seq(), 1);
    drop(w);
    drop(publisher);
    fake.abort();
}

// ---- go-livepeer 2026 wire (docs/trickle.md) ------------------------------------------------

#[tokio::test]
async fn publisher_records_the_seq_the_server_wrote() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("ws", "application/json").unwrap();
    let mut publisher = Publisher::new(
        &h.url("ws"),
        PublisherConfig {
            delete_on_close: false,
            ..pub_config()
        },
    )
    .unwrap();
    assert_eq!(publisher.last_written_seq(), None);
    for i in 0..3 {
        let outcome = bounded("send", publisher.send_message(Bytes::from_static(b"{}")))
            .await
            .unwrap();
        assert_eq!(outcome, SegmentOutcome::Done);
        assert_eq!(publisher.last_written_seq(), Some(i));
    }
    // An empty segment (a finish without data) is a write too: it consumes seq 3.
    let w = bounded("begin", publisher.begin_segment()).await.unwrap();
    assert_eq!(w.seq(), 3);
    assert_eq!(
        bounded("finish", w.finish()).await.unwrap(),
        SegmentOutcome::Done
    );
    assert_eq!(publisher.last_written_seq(), Some(3));
    assert_eq!(h.server().channel_info("ws").unwrap().next_write, 4);
    assert_eq!(publisher.next_seq(), 4);
    bounded("close", publisher.close()).await.unwrap();
    // close() ended the preconnect of seq 4 as the final empty segment.
    assert_eq!(h.server().channel_info("ws").unwrap().next_write, 5);
}

#[tokio::test]
async fn publisher_keeps_its_numbering_whatever_seq_the_server_reports() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/odd", listener.local_addr().unwrap());
    // A fake server: seq 0 answered like an older server (no Lp-Trickle-Seq), seq 1 with a
    // seq other than the one posted; later preconnects are held open. One task per
    // connection, since preconnects arrive before the segment before them is done.
    let fake = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            conns.push(tokio::spawn(async move {
                let got = read_until(&mut c, Vec::new(), b"\r\n\r\n").await;
                let head = String::from_utf8_lossy(&got).to_string();
                let extra = if head.starts_with("POST /odd/0 ") {
                    ""
                } else if head.starts_with("POST /odd/1 ") {
                    "Lp-Trickle-Seq: 7\r\n"
                } else {
                    return c; // held open
                };
                read_until(&mut c, got, b"\r\n0\r\n\r\n").await;
                c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
                c
            }));
        }
    });
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    assert_eq!(
        bounded("seq 0", publisher.send_message(Bytes::from_static(b"a")))
            .await
            .unwrap(),
        SegmentOutcome::Done
    );
    assert_eq!(
        publisher.last_written_seq(),
        None,
        "no header: nothing known"
    );
    assert_eq!(
        bounded("seq 1", publisher.send_message(Bytes::from_static(b"b")))
            .await
            .unwrap(),
        SegmentOutcome::Done
    );
    // The server's word is recorded (and logged), but the publisher's own numbering goes on.
    assert_eq!(publisher.last_written_seq(), Some(7));
    assert_eq!(publisher.next_seq(), 2);
    drop(publisher);
    fake.abort();
}

#[tokio::test]
async fn subscriber_moves_on_past_a_live_empty_write() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("le", "video/MP2T").unwrap();
    let url = h.url("le");
    let mut publisher = Publisher::new(&url, pub_config()).unwrap();
    assert_eq!(
        publisher
            .send_message(Bytes::from_static(b"zero"))
            .await
            .unwrap(),
        SegmentOutcome::Done
    );
    let mut sub = Subscriber::new(&url, sub_config(0)).unwrap();
    let s0 = next(&mut sub).await;
    assert_eq!(body(s0).await, b"zero");
    // The subscriber's preconnect for seq 1 is waiting when seq 1 is written empty.
    let reader = tokio::spawn(async move {
        let seg = next(&mut sub).await;
        (seg.seq(), seg.discont(), body(seg).await)
    });
    wait_attached(h.server(), "le", 1, 1, 1).await;
    let empty = bounded("begin 1", publisher.begin_segment()).await.unwrap();
    assert_eq!(empty.seq(), 1);
    assert_eq!(
        bounded("empty 1", empty.finish()).await.unwrap(),
        SegmentOutcome::Done
    );
    // The next segment (seq 2) is what the subscriber gets, flagged as a discontinuity.
    assert_eq!(
        publisher
            .send_message(Bytes::from_static(b"two"))
            .await
            .unwrap(),
        SegmentOutcome::Done
    );
    let (seq, discont, data) = bounded("reader", reader).await.unwrap();
    assert_eq!((seq, discont), (2, true));
    assert_eq!(data, b"two");
}

#[tokio::test]
async fn reattach_after_an_empty_write_continues_after_it_with_reset() {
    let h = start(ServerConfig::default()).await;
    h.server().create_channel("rae", "video/MP2T").unwrap();
    let url = h.url("rae");
    // A first publisher writes seq 0 and closes without DELETE: its final empty segment
    // consumes seq 1.
    let mut first = Publisher::new(
        &url,
        PublisherConfig {
            delete_on_close: false,
            ..pub_config()
        },
    )
    .unwrap();
    first.send_message(Bytes::from_static(b"a")).await.unwrap();
    bounded("close", first.close()).await.unwrap();
    // A subscriber waits at the write head (seq 2).
    let mut sub = Subscriber::new(&url, sub_config(-1)).unwrap();
    let reader = tokio::spawn(async move {
        let seg = next(&mut sub).await;
        (seg.seq(), body(seg).await)
    });
    wait_attached(h.server(), "rae", 2, 1, 0).await;
    // The restarted publisher learns seq 2 from /next and sends it with Lp-Trickle-Reset.
    let mut p = bounded("reattach", Publisher::reattach(&url, pub_config()))
        .await
        .unwrap();
    assert_eq!(p.next_seq(), 2);
    assert_eq!(
        p.send_message(Bytes::from_static(b"c")).await.unwrap(),
        SegmentOutcome::Done
    );
    assert_eq!(p.last_written_seq(), Some(2));
    assert_eq!(bounded("reader", reader).await.unwrap(), (2, b"c".to_vec()));
}

//! The HTTP edge of the proxy listener (issue 11, items 4 and 5), black-box against the real
//! binary, a real redis-server and the recording backend: a graceful stop on SIGTERM that
//! finishes and settles what was admitted, and the limits on the request head (size, arrival
//! time, ambiguous framing, `Upgrade`).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::json;
use support::gateway::{GatewayOptions, GatewayProcess};
use support::http;
use support::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a raw exchange ended with: a parsed response, or the connection closing without one.
#[derive(Debug)]
enum Outcome {
    Answered(http::Response),
    /// The connection closed (or failed) before a whole response arrived.
    CutShort(String),
}

/// Sends `request` and reads until the server closes; never panics on a broken connection.
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Outcome {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&request).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Err(_) => Outcome::CutShort("no answer within 30 s".into()),
        Ok(Err(e)) => Outcome::CutShort(e.to_string()),
        Ok(Ok(buf)) => {
            let complete = buf.windows(4).any(|w| w == b"\r\n\r\n");
            if !complete {
                return Outcome::CutShort(format!("{} bytes, no whole head", buf.len()));
            }
            let r = http::parse(&buf);
            let declared = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            match declared {
                Some(n) if n != r.body.len() => {
                    Outcome::CutShort(format!("body {} of {n} bytes", r.body.len()))
                }
                _ => Outcome::Answered(r),
            }
        }
    }
}

fn relight_request(addr: SocketAddr, key: &str, extra_headers: &str) -> Vec<u8> {
    let body = json!({"model": "nano-banana-pro"}).to_string();
    format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{extra_headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const BUSINESS_CREDITS: u64 = 700;
const RELIGHT_CREDITS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_settles_every_admitted_request_and_refuses_new_ones() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let mut gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    // Warm the path (and the store connection) the way a running gateway is.
    let warm = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro"}),
        )
        .await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(1),
        ..Behaviour::default()
    });
    backend.clear();

    const IN_FLIGHT: usize = 40;
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let req = relight_request(gw.proxy, &key, "");
            let addr = gw.proxy;
            tokio::spawn(async move { exchange(addr, req).await })
        })
        .collect();
    // Every request admitted and waiting on the backend before the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.request_count() < IN_FLIGHT {
        assert!(
            Instant::now() < deadline,
            "only {} reached the backend",
            backend.request_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = TcpStream::connect(gw.proxy).await;
    let mut statuses = std::collections::BTreeMap::new();
    let mut cut = Vec::new();
    let mut kept = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Answered(r) => {
                *statuses.entry(r.status).or_insert(0usize) += 1;
                if r.status == 200 {
                    kept += r
                        .header("X-Credits-Charged")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            Outcome::CutShort(why) => cut.push(why),
        }
    }
    let exited = gw.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    println!("SIGTERM with {IN_FLIGHT} in flight: statuses {statuses:?}, cut short {cut:?}, exit after {took:?}");
    assert!(
        late.is_err(),
        "a connection attempted after SIGTERM was accepted"
    );
    assert!(exited, "the gateway did not exit");
    // Pingora alone sleeps the whole grace (2.0 s) before it stops; the requests need ~1 s.
    assert!(
        took < Duration::from_secs(2),
        "exit after {took:?}: not within shutdown_grace_s = 2 s"
    );
    assert!(cut.is_empty(), "cut short: {cut:?}\n{}", gw.log());
    assert_eq!(
        statuses.get(&200).copied().unwrap_or(0),
        IN_FLIGHT,
        "{statuses:?}\n{}",
        gw.log()
    );
    // Balance + kept charges == granted: every admitted request settled exactly.
    let after = GatewayProcess::start(&redis.url(), backend.addr).await;
    let balance = after.balance(&key).await;
    assert_eq!(kept, IN_FLIGHT as u64 * RELIGHT_CREDITS);
    assert_eq!(
        balance + kept + RELIGHT_CREDITS,
        BUSINESS_CREDITS,
        "balance {balance}, kept {kept}"
    );
}

/// A gateway with a business account and its key, in front of a fresh recording backend.
async fn billed_gateway(
    redis: &RedisServer,
    backend: &DemoBackend,
    server_toml: &str,
) -> (GatewayProcess, String) {
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.server_toml = server_toml.to_string();
    let gw = GatewayProcess::start_with(opts).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    (gw, key)
}

/// Refused without reaching the backend or moving the balance.
async fn assert_refused_unbilled(
    gw: &GatewayProcess,
    backend: &DemoBackend,
    key: &str,
    outcome: &Outcome,
    status: u16,
    code: &str,
) {
    match outcome {
        Outcome::Answered(r) => {
            assert_eq!(r.status, status, "{}", r.text());
            assert_eq!(r.error_code(), code, "{}", r.text());
        }
        Outcome::CutShort(why) => panic!("no answer ({why}), expected {status} {code}"),
    }
    assert_eq!(backend.request_count(), 0, "the backend saw the request");
    assert_eq!(gw.balance(key).await, BUSINESS_CREDITS, "charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_block_is_431_and_never_proxied_or_charged() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let (gw, key) = billed_gateway(&redis, &backend, "").await;

    // One 64 KiB header line.
    let line = format!("X-Pad: {}\r\n", "a".repeat(64 * 1024));
    let r = exchange(gw.proxy, relight_request(gw.proxy, &key, &line)).await;
    assert_refused_unbilled(&gw, &backend, &key, &r, 431, "request_header_too_large").await;

    // 64 KiB over 64 lines.
    let lines: String = (0..64)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)))
        .collect();
    let r = exchange(gw.proxy, relight_request(gw.proxy, &key, &lines)).await;
    assert_refused_unbilled(&gw, &backend, &key, &r, 431, "request_header_too_large").await;

    // Just under the default 32 KiB: served.
    let line = format!("X-Pad: {}\r\n", "a".repeat(31 * 1024));
    match exchange(gw.proxy, relight_request(gw.proxy, &key, &line)).await {
        Outcome::Answered(r) => assert_eq!(r.status, 200, "{}", r.text()),
        Outcome::CutShort(why) => panic!("{why}"),
    }
    assert_eq!(backend.request_count(), 1);
    backend.clear();
    let charged = BUSINESS_CREDITS - RELIGHT_CREDITS;

    // Beyond what Pingora parses at all (2 MiB; 300 header lines): whatever it answers, the
    // request is neither proxied nor charged.
    let huge = format!("X-Pad: {}\r\n", "a".repeat(2 * 1024 * 1024));
    let many: String = (0..300).map(|i| format!("X-N{i}: 1\r\n")).collect();
    for extra in [huge, many] {
        let r = exchange(gw.proxy, relight_request(gw.proxy, &key, &extra)).await;
        if let Outcome::Answered(r) = &r {
            assert!(r.status >= 400, "{} {}", r.status, r.text());
        }
        println!("beyond Pingora's header limits: {r:?}");
        assert_eq!(backend.request_count(), 0, "proxied");
        assert_eq!(gw.balance(&key).await, charged, "charged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_content_length_and_upgrade_are_refused_before_the_backend() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let (gw, key) = billed_gateway(&redis, &backend, "").await;
    let body = json!({"model": "nano-banana-pro"}).to_string();
    let head = |framing: &str| {
        format!(
            "POST /api/v1/images/relight HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{framing}\r\n",
            gw.proxy
        )
    };
    let n = body.len();
    let chunked = format!("{n:x}\r\n{body}\r\n0\r\n\r\n");
    let cases = [
        (
            format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
            body.clone(),
        ),
        (format!("Content-Length: {n}, {n}\r\n"), body.clone()),
        (
            format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"),
            chunked.clone(),
        ),
        (
            format!("Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"),
            chunked.clone(),
        ),
    ];
    for (framing, payload) in cases {
        let req = format!("{}{payload}", head(&framing)).into_bytes();
        let r = exchange(gw.proxy, req).await;
        println!("{framing:?} → {r:?}");
        assert_refused_unbilled(&gw, &backend, &key, &r, 400, "invalid_request").await;
    }
    // Upgrade on a billed route never reaches the backend (Pingora treats any HTTP/1.1
    // request with `Upgrade` as an upgrade, whatever `Connection` says).
    let req = relight_request(gw.proxy, &key, "Upgrade: websocket\r\n");
    let r = exchange(gw.proxy, req).await;
    assert_refused_unbilled(&gw, &backend, &key, &r, 400, "invalid_request").await;
    // Plain framing still works.
    match exchange(gw.proxy, relight_request(gw.proxy, &key, "")).await {
        Outcome::Answered(r) => assert_eq!(r.status, 200, "{}", r.text()),
        Outcome::CutShort(why) => panic!("{why}"),
    }
    assert_eq!(backend.request_count(), 1);
}

/// Sends `head` one byte per `every` on a fresh connection; returns how long after the first
/// byte the gateway closed it (or `None` if it stayed open until `give_up`).
async fn trickle(
    mut stream: TcpStream,
    head: Vec<u8>,
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    for b in head.iter().cycle() {
        if started.elapsed() > give_up {
            return None;
        }
        if stream.write_all(&[*b]).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => return Some(started.elapsed()),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_closed_within_the_header_timeout_while_billed_requests_go_on() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let (gw, key) = billed_gateway(&redis, &backend, "header_timeout_ms = 2000").await;
    let limit = Duration::from_millis(2000 + 1000);
    let slow_head = relight_request(gw.proxy, &key, "");

    // 200 first requests at 1 byte/s.
    let slow: Vec<_> = (0..200)
        .map(|_| {
            let head = slow_head.clone();
            let addr = gw.proxy;
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                trickle(s, head, Duration::from_secs(1), Duration::from_secs(10)).await
            })
        })
        .collect();
    // A keep-alive follow-up at 1 byte/s after a served first request.
    let follow_up = {
        let addr = gw.proxy;
        let key = key.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let first = String::from_utf8(relight_request(addr, &key, ""))
                .unwrap()
                .replacen("Connection: close\r\n", "", 1);
            s.write_all(first.as_bytes()).await.expect("write");
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("\"status\":\"succeeded\"") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before the first answer");
                got.extend_from_slice(&buf[..n]);
            }
            // Idle a little (keep-alive wait is not header time), then trickle.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            trickle(
                s,
                first.into_bytes(),
                Duration::from_secs(1),
                Duration::from_secs(10),
            )
            .await
        })
    };

    // Meanwhile billed requests on their own connections keep being served.
    let mut latencies = Vec::new();
    let started = Instant::now();
    // (At most 200 × 3 credits of the 700 granted.)
    while started.elapsed() < Duration::from_secs(4) && latencies.len() < 200 {
        let t = Instant::now();
        let r = gw
            .generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-pro"}),
            )
            .await;
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    let p50 = latencies[latencies.len() / 2];
    println!(
        "{} billed requests beside 200 slow-header connections: p50 {p50:?}, p99 {p99:?}",
        latencies.len()
    );

    let mut closed_after = Vec::new();
    for t in slow {
        let closed = t.await.unwrap();
        let after = closed.expect("a slow-header connection stayed open for 10 s");
        closed_after.push(after);
    }
    closed_after.sort();
    println!(
        "slow-header connections closed after {:?} .. {:?}",
        closed_after[0],
        closed_after[closed_after.len() - 1]
    );
    assert!(
        closed_after.iter().all(|d| *d <= limit),
        "closed after up to {:?}",
        closed_after.last()
    );
    let follow = follow_up.await.unwrap();
    println!("keep-alive follow-up at 1 byte/s closed after {follow:?} from its first byte");
    assert!(
        follow.is_some_and(|d| d <= limit),
        "follow-up closed after {follow:?}"
    );
    // Nothing slow was proxied: only the served requests reached the backend.
    assert_eq!(backend.request_count(), latencies.len() + 1);
}

/// Reads one response with a `Content-Length` body from a kept-alive connection.
async fn read_one(stream: &mut TcpStream) -> Result<http::Response, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = http::parse(&buf);
            let len = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(r);
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_keep_alive_clients_to_close_so_no_follow_up_is_cut() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let (mut gw, key) = billed_gateway(&redis, &backend, "").await;
    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(1),
        ..Behaviour::default()
    });
    const CLIENTS: usize = 40;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = gw.proxy;
            let req = String::from_utf8(relight_request(addr, &key, ""))
                .unwrap()
                .replacen("Connection: close\r\n", "", 1);
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(req.as_bytes()).await.expect("write");
                let first = read_one(&mut s).await;
                let close =
                    first.as_ref().ok().and_then(|r| r.header("connection")) == Some("close");
                // A keep-alive client sends its next request on the same connection unless
                // told to close; what becomes of it?
                let second = if close || first.is_err() {
                    None
                } else {
                    let _ = s.write_all(req.as_bytes()).await;
                    Some(read_one(&mut s).await)
                };
                (first, close, second)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.request_count() < CLIENTS {
        assert!(Instant::now() < deadline, "not all reached the backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.signal("TERM");
    let (mut ok, mut told_close, mut cut) = (0, 0, Vec::new());
    for t in tasks {
        let (first, close, second) = t.await.unwrap();
        match first {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => panic!("first answer {}: {}", r.status, r.text()),
            Err(e) => cut.push(format!("first: {e}")),
        }
        told_close += usize::from(close);
        if let Some(Err(e)) = second {
            cut.push(format!("follow-up on the kept connection: {e}"));
        }
    }
    println!(
        "keep-alive clients at SIGTERM: {ok} × 200, {told_close} told to close, cut short {cut:?}"
    );
    assert!(gw.wait_exit(Duration::from_secs(5)), "did not exit");
    assert_eq!(ok, CLIENTS);
    assert_eq!(
        told_close, CLIENTS,
        "responses after SIGTERM must say Connection: close"
    );
    assert!(cut.is_empty(), "{cut:?}");
}

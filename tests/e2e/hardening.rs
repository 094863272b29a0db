//! The request path against hostile clients, broken upstreams and careless
//! operators: each test fails without the fix it guards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

/// `bosun proxy --mode gateway` on 127.0.0.1 with `flags`, routing to `be`.
async fn gateway_with(port: u16, be: SocketAddr, flags: &[&str]) -> Bosun {
    let mut args = vec!["--mode", "gateway", "--gateway-address", "127.0.0.1"];
    args.extend_from_slice(flags);
    Bosun::start(&args, &gateway_to(port, be)).await
}

/// Reads one HTTP/1.1 response (Content-Length bodies) off a raw socket.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = content_length(&head);
            if buf.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&buf[..end + 4 + len]).to_string());
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                return (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).to_string());
            }
            Ok(Ok(n)) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// The Content-Length a head declares (0 when none).
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0)
}

/// An upstream written by hand that reads each request (its head and a
/// Content-Length body) and writes back what `answer` makes of the head and
/// the body.
async fn answering_upstream<F>(answer: F) -> SocketAddr
where
    F: Fn(&str, &[u8]) -> Vec<u8> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    raw_upstream(move |mut s| {
        let answer = answer.clone();
        async move {
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len = content_length(&head);
                    if buf.len() < end + 4 + len {
                        break;
                    }
                    let reply = answer(&head, &buf[end + 4..end + 4 + len]);
                    buf.drain(..end + 4 + len);
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
        }
    })
    .await
}

/// True when the peer closes the connection within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// An upstream written by hand: answers `GET /path` with the path as body;
/// for `/poison` it answers and, 100 ms later, writes a second response
/// nobody asked for on the same connection.
/// An upstream written by hand on 127.0.0.1: each accepted connection is
/// handed to `serve` in a task of its own.
async fn raw_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s));
            }
        }
    });
    addr
}

async fn poisoning_upstream() -> SocketAddr {
    raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                    path.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                if path == "/poison" {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nx-poison: 1\r\ncontent-length: 6\r\n\r\npoison",
                        )
                        .await;
                }
            }
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stray_upstream_response_never_reaches_another_client() {
    let up = poisoning_upstream().await;
    let port = free_port();
    let _bosun = Bosun::gateway(&gateway_to(port, up)).await;
    let c = client();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let r = get(&c, &url("/poison"), "site").await;
    assert_eq!(r.body, "/poison");
    // The stray response is in the pooled connection's socket by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        let path = format!("/victim-{i}");
        let r = get(&c, &url(&path), "site").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, path, "a client got another request's response");
        assert!(!r.headers.contains_key("x-poison"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_or_deleted_config_keeps_the_last_good_one_serving() {
    let be = backend("kept").await;
    let port = free_port();
    let bosun = Bosun::gateway(&gateway_to(port, be.addr)).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get(&c, &url, "site").await.status, 200);
    let rejected = |m: &str| metric_sum(m, "bosun_config_rejected_total", &[]);
    let before = rejected(&bosun.metrics().await);

    // `> mesh.yaml` truncates before it writes: the zero-byte moment is refused.
    std::fs::write(bosun.config_dir().join("mesh.yaml"), "").expect("truncate");
    eventually("the empty file is refused", || async {
        rejected(&bosun.metrics().await) > before
    })
    .await;
    assert!(
        bosun.log_text().contains("no resources"),
        "{}",
        bosun.log_text()
    );
    assert_eq!(get(&c, &url, "site").await.status, 200);
    assert_eq!(
        admin_get(bosun.admin, "/ready").await,
        Ok((200, "ready\n".into()))
    );

    // The whole directory gone: refused too, nothing closes.
    let after_empty = rejected(&bosun.metrics().await);
    std::fs::remove_dir_all(bosun.config_dir()).expect("rm -r");
    eventually("the missing directory is refused", || async {
        rejected(&bosun.metrics().await) > after_empty
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get(&c, &url, "site").await.status, 200);
    }
    assert!(
        bosun.log_text().contains("no config files"),
        "{}",
        bosun.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_partial_connections_are_closed_at_the_head_timeout() {
    let be = backend("b").await;
    let port = free_port();
    let _bosun = gateway_with(
        port,
        be.addr,
        &["--request-head-timeout", "1s", "--idle-timeout", "30s"],
    )
    .await;
    let sends: [&[u8]; 4] = [
        b"",
        b"P",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: site\r\n",
    ];
    let mut conns = Vec::new();
    for s in sends {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        c.write_all(s).await.expect("write");
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(4)).await,
            "connection {i} ({:?}) still open",
            String::from_utf8_lossy(sends[i])
        );
    }
}

/// A gateway with `flags` and a keep-alive connection to it that has had
/// one request answered (200). The gateway and backend live as long as the
/// returned values.
async fn after_one_request(flags: &[&str]) -> (Bosun, Backend, TcpStream) {
    let be = backend("b").await;
    let port = free_port();
    let bosun = gateway_with(port, be.addr, flags).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .expect("write");
    let r = read_response(&mut c).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    (bosun, be, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_bosun, _be, mut c) =
        after_one_request(&["--request-head-timeout", "30s", "--idle-timeout", "1s"]).await;
    let t = Instant::now();
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "closed too early"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_stops_accepting_at_its_limit_and_admin_still_answers() {
    let be = backend("b").await;
    let port = free_port();
    let bosun = gateway_with(port, be.addr, &["--max-connections", "10"]).await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The 11th connects (the kernel's backlog) but is not served...
    let mut extra = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    extra
        .write_all(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .expect("write");
    let mut b = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(700), extra.read(&mut b))
            .await
            .is_err(),
        "served beyond the connection limit"
    );
    // ...while the admin listener answers.
    assert_eq!(
        admin_get(bosun.admin, "/ready").await,
        Ok((200, "ready\n".into()))
    );
    assert!(
        metric_sum(
            &bosun.metrics().await,
            "bosun_downstream_connections_total",
            &[]
        ) >= 10.0
    );
    // One closes: the waiting one is accepted and served.
    drop(idle.pop());
    let r = read_response(&mut extra)
        .await
        .expect("served once a slot frees");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431_and_malformed_requests_400_without_reaching_upstream() {
    let be = backend("b").await;
    let port = free_port();
    let _bosun = Bosun::gateway(&gateway_to(port, be.addr)).await;
    let raw = |req: Vec<u8>| async move {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        c.write_all(&req).await.expect("write");
        read_response(&mut c).await.unwrap_or_default()
    };
    let big = format!(
        "GET / HTTP/1.1\r\nHost: site\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = raw(big.into_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: site\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(many.into_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = raw(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "missing Host: {r}");
    let r = raw(b"GET / HTTP/1.1\r\nHost: site\r\nHost: evil\r\n\r\n".to_vec()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "duplicate Host: {r}");
    let r = raw(
        b"POST / HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(
        !r.starts_with("HTTP/1.1 2"),
        "bad chunk size was forwarded: {r}"
    );
    assert_eq!(
        be.hits.load(Ordering::Relaxed),
        0,
        "a malformed request reached the upstream"
    );
    // A good request still works.
    let r = raw(b"GET / HTTP/1.1\r\nHost: site\r\n\r\n".to_vec()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// An upstream that records, per connection, what it read and whether the
/// proxy closed it; it answers every complete chunked request.
async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<(String, bool)>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let addr = raw_upstream(move |mut s| {
        let seen = s2.clone();
        async move {
            let idx = {
                let mut v = seen.lock().expect("lock");
                v.push((String::new(), false));
                v.len() - 1
            };
            let mut b = [0u8; 4096];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        seen.lock().expect("lock")[idx].1 = true;
                        return;
                    }
                    Ok(n) => {
                        let done = {
                            let mut v = seen.lock().expect("lock");
                            v[idx].0.push_str(&String::from_utf8_lossy(&b[..n]));
                            v[idx].0.ends_with("0\r\n\r\n")
                        };
                        if done {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                }
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_turns_malformed_midway_closes_its_upstream_connection() {
    let (up, seen) = recording_upstream().await;
    let port = free_port();
    // Without retries the body streams: the upstream sees its first chunk.
    let _bosun = Bosun::gateway(&no_retries(&gateway_to(port, up))).await;
    // Warm a pooled connection with a good chunked request.
    let good = b"POST /a HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(good).await.expect("write");
    let r = read_response(&mut c).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(c);
    // Now a body whose first chunk is fine and whose second is not.
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(
        b"POST /b HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write_all(b"zz\r\nworld\r\n0\r\n\r\n")
        .await
        .expect("write");
    let r = read_response(&mut c).await.unwrap_or_default();
    assert!(!r.starts_with("HTTP/1.1 2"), "{r}");
    eventually(
        "the half-sent request's upstream connection is closed",
        || async {
            seen.lock()
                .expect("lock")
                .iter()
                .any(|(text, closed)| text.contains("POST /b") && *closed)
        },
    )
    .await;
    // The next request goes on a connection that never carried the half one.
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(&good.replace_path("/c")).await.expect("write");
    let r = read_response(&mut c).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let v = seen.lock().expect("lock").clone();
    for (text, _) in &v {
        assert!(
            !(text.contains("POST /b") && text.contains("POST /c")),
            "a request followed a half-sent one on the same connection: {text:?}"
        );
    }
}

/// The route of `gateway_to` with retries off (Istio's default policy
/// would keep the body for a retry instead of streaming it).
fn no_retries(yaml: &str) -> String {
    yaml.replace(
        "  - route: [{destination: {host: site}}]",
        "  - retries: {attempts: 0}\n    route: [{destination: {host: site}}]",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn with_retries_a_malformed_body_never_reaches_the_upstream() {
    let (up, seen) = recording_upstream().await;
    let port = free_port();
    // Istio's default retry policy: a body that has arrived whole is kept
    // before it goes upstream (one that is still coming streams).
    let _bosun = Bosun::gateway(&gateway_to(port, up)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(
        b"POST /b HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let r = read_response(&mut c).await.unwrap_or_default();
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A good chunked body is forwarded chunked, as the client framed it.
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(b"POST /a HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .expect("write");
    let r = read_response(&mut c).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let v = seen.lock().expect("lock").clone();
    assert!(
        v.iter().all(|(text, _)| !text.contains("POST /b")),
        "the malformed request reached the upstream: {v:?}"
    );
    assert!(
        v.iter().any(
            |(text, _)| text.contains("POST /a") && text.contains("transfer-encoding: chunked")
        ),
        "{v:?}"
    );
}

trait ReplacePath {
    fn replace_path(&self, p: &str) -> Vec<u8>;
}

impl ReplacePath for [u8] {
    fn replace_path(&self, p: &str) -> Vec<u8> {
        String::from_utf8_lossy(self)
            .replacen("/a", p, 1)
            .into_bytes()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_gets_504_si() {
    // Accepts, reads nothing, answers nothing.
    let up = raw_upstream(|s| async move {
        let _held = s;
        std::future::pending::<()>().await
    })
    .await;
    let port = free_port();
    let bosun = gateway_with(port, up, &["--stream-idle-timeout", "1s", "--access-log"]).await;
    let t = Instant::now();
    let r = get(&client(), &format!("http://127.0.0.1:{port}/"), "site").await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.headers
            .get("x-bosun-response-flags")
            .map(|v| v.to_str().unwrap_or("")),
        Some("SI")
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    eventually("the access log has SI", || async {
        bosun.stdout_text().contains("\"response_flags\":\"SI\"")
    })
    .await;
}

fn signal(b: &Bosun, sig: &str) {
    kill(b.pid(), sig);
}

fn kill(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_finishes_every_request_then_exits() {
    let fast = backend("fast").await;
    let slow = backend_with_delay("slow", Duration::from_millis(1500)).await;
    let port = free_port();
    let mut y = gateway("web", port);
    y.push_str(&service_entry(
        "fast",
        "web",
        80,
        "HTTP",
        &[(fast.addr, "")],
    ));
    y.push_str(&service_entry(
        "slow",
        "web",
        80,
        "HTTP",
        &[(slow.addr, "")],
    ));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: site, namespace: web}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /slow}}]\n    route: [{destination: {host: slow}}]\n  - route: [{destination: {host: fast}}]\n");
    let mut bosun = Bosun::start(
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.1",
            "--drain-duration",
            "5s",
        ],
        &y,
    )
    .await;
    // test.sh installs wrk.
    let wrk = std::process::Command::new("wrk")
        .args([
            "-t1",
            "-c8",
            "-d3s",
            "-H",
            "Host: site",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wrk (apt-get install wrk)");
    // Our own clients beside wrk, which tell a request that failed from a
    // connection the closed listener refused.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        loaders.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut refused, mut failed) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .header("host", "site")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok += 1;
                    }
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) if e.is_connect() => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (ok, refused, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slow_reqs = Vec::new();
    for i in 0..20 {
        slow_reqs.push(tokio::spawn(async move {
            let c = client();
            request(
                &c,
                "GET",
                &format!("http://127.0.0.1:{port}/slow/{i}"),
                "site",
                &[],
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    signal(&bosun, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: /ready says so and new connections are refused.
    assert_eq!(admin_get(bosun.admin, "/ready").await.map(|r| r.0), Ok(503));
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    for r in slow_reqs {
        let r = r.await.expect("join");
        assert_eq!(r.status, 200, "an in-flight request was cut: {}", r.body);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut refused) = (0, 0);
    for l in loaders {
        let (o, r, failed) = l.await.expect("join");
        assert!(
            failed.is_empty(),
            "requests failed during the drain: {failed:?}"
        );
        ok += o;
        refused += r;
    }
    assert!(
        ok > 100,
        "the load ran ({ok} ok, {refused} refused after the listener closed)"
    );
    let status = bosun
        .wait_exit(Duration::from_secs(6))
        .expect("exited within drain + 1 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(t.elapsed() < Duration::from_secs(6));
    let out = wrk.wait_with_output().expect("wrk output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("requests in"), "wrk ran:\n{text}");
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    // A request cut mid-way would be a read error or a timeout. wrk counts
    // a reconnect the closed listener refused as a write error (its
    // non-blocking connect fails at the first write): those are not
    // requests, and our own clients above tell the two apart.
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        assert!(
            line.contains("read 0") && line.contains("timeout 0"),
            "wrk: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quitquitquit_drains_and_a_second_signal_exits_at_once() {
    let slow = backend_with_delay("slow", Duration::from_secs(20)).await;
    let port = free_port();
    let mut bosun = gateway_with(port, slow.addr, &["--drain-duration", "30s"]).await;
    let stuck = tokio::spawn(async move {
        let c = client();
        request(&c, "GET", &format!("http://127.0.0.1:{port}/"), "site", &[]).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client_post_admin(bosun.admin, "/quitquitquit").await;
    assert_eq!(r, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(admin_get(bosun.admin, "/ready").await.map(|r| r.0), Ok(503));
    assert!(
        bosun.wait_exit(Duration::from_millis(500)).is_none(),
        "did not wait for the request"
    );
    signal(&bosun, "-INT");
    let status = bosun
        .wait_exit(Duration::from_secs(2))
        .expect("second signal exits at once");
    assert_eq!(status.code(), Some(1));
    stuck.abort();
}

async fn client_post_admin(addr: SocketAddr, path: &str) -> u16 {
    let mut c = TcpStream::connect(addr).await.expect("admin");
    c.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: admin\r\ncontent-length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let r = read_response(&mut c).await.unwrap_or_default();
    r.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_control_service_ends_its_streams_so_proxies_fail_over() {
    let be = backend("b").await;
    let port = free_port();
    let dir = TempDir::new("control-drain");
    let cfg = dir.0.join("cfg");
    write_dir(&cfg, &gateway_to(port, be.addr));
    let mut control = Control::start(&cfg, None).await;
    let proxy = Bosun::with_xds(
        control.xds,
        &["--mode", "gateway", "--gateway-address", "127.0.0.1"],
    );
    proxy.wait_ready().await;
    assert_eq!(
        get(&client(), &format!("http://127.0.0.1:{port}/"), "site")
            .await
            .status,
        200
    );
    kill(control.pid(), "-TERM");
    let status = control
        .wait_exit(Duration::from_secs(6))
        .expect("the control service exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // The proxy heard UNAVAILABLE (not a silent stream) and keeps serving.
    eventually("the proxy saw the stream end", || async {
        proxy.log_text().contains("control service shutting down")
    })
    .await;
    assert_eq!(
        get(&client(), &format!("http://127.0.0.1:{port}/"), "site")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_connection_gets_goaway_and_its_stream_finishes_on_drain() {
    let slow = backend_with_delay("slow", Duration::from_millis(1000)).await;
    let port = free_port();
    let mut bosun = gateway_with(port, slow.addr, &["--drain-duration", "5s"]).await;
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    let driver = tokio::spawn(conn);
    let req = || {
        http::Request::get(format!("http://site:{port}/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    let in_flight = tx.send_request(req());
    let waiting = tokio::spawn(async move {
        let r = in_flight.await.expect("response");
        let status = r.status();
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
        status
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&bosun, "-TERM");
    assert_eq!(
        waiting.await.expect("join"),
        200,
        "the stream in flight finished"
    );
    // GOAWAY: the connection takes no new stream and then ends.
    let after = tokio::time::timeout(Duration::from_secs(3), async {
        match tx.ready().await {
            Ok(()) => tx.send_request(req()).await.map(|r| r.status()),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("no hang after GOAWAY");
    assert!(
        after.is_err(),
        "a new stream was accepted while draining: {after:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(3), driver).await;
    let status = bosun
        .wait_exit(Duration::from_secs(6))
        .expect("exits once the stream is done");
    assert!(status.success());
}

/// Reads one response off a raw socket, `buf` carrying bytes read past the
/// previous one: (head, body). A response to HEAD has no body whatever its
/// Content-Length says.
async fn read_one(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> Option<(String, String)> {
    let mut b = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = if head_request {
                0
            } else {
                content_length(&head)
            };
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return Some((head, body));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// The lean HTTP/1.1 path serves simple requests and hands the connection
/// to hyper at the first one with a chunked body: pipelined in one write, every
/// response comes back in order, HEAD without a body, and the last
/// request's `Connection: close` closes the connection.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order_across_the_hand_over_to_hyper() {
    let be = backend("b").await;
    let port = free_port();
    let _bosun = Bosun::gateway(&gateway_to(port, be.addr)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(
        b"GET /1 HTTP/1.1\r\nHost: site\r\n\r\n\
          HEAD /2 HTTP/1.1\r\nHost: site\r\n\r\n\
          GET /3 HTTP/1.1\r\nHost: site\r\n\r\n\
          POST /4 HTTP/1.1\r\nHost: site\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          GET /5 HTTP/1.1\r\nHost: site\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    for (path, head_request) in [
        ("/1", false),
        ("/2", true),
        ("/3", false),
        ("/4", false),
        ("/5", false),
    ] {
        let (head, body) = read_one(&mut c, &mut buf, head_request)
            .await
            .unwrap_or_else(|| panic!("no response for {path}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("\r\ndate: "),
            "{path}: {head}"
        );
        if head_request {
            assert!(body.is_empty());
            assert!(
                head.to_ascii_lowercase().contains("content-length: "),
                "{head}"
            );
        } else {
            assert!(
                body.contains(&format!("\"path\":\"{path}\"")),
                "{path}: {body}"
            );
        }
        if path == "/4" {
            assert!(body.contains("\"body_len\":5"), "{body}");
        }
        if path == "/5" {
            assert!(
                head.to_ascii_lowercase().contains("connection: close"),
                "{head}"
            );
        }
    }
    assert!(buf.is_empty(), "bytes after the last response");
    assert!(closed_within(&mut c, Duration::from_secs(3)).await);
    assert_eq!(be.hits.load(Ordering::Relaxed), 5);
}

/// An upstream that answers each request with its method, target and body.
async fn echoing_upstream() -> SocketAddr {
    answering_upstream(|head, body| {
        let mut line = head.split(' ');
        let (method, target) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let mut echo = format!("{method} {target} ").into_bytes();
        echo.extend_from_slice(body);
        let mut resp =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", echo.len()).into_bytes();
        resp.extend_from_slice(&echo);
        resp
    })
    .await
}

/// Small `Content-Length` bodies pipelined with bodiless requests (the
/// lean path takes them whole, with their heads), one at the lean path's
/// limit and one past it, then a body that comes 300 ms after its head
/// (hyper streams it, and serves the connection from there): each reaches
/// the upstream whole, each answer comes back in order, and the request
/// bytes metric counts every body.
#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_reach_the_upstream_whole_pipelined_or_late() {
    let up = echoing_upstream().await;
    let port = free_port();
    let bosun = Bosun::gateway(&gateway_to(port, up)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let at_limit = "x".repeat(16 * 1024);
    let past_limit = "y".repeat(16 * 1024 + 1);
    let mut pipelined = b"POST /1 HTTP/1.1\r\nHost: site\r\nContent-Length: 5\r\n\r\nhello\
          GET /2 HTTP/1.1\r\nHost: site\r\n\r\n\
          PUT /3 HTTP/1.1\r\nHost: site\r\ncontent-length: 11\r\n\r\nhello world"
        .to_vec();
    pipelined.extend_from_slice(
        format!("POST /4 HTTP/1.1\r\nHost: site\r\nContent-Length: 16384\r\n\r\n{at_limit}")
            .as_bytes(),
    );
    pipelined.extend_from_slice(
        format!("POST /5 HTTP/1.1\r\nHost: site\r\nContent-Length: 16385\r\n\r\n{past_limit}")
            .as_bytes(),
    );
    c.write_all(&pipelined).await.expect("write");
    let mut buf = Vec::new();
    for want in [
        "POST /1 hello".to_string(),
        "GET /2 ".to_string(),
        "PUT /3 hello world".to_string(),
        format!("POST /4 {at_limit}"),
        format!("POST /5 {past_limit}"),
    ] {
        let (head, body) = read_one(&mut c, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("no response for {}", &want[..7]));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            body == want,
            "{}: got {} bytes: {:.60}",
            &want[..7],
            body.len(),
            body
        );
    }
    // The head alone, then its body after a pause.
    c.write_all(b"POST /6 HTTP/1.1\r\nHost: site\r\nContent-Length: 4\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write_all(b"late").await.expect("write");
    let (_, body) = read_one(&mut c, &mut buf, false).await.expect("late body");
    assert_eq!(body, "POST /6 late");
    c.write_all(b"GET /7 HTTP/1.1\r\nHost: site\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (_, body) = read_one(&mut c, &mut buf, false).await.expect("after");
    assert_eq!(body, "GET /7 ");
    assert!(closed_within(&mut c, Duration::from_secs(3)).await);
    let m = bosun.metrics().await;
    let sum = metric_sum(&m, "istio_request_bytes_sum", &["response_code=\"200\""]);
    assert_eq!(sum, (5 + 11 + 16384 + 16385 + 4) as f64, "{m}");
}

/// A client that goes away while its request is upstream takes the request
/// with it: the upstream connection is closed, not left waiting (hyper's
/// server without half-close; Envoy resets the upstream stream).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_request_frees_its_upstream_connection() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let tx = Arc::new(tx);
    let up = raw_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut b = [0u8; 4096];
            let mut seen = Vec::new();
            // Read the request, answer nothing, report when the proxy closes.
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send("closed");
                        return;
                    }
                    Ok(n) => {
                        seen.extend_from_slice(&b[..n]);
                        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = tx.send("request");
                        }
                    }
                }
            }
        }
    })
    .await;
    let port = free_port();
    let _bosun = Bosun::gateway(&no_retries(&gateway_to(port, up))).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: site\r\n\r\n")
        .await
        .expect("write");
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(
        got,
        Ok(Some("request")),
        "the request never reached upstream"
    );
    drop(c);
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
    assert_eq!(
        got,
        Ok(Some("closed")),
        "the upstream request outlived its client"
    );
}

/// Every request head has the head timeout, not only the first: a client
/// that starts a second request and stalls is closed at the head timeout,
/// long before the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_request_head_that_stalls_is_closed_at_the_head_timeout() {
    let (_bosun, _be, mut c) =
        after_one_request(&["--request-head-timeout", "1s", "--idle-timeout", "60s"]).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: site\r\n")
        .await
        .expect("write");
    assert!(closed_within(&mut c, Duration::from_secs(4)).await);
}

/// An upstream's hop-by-hop response headers never reach the client, and
/// the rest arrive the same on the lean path (which writes an HTTP/1.1
/// upstream's headers as they came, names lowercased) and on hyper's (a
/// request with a body): `Keep-Alive`, `Connection` and what it names are
/// gone, the upstream's own `Date` is kept, and a head carrying
/// `grpc-status` (which retry policies read from a map) passes whole.
#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_response_headers_are_dropped_the_same_on_both_paths() {
    let up = answering_upstream(|head, _| {
        let path = head.split(' ').nth(1).unwrap_or("/");
        let resp: &[u8] = if path.ends_with("/named") {
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"
        } else if path.ends_with("/grpc") {
            b"HTTP/1.1 200 OK\r\nGrpc-Status: 0\r\nContent-Length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nServer: Up\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Mixed-Case: V\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
        };
        resp.to_vec()
    })
    .await;
    let port = free_port();
    let _bosun = Bosun::gateway(&gateway_to(port, up)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = Vec::new();
    // Lean first (bodiless GETs), then hyper (the POST hands the
    // connection over, and hyper keeps it).
    for (method, path) in [
        ("GET", "/lean/plain"),
        ("GET", "/lean/named"),
        ("GET", "/lean/grpc"),
        ("POST", "/hyper/plain"),
        ("POST", "/hyper/named"),
        ("POST", "/hyper/grpc"),
    ] {
        let req = if method == "POST" {
            format!("POST {path} HTTP/1.1\r\nHost: site\r\nContent-Length: 3\r\n\r\nabc")
        } else {
            format!("GET {path} HTTP/1.1\r\nHost: site\r\n\r\n")
        };
        c.write_all(req.as_bytes()).await.expect("write");
        let (head, body) = read_one(&mut c, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("no response for {path}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert_eq!(body, "ok", "{path}");
        let lines: Vec<String> = head.lines().skip(1).map(str::to_string).collect();
        let names: Vec<String> = lines
            .iter()
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
            .collect();
        for hop in ["connection", "keep-alive", "proxy-connection", "x-secret"] {
            assert!(
                !names.iter().any(|n| n.eq_ignore_ascii_case(hop)),
                "{path}: {hop} reached the client: {head}"
            );
        }
        let has = |line: &str| lines.iter().any(|l| l == line);
        if path.ends_with("/plain") {
            assert!(has("server: Up"), "{path}: {head}");
            assert!(has("x-mixed-case: V"), "{path}: {head}");
            assert!(has("date: Mon, 01 Jan 2024 00:00:00 GMT"), "{path}: {head}");
            assert_eq!(
                names
                    .iter()
                    .filter(|n| n.eq_ignore_ascii_case("date"))
                    .count(),
                1,
                "{path}: {head}"
            );
        } else if path.ends_with("/named") {
            assert!(has("x-kept: k"), "{path}: {head}");
        } else {
            assert!(has("grpc-status: 0"), "{path}: {head}");
        }
        assert!(has("content-length: 2"), "{path}: {head}");
    }
}

/// Host, x-forwarded-for, -proto and x-request-id reach an HTTP/1.1
/// upstream exactly once each, with the same values whether they are
/// written straight into the head (a route without request header
/// operations) or set in the request's map (a route with them): a
/// rewritten authority replaces Host, a client's x-forwarded-for (both of
/// its lines) becomes one line with the client's address appended, and a
/// client's x-forwarded-proto and x-request-id are kept.
#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_reach_the_upstream_once_on_either_route() {
    let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let h2 = heads.clone();
    let up = answering_upstream(move |head, _| {
        h2.lock().expect("lock").push(head.to_string());
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let port = free_port();
    let y = gateway_routes_to(
        port,
        up,
        "  - match: [{uri: {prefix: /ops}}]\n    rewrite: {authority: backend.internal}\n    headers: {request: {set: {x-added: \"yes\"}}}\n    route: [{destination: {host: site}}]\n  - rewrite: {authority: backend.internal}\n    route: [{destination: {host: site}}]\n",
    );
    let _bosun = Bosun::gateway(&y).await;
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = Vec::new();
    for path in ["/plain", "/ops"] {
        for client_sent in [true, false] {
            let extra = if client_sent {
                "X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2\r\nX-Forwarded-Proto: https\r\nX-Request-Id: abc\r\n"
            } else {
                ""
            };
            let req = format!("GET {path} HTTP/1.1\r\nHost: site\r\n{extra}\r\n");
            c.write_all(req.as_bytes()).await.expect("write");
            let (head, body) = read_one(&mut c, &mut buf, false)
                .await
                .unwrap_or_else(|| panic!("no response for {path}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
            assert_eq!(body, "ok");
            let seen = heads
                .lock()
                .expect("lock")
                .pop()
                .expect("a request upstream");
            let values = |name: &str| -> Vec<String> {
                seen.lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_string())
                    .collect()
            };
            let what = format!("{path}, client headers {client_sent}: {seen}");
            assert_eq!(values("host"), ["backend.internal"], "{what}");
            if client_sent {
                assert_eq!(values("x-forwarded-for"), ["10.1.1.1, 127.0.0.1"], "{what}");
                assert_eq!(values("x-forwarded-proto"), ["https"], "{what}");
                assert_eq!(values("x-request-id"), ["abc"], "{what}");
            } else {
                assert_eq!(values("x-forwarded-for"), ["127.0.0.1"], "{what}");
                assert_eq!(values("x-forwarded-proto"), ["http"], "{what}");
                let id = values("x-request-id");
                assert!(id.len() == 1 && id[0].len() == 36, "{what}");
            }
            if path == "/ops" {
                assert_eq!(values("x-added"), ["yes"], "{what}");
            }
        }
    }
}

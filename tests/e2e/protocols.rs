//! HTTP/1.1 (keep-alive, chunked, 100-continue, WebSocket upgrade), h2c,
//! gRPC streaming with trailers, and opaque TCP, with outside clients
//! (curl, h2load, tonic) where they exist.

use std::pin::Pin;
use std::process::Command;

use bosun_xds_proto::testing::echo_client::EchoClient;
use bosun_xds_proto::testing::echo_server::{Echo, EchoServer};
use bosun_xds_proto::testing::{EchoReply, EchoRequest};
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status, Streaming};

use crate::harness::*;

fn http_gateway(port: u16, svc_port: u16, protocol: &str, backend: std::net::SocketAddr) -> String {
    let mut y = gateway("p", port);
    y.push_str(&service_entry(
        "app",
        "p",
        svc_port,
        protocol,
        &[(backend, "app=app,version=v1")],
    ));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: app, namespace: p}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app}}]\n");
    y
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (see README test command)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_keepalive_chunked_and_100_continue_with_curl() {
    let be = backend("app").await;
    let port = free_port();
    let bosun = Bosun::gateway(&http_gateway(port, 80, "HTTP", be.addr)).await;
    let url = format!("http://127.0.0.1:{port}/a");
    // Two requests on one connection.
    let (out, err) = curl(&["-v", &url, &url]);
    assert_eq!(out.matches("\"backend\":\"app\"").count(), 2, "{out}");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing connection"),
        "{err}"
    );
    // Chunked request body.
    let body = "x".repeat(100_000);
    let (out, _) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &body,
        &url,
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["body_len"], 100_000);
    assert_eq!(j["method"], "POST");
    // 100-continue: curl waits for the interim response before the body.
    let (out, err) = curl(&[
        "-v",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "5",
        "--data-binary",
        &body,
        &url,
    ]);
    assert!(err.contains("100 Continue"), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["body_len"], 100_000);
    let m = bosun.metrics().await;
    assert!(
        metric_sum(&m, "istio_request_bytes_sum", &["response_code=\"200\""]) >= 200_000.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_in_and_out_with_curl_and_h2load() {
    let be = backend("app").await;
    let port = free_port();
    // HTTP2 service port: h2 upstream too.
    let _bosun = Bosun::gateway(&http_gateway(port, 80, "HTTP2", be.addr)).await;
    let url = format!("http://127.0.0.1:{port}/h2");
    let (out, err) = curl(&["-v", "--http2-prior-knowledge", &url]);
    assert!(err.contains("HTTP/2 200"), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["version"], "HTTP/2.0", "upstream is h2 for an HTTP2 port");
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "16", &url])
        .output()
        .expect("h2load is installed (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2000 succeeded, 0 failed"), "{text}");
    // h2 downstream to an HTTP/1.1 upstream.
    let be1 = backend("h1").await;
    let port1 = free_port();
    let _b1 = Bosun::gateway(&http_gateway(port1, 80, "HTTP", be1.addr)).await;
    let (out, _) = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{port1}/"),
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["version"], "HTTP/1.1");
}

struct EchoSvc;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let m = req.into_inner().message;
        if m == "fail" {
            return Err(Status::not_found("no such thing"));
        }
        Ok(Response::new(EchoReply {
            message: m,
            served_by: "echo".into(),
        }))
    }
    type ServerStreamStream = ReplyStream;
    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let r = req.into_inner();
        let items: Vec<Result<EchoReply, Status>> = (0..r.count)
            .map(|i| {
                Ok(EchoReply {
                    message: format!("{}-{i}", r.message),
                    served_by: "echo".into(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
    }
    type BidiStreamStream = ReplyStream;
    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        use futures_util::StreamExt;
        let s = req.into_inner().map(|r| {
            r.map(|r| EchoReply {
                message: r.message.to_uppercase(),
                served_by: "echo".into(),
            })
        });
        Ok(Response::new(Box::pin(s)))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unary_streaming_and_trailers_through_the_proxy() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoSvc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let port = free_port();
    let bosun = Bosun::gateway(&http_gateway(port, 9000, "GRPC", addr)).await;
    let mut c = EchoClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let r = c
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .expect("unary");
    assert_eq!(r.into_inner().message, "hi");
    // An error status travels in the trailers: code and message intact.
    let e = c
        .unary(EchoRequest {
            message: "fail".into(),
            count: 0,
        })
        .await
        .expect_err("not found");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "no such thing");
    // Server streaming.
    let mut s = c
        .server_stream(EchoRequest {
            message: "m".into(),
            count: 50,
        })
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(item) = s.message().await.expect("item") {
        got.push(item.message);
    }
    assert_eq!(got.len(), 50);
    assert_eq!(got[49], "m-49");
    // Bidirectional streaming.
    let reqs = futures_util::stream::iter((0..10).map(|i| EchoRequest {
        message: format!("b{i}"),
        count: 0,
    }));
    let mut s = c.bidi_stream(reqs).await.expect("bidi").into_inner();
    let mut n = 0;
    while let Some(item) = s.message().await.expect("item") {
        assert_eq!(item.message, format!("B{n}"));
        n += 1;
    }
    assert_eq!(n, 10);
    let m = bosun.metrics().await;
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &["request_protocol=\"grpc\"", "grpc_response_status=\"5\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""]
        ) >= 3.0,
        "{m}"
    );
}

async fn tcp_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                echo_bytes(&mut s).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_tcp_through_a_gateway_port() {
    let echo = tcp_echo().await;
    let port = free_port();
    let y = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: p}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {port}, name: tcp, protocol: TCP}}\n    hosts: [\"*\"]\n---\n{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: p}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - match: [{{port: {port}}}]\n    route: [{{destination: {{host: db, port: {{number: 5432}}}}}}]\n",
        service_entry("db", "p", 5432, "TCP", &[(echo, "app=db,version=v1")])
    );
    let bosun = Bosun::gateway(&y).await;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let payload = vec![7u8; 50_000];
    s.write_all(&payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, payload);
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let m = bosun.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &["destination_app=\"db\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "istio_tcp_received_bytes_total",
            &["destination_app=\"db\""]
        ),
        50_000.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "istio_tcp_sent_bytes_total",
            &["destination_app=\"db\""]
        ),
        50_000.0,
        "{m}"
    );
}

/// A WebSocket-style backend: answers the upgrade with 101, then echoes bytes.
async fn upgrade_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !head.contains("upgrade: websocket") {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                    .await;
                echo_bytes(&mut s).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_passes_through() {
    let ws = upgrade_echo().await;
    let port = free_port();
    let _bosun = Bosun::gateway(&http_gateway(port, 80, "HTTP", ws)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("read head");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // A masked WebSocket text frame "hello", echoed byte for byte.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    s.write_all(&frame).await.expect("frame");
    let mut back = [0u8; 11];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, frame);
}

/// Answers one request per connection as if keeping it alive, then closes it
/// 20 ms later, the way an upstream idle timeout does.
async fn idle_closing_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = s.read_exact(&mut body).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            });
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keepalive_connection_closed_by_the_upstream_is_not_a_503() {
    let (be, conns) = idle_closing_backend().await;
    let port = free_port();
    let bosun = Bosun::gateway(&http_gateway(port, 80, "HTTP", be)).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    for i in 0..5 {
        let r = get(&c, &url, "x").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "GET {i}");
        // Long enough for the upstream to have closed the idle connection.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // A request with a body cannot be replayed: the idle connection is checked first.
        let r = request_with_body(&c, &url, "payload").await;
        assert_eq!(r, 200, "POST {i}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::Relaxed),
        10,
        "one connection per request"
    );
    let m = bosun.metrics().await;
    assert_eq!(
        metric_sum(&m, "istio_requests_total", &["response_code=\"503\""]),
        0.0,
        "{m}"
    );
}

async fn request_with_body(c: &HttpClient, url: &str, body: &'static str) -> u16 {
    let req = http::Request::post(url)
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .expect("request");
    c.request(req)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

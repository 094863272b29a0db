//! The lean HTTP/1.1 path against hyper's server, on the same bytes: when
//! the lean path takes a request, it must be an HTTP/1.1 request with no
//! body or one `Content-Length` body, and hyper (which serves everything
//! else, and which the lean path stands in for) must read the same request
//! from those bytes: same method, target and headers, a body of the same
//! length, and the next request starting where the lean path says the
//! request ends. A request the two read differently would be a request
//! smuggled past one of them.
#![no_main]

use std::sync::{Arc, Mutex};

use bosun_proxy::http::lean::parse_simple;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

type Seen = Arc<Mutex<Vec<(http::request::Parts, usize)>>>;

fuzz_target!(|data: &[u8]| {
    let Some((lean, head_len, body_len)) = parse_simple(data, 60 * 1024, 100) else {
        return;
    };
    assert_eq!(lean.version, http::Version::HTTP_11);
    assert_ne!(lean.method, http::Method::CONNECT);
    assert!(!lean.headers.contains_key(http::header::TRANSFER_ENCODING));
    assert!(lean.headers.get_all(http::header::CONTENT_LENGTH).iter().count() <= 1);
    assert!(body_len <= bosun_proxy::http::lean::LEAN_BODY);
    let len = head_len + body_len;
    // hyper on the head, then a marker request: what it reads first must be
    // the lean path's request, and the marker must come second.
    let close = lean
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")));
    let expect = if close { 1 } else { 2 };
    let mut bytes = data[..len].to_vec();
    bytes.extend_from_slice(b"GET /marker HTTP/1.1\r\nHost: m\r\n\r\n");
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let s3 = seen.clone();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let s = s2.clone();
            async move {
                let (parts, body) = req.into_parts();
                let n = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
                s.lock().expect("lock").push((parts, n));
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                ))
            }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.max_header_size(60 * 1024);
        let serve = b.serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        // The client stays open (no half-close): hyper reads on while it
        // has bytes, as it would from a keep-alive client.
        let feed = async {
            let _ = client.write_all(&bytes).await;
            for _ in 0..2000 {
                if s3.lock().expect("lock").len() >= expect {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            _ = serve => {}
            () = feed => {}
        }
    });
    let seen = seen.lock().expect("lock");
    let Some((hyper, body)) = seen.first() else {
        // hyper refused (or never finished) a head the lean path took.
        panic!("hyper refused a head the lean path served: {:?}", String::from_utf8_lossy(&data[..len]));
    };
    assert_eq!(*body, body_len, "hyper read a body of another length");
    assert_eq!(hyper.method, lean.method);
    assert_eq!(hyper.uri, lean.uri);
    assert_eq!(hyper.headers, lean.headers);
    if !close {
        assert_eq!(seen.len(), 2, "the next request did not start where the lean head ended");
        assert_eq!(seen[1].0.uri, "/marker");
    }
});

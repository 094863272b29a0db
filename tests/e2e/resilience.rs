//! Istio's resilience fields end to end: a gateway in front of scripted
//! backends on 127.0.0.1, each field proven by what a client sees and what
//! the backends received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::harness::*;

/// What a scripted backend answers: status and how long it waits first.
#[derive(Clone, Copy)]
struct Answer {
    status: u16,
    delay: Duration,
    /// One more response header.
    header: Option<(&'static str, &'static str)>,
}

fn ok() -> Answer {
    Answer {
        status: 200,
        delay: Duration::ZERO,
        header: None,
    }
}

fn status(s: u16) -> Answer {
    Answer {
        status: s,
        delay: Duration::ZERO,
        header: None,
    }
}

fn hang() -> Answer {
    Answer {
        status: 200,
        delay: Duration::from_secs(30),
        header: None,
    }
}

/// A backend whose answer to its n-th request (from 0) is `f(n)`; it
/// records the Host of every request.
struct Scripted {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    hosts: Arc<Mutex<Vec<String>>>,
    /// Connections accepted, and the HTTP version of every request.
    conns: Arc<AtomicU64>,
    versions: Arc<Mutex<Vec<http::Version>>>,
}

async fn scripted<F>(name: &str, f: F) -> Scripted
where
    F: Fn(u64) -> Answer + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicU64::new(0));
    let versions = Arc::new(Mutex::new(Vec::new()));
    let (cs, vs) = (conns.clone(), versions.clone());
    let f = Arc::new(f);
    let name: Arc<str> = Arc::from(name);
    let (h, hs) = (hits.clone(), hosts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            cs.fetch_add(1, Ordering::SeqCst);
            let vs = vs.clone();
            let (f, name, hits, hosts) = (f.clone(), name.clone(), h.clone(), hs.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (f, name, hits, hosts) =
                            (f.clone(), name.clone(), hits.clone(), hosts.clone());
                        vs.lock().expect("lock").push(req.version());
                        async move {
                            let n = hits.fetch_add(1, Ordering::SeqCst);
                            // HTTP/2 carries it as :authority.
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|v| v.to_str().ok())
                                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                                .unwrap_or("")
                                .to_string();
                            hosts.lock().expect("lock").push(host);
                            let a = f(n);
                            let _ = req.into_body().collect().await;
                            if !a.delay.is_zero() {
                                tokio::time::sleep(a.delay).await;
                            }
                            let body = format!("{{\"backend\":\"{name}\",\"n\":{n}}}");
                            let resp = http::Response::builder()
                                .status(a.status)
                                .header("x-backend", &*name)
                                .header("x-b", "exposed");
                            let resp = match a.header {
                                Some((k, v)) => resp.header(k, v),
                                None => resp,
                            }
                            .body(Full::new(Bytes::from(body)))
                            .expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Scripted {
        addr,
        hits,
        hosts,
        conns,
        versions,
    }
}

/// A gateway on `port`; service `site.web` (HTTP port 80) with STATIC
/// endpoints (address, locality); `http` is the VirtualService's `http:`
/// list; `policy` (if any) the DestinationRule's `trafficPolicy`, both
/// already indented.
fn mesh(port: u16, eps: &[(SocketAddr, &str)], http: &str, policy: &str) -> String {
    let mut y = gateway("web", port);
    y.push_str(&site("site", eps));
    y.push_str(&routes(http));
    if !policy.is_empty() {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: site, namespace: web}}\nspec:\n  host: site\n  trafficPolicy:\n{policy}---\n"
        ));
    }
    y
}

/// The gateway's VirtualService: every host, the `http:` list given
/// (already indented).
fn routes(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: site, namespace: web}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n{http}---\n"
    )
}

/// A STATIC ServiceEntry `name.web.svc.cluster.local` (HTTP port 80).
fn site(name: &str, eps: &[(SocketAddr, &str)]) -> String {
    site_with(name, "HTTP", eps)
}

/// As `site`, with the port's protocol (HTTP, HTTP2, GRPC).
fn site_with(name: &str, protocol: &str, eps: &[(SocketAddr, &str)]) -> String {
    let mut s = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: web}}\nspec:\n  hosts: [{name}.web.svc.cluster.local]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: {protocol}}}]\n  endpoints:\n"
    );
    for (a, locality) in eps {
        s.push_str(&format!(
            "  - address: {}\n    ports: {{http: {}}}\n    labels: {{app: {name}}}\n",
            a.ip(),
            a.port()
        ));
        if !locality.is_empty() {
            s.push_str(&format!("    locality: {locality}\n"));
        }
    }
    s.push_str("---\n");
    s
}

const ROUTE: &str = "    route: [{destination: {host: site}}]\n";

fn flags(r: &Reply) -> String {
    r.headers
        .get("x-bosun-response-flags")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_never_answers_is_a_504_ut_at_the_route_timeout() {
    let be = scripted("slow", |_| hang()).await;
    let port = free_port();
    let http = format!("  - timeout: 500ms\n{ROUTE}");
    let _b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, "")).await;
    let c = client();
    let t = Instant::now();
    let r = get(&c, &format!("http://127.0.0.1:{port}/"), "site").await;
    let took = t.elapsed();
    assert_eq!((r.status, flags(&r).as_str()), (504, "UT"), "{}", r.body);
    assert_eq!(r.body, "upstream request timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_hide_a_backend_that_fails_every_other_request() {
    let be = scripted("flaky", |n| if n % 2 == 1 { status(503) } else { ok() }).await;
    let port = free_port();
    let http = format!(
        "  - match: [{{uri: {{prefix: /once}}}}]\n    retries: {{attempts: 0}}\n{ROUTE}  - retries: {{attempts: 2, retryOn: 5xx}}\n{ROUTE}"
    );
    let _b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, "")).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    // Without retries the client sees every other failure ...
    let mut failed = 0;
    for _ in 0..40 {
        if get(&c, &format!("{base}/once"), "site").await.status != 200 {
            failed += 1;
        }
    }
    assert!((15..=25).contains(&failed), "{failed} of 40 failed");
    // ... with them, none.
    for i in 0..200 {
        let r = get(&c, &format!("{base}/"), "site").await;
        assert_eq!(r.status, 200, "request {i}: {} {}", flags(&r), r.body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_try_timeout_retries_a_hung_try_and_exhaustion_is_ut_urx() {
    // Every even try hangs; the odd ones answer at once.
    let be = scripted("half-hung", |n| if n % 2 == 0 { hang() } else { ok() }).await;
    let dead = scripted("hung", |_| hang()).await;
    let port = free_port();
    let mut y = mesh(
        port,
        &[(be.addr, "")],
        &format!(
            "  - match: [{{uri: {{prefix: /dead}}}}]\n    timeout: 10s\n    retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: reset}}\n    route: [{{destination: {{host: dead}}}}]\n  - timeout: 10s\n    retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}}\n{ROUTE}"
        ),
        "",
    );
    y.push_str(&site("dead", &[(dead.addr, "")]));
    let _b = Bosun::gateway(&y).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..3 {
        let t = Instant::now();
        let r = get(&c, &format!("{base}/"), "site").await;
        assert_eq!(r.status, 200, "{} {}", flags(&r), r.body);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    assert_eq!(
        be.hits.load(Ordering::SeqCst),
        6,
        "one hung try and one good per request"
    );
    // Every try hangs: three tries of 200 ms, then 504 with UT and URX.
    let t = Instant::now();
    let r = get(&c, &format!("{base}/dead"), "site").await;
    let took = t.elapsed();
    assert_eq!(
        (r.status, flags(&r).as_str()),
        (504, "UT,URX"),
        "{}",
        r.body
    );
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(dead.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_holds_retries_back_under_load() {
    let be = scripted("down", |_| Answer {
        status: 503,
        delay: Duration::from_millis(50),
        header: None,
    })
    .await;
    let port = free_port();
    let http = format!("  - retries: {{attempts: 5, retryOn: 5xx}}\n{ROUTE}");
    let policy = "    connectionPool: {http: {maxRetries: 1}}\n";
    let b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, policy)).await;
    let base = format!("http://127.0.0.1:{port}/");
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            get(&c, &base, "site").await.status
        }));
    }
    for t in tasks {
        // The upstream's own 503 passes through, retried or not.
        assert_eq!(t.await.expect("task"), 503);
    }
    // Flags of upstream responses are in metrics and the access log.
    let m = b.metrics().await;
    let overflowed = metric_sum(&m, "istio_requests_total", &["response_flags=\"UO\""]);
    let exhausted = metric_sum(&m, "istio_requests_total", &["response_flags=\"URX\""]);
    assert!(overflowed >= 10.0, "budget overflow (UO): {m}");
    assert_eq!(overflowed + exhausted, 30.0, "{m}");
    let hits = be.hits.load(Ordering::SeqCst);
    // Unbounded, 30 requests with 5 retries each would be 180 tries.
    assert!(hits < 90, "{hits} tries reached the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_abort_at_50_percent_and_fault_delay() {
    let be = scripted("ok", |_| ok()).await;
    let port = free_port();
    let http = format!(
        "  - match: [{{uri: {{prefix: /slow}}}}]\n    fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}\n{ROUTE}  - fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}\n{ROUTE}"
    );
    let b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, "")).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let mut aborted = 0u64;
    for _ in 0..2000 {
        let r = get(&c, &format!("{base}/"), "site").await;
        match r.status {
            503 => {
                assert_eq!(flags(&r), "FI");
                assert_eq!(r.body, "fault filter abort");
                aborted += 1;
            }
            200 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!((900..=1100).contains(&aborted), "{aborted} of 2000 aborted");
    assert_eq!(be.hits.load(Ordering::SeqCst), 2000 - aborted);
    let t = Instant::now();
    let r = get(&c, &format!("{base}/slow"), "site").await;
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
    let m = b.metrics().await;
    assert!(
        metric_sum(&m, "istio_requests_total", &["response_flags=\"DI\""]) >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "istio_requests_total", &["response_flags=\"FI\""]) >= 900.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_abort_is_a_trailers_only_grpc_status() {
    let be = scripted("ok", |_| ok()).await;
    let port = free_port();
    let http = format!(
        "  - fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}\n{ROUTE}"
    );
    let _b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, "")).await;
    let c = client();
    let r = request(
        &c,
        "POST",
        &format!("http://127.0.0.1:{port}/pkg.Svc/Call"),
        "site",
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "14");
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(flags(&r), "FI");
    assert_eq!(be.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_mirror_never_slows_the_primary_and_a_healthy_one_gets_every_request() {
    let primary = scripted("primary", |_| ok()).await;
    let hung = scripted("hung-mirror", |_| hang()).await;
    let healthy = scripted("mirror", |_| ok()).await;
    let port = free_port();
    let config = |mirror: &str| {
        let mut y = mesh(
            port,
            &[(primary.addr, "")],
            &format!("  - mirror: {{host: {mirror}}}\n{ROUTE}"),
            "",
        );
        y.push_str(&site("hung", &[(hung.addr, "")]));
        y.push_str(&site("shadow", &[(healthy.addr, "")]));
        y
    };
    let b = Bosun::gateway(&config("hung")).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..50 {
        let t = Instant::now();
        let r = get(&c, &url, "site:8080").await;
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    eventually("the hung mirror got copies", || async {
        hung.hits.load(Ordering::SeqCst) > 0
    })
    .await;
    b.reconfigure(&config("shadow")).await;
    for _ in 0..50 {
        assert_eq!(get(&c, &url, "site:8080").await.status, 200);
    }
    eventually("the mirror got all 50", || async {
        healthy.hits.load(Ordering::SeqCst) == 50
    })
    .await;
    let hosts = healthy.hosts.lock().expect("lock").clone();
    assert!(hosts.iter().all(|h| h == "site-shadow:8080"), "{hosts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_pool_overflow_is_an_immediate_503_uo() {
    let be = scripted("busy", |_| Answer {
        status: 200,
        delay: Duration::from_millis(800),
        header: None,
    })
    .await;
    let port = free_port();
    let policy = "    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1}\n";
    let _b = Bosun::gateway(&mesh(port, &[(be.addr, "")], ROUTE_ONLY, policy)).await;
    let url = format!("http://127.0.0.1:{port}/");
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = get(&client(), &url, "site").await;
            let overloaded = r.headers.contains_key("x-envoy-overloaded");
            (r.status, flags(&r), t.elapsed(), overloaded)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    let served = out.iter().filter(|o| o.0 == 200).count();
    let overflow: Vec<_> = out.iter().filter(|o| o.0 == 503).collect();
    assert_eq!(served, 2, "one in flight and one pending: {out:?}");
    assert_eq!(overflow.len(), 3, "{out:?}");
    for (_, f, took, overloaded) in overflow {
        assert_eq!(f, "UO");
        assert!(*overloaded);
        assert!(
            *took < Duration::from_millis(500),
            "not immediate: {took:?}"
        );
    }
}

const ROUTE_ONLY: &str = "  - route: [{destination: {host: site}}]\n";

#[tokio::test(flavor = "multi_thread")]
async fn outlier_detection_ejects_a_failing_backend_and_brings_it_back() {
    let good = scripted("good", |_| ok()).await;
    let bad = scripted("bad", |_| status(500)).await;
    let port = free_port();
    let http = format!("  - retries: {{attempts: 0}}\n{ROUTE}");
    let policy = "    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}\n";
    let b = Bosun::gateway(&mesh(
        port,
        &[(good.addr, ""), (bad.addr, "")],
        &http,
        policy,
    ))
    .await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let mut failures = 0;
    for _ in 0..30 {
        if get(&c, &url, "site").await.status == 500 {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "ejected after two consecutive 500s");
    // /config_dump shows the policy as the proxy applies it.
    let (code, dump) = admin_get(b.admin, "/config_dump")
        .await
        .expect("config_dump");
    assert_eq!(code, 200);
    assert!(
        dump.contains("\"outlier_detection\"") && dump.contains("\"base_ejection_time_ms\""),
        "{dump}"
    );
    assert_eq!(bad.hits.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for _ in 0..10 {
        get(&c, &url, "site").await;
    }
    assert!(
        bad.hits.load(Ordering::SeqCst) > 2,
        "back after baseEjectionTime"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn locality_failover_moves_to_the_next_zone_and_back() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let local = scripted("local", move |_| {
        if f.load(Ordering::SeqCst) {
            status(503)
        } else {
            ok()
        }
    })
    .await;
    let remote = scripted("remote", |_| ok()).await;
    let port = free_port();
    let http = format!("  - retries: {{attempts: 0}}\n{ROUTE}");
    let policy = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100}\n";
    let y = mesh(
        port,
        &[
            (local.addr, "us-east/zone-a/1"),
            (remote.addr, "us-east/zone-b/1"),
        ],
        &http,
        policy,
    );
    let _b = Bosun::start(
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.1",
            "--locality",
            "us-east/zone-a/1",
        ],
        &y,
    )
    .await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let who = |r: &Reply| {
        r.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    for _ in 0..20 {
        assert_eq!(who(&get(&c, &url, "site").await), "local");
    }
    failing.store(true, Ordering::SeqCst);
    let r = get(&c, &url, "site").await;
    assert_eq!(r.status, 503, "the local zone fails once and is ejected");
    for _ in 0..20 {
        let r = get(&c, &url, "site").await;
        assert_eq!((r.status, who(&r).as_str()), (200, "remote"));
    }
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for _ in 0..20 {
        assert_eq!(who(&get(&c, &url, "site").await), "local");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dns_service_entry_reaches_localhost() {
    let be = scripted("dns", |_| ok()).await;
    let port = free_port();
    let bp = be.addr.port();
    let mut y = gateway("web", port);
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: local, namespace: web}}\nspec:\n  hosts: [localhost]\n  resolution: DNS\n  ports: [{{number: {bp}, name: http, protocol: HTTP}}]\n---\n"
    ));
    y.push_str(&routes("  - route: [{destination: {host: localhost}}]\n"));
    let _b = Bosun::gateway(&y).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    eventually("localhost resolved and reached", || async {
        get(&c, &url, "site").await.status == 200
    })
    .await;
    let hosts = be.hosts.lock().expect("lock").clone();
    assert!(hosts.iter().all(|h| h == "site"), "{hosts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_is_answered_and_responses_carry_the_origin() {
    let be = scripted("app", |_| ok()).await;
    let port = free_port();
    let http = format!(
        "  - match: [{{uri: {{prefix: /ignore}}}}]\n    corsPolicy:\n      allowOrigins: [{{prefix: \"https://ok.\"}}]\n      allowMethods: [\"*\"]\n      unmatchedPreflights: IGNORE\n{ROUTE}  - corsPolicy:\n      allowOrigins: [{{exact: \"https://ok.example\"}}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-a]\n      exposeHeaders: [x-b]\n      maxAge: 24h\n      allowCredentials: true\n{ROUTE}"
    );
    let _b = Bosun::gateway(&mesh(port, &[(be.addr, "")], &http, "")).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/api");
    let pre = |origin: &'static str| {
        vec![
            ("origin", origin),
            ("access-control-request-method", "POST"),
        ]
    };
    let r = request(&c, "OPTIONS", &url, "site", &pre("https://ok.example")).await;
    assert_eq!(r.status, 200);
    let h = |r: &Reply, n: &str| {
        r.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(h(&r, "access-control-allow-origin"), "https://ok.example");
    assert_eq!(h(&r, "access-control-allow-methods"), "GET,POST");
    assert_eq!(h(&r, "access-control-allow-headers"), "x-a");
    assert_eq!(h(&r, "access-control-max-age"), "86400");
    assert_eq!(h(&r, "access-control-allow-credentials"), "true");
    assert_eq!(be.hits.load(Ordering::SeqCst), 0, "answered by the proxy");
    // Another origin's preflight goes upstream (unmatchedPreflights FORWARD).
    let r = request(&c, "OPTIONS", &url, "site", &pre("https://evil.example")).await;
    assert_eq!(h(&r, "x-backend"), "app");
    assert_eq!(h(&r, "access-control-allow-origin"), "");
    // A request from the allowed origin gets the CORS response headers.
    let r = request(&c, "GET", &url, "site", &[("origin", "https://ok.example")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(h(&r, "access-control-allow-origin"), "https://ok.example");
    assert_eq!(h(&r, "access-control-expose-headers"), "x-b");
    let r = request(
        &c,
        "GET",
        &url,
        "site",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(h(&r, "access-control-allow-origin"), "");
    // unmatchedPreflights IGNORE: answered here, without Allow-Origin; a
    // prefix match and `*` methods (the asked method echoed).
    let hits = be.hits.load(Ordering::SeqCst);
    let ignore = format!("http://127.0.0.1:{port}/ignore");
    let r = request(&c, "OPTIONS", &ignore, "site", &pre("https://evil.example")).await;
    assert_eq!((r.status, h(&r, "x-backend").as_str()), (200, ""));
    assert_eq!(h(&r, "access-control-allow-origin"), "");
    let r = request(&c, "OPTIONS", &ignore, "site", &pre("https://ok.other")).await;
    assert_eq!(h(&r, "access-control-allow-origin"), "https://ok.other");
    assert_eq!(h(&r, "access-control-allow-methods"), "POST");
    assert_eq!(
        be.hits.load(Ordering::SeqCst),
        hits,
        "neither went upstream"
    );
}

const BOOKINFO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/control/tests/data/bookinfo");

/// bookinfo.yaml's Services (its Deployments and ServiceAccounts are not
/// mesh config; Bosun refuses kinds it does not read).
fn bookinfo_services() -> String {
    let all = std::fs::read_to_string(format!("{BOOKINFO}/bookinfo.yaml")).expect("bookinfo.yaml");
    all.split("\n---")
        .filter(|d| d.lines().any(|l| l.trim() == "kind: Service"))
        .map(|d| format!("{}\n---\n", d.trim_start_matches('\n')))
        .collect()
}

fn validate_dir(files: &[(&str, String)]) -> (bool, String) {
    let dir = TempDir::new("bookinfo");
    for (name, text) in files {
        std::fs::write(dir.0.join(name), text).expect("write");
    }
    validate(&dir.0)
}

#[test]
fn istio_bookinfo_samples_validate_with_bookinfo_services() {
    let services = bookinfo_services();
    assert!(services.matches("kind: Service").count() >= 4, "{services}");
    let rules = std::fs::read_to_string(format!("{BOOKINFO}/destination-rule-all.yaml"))
        .expect("destination rules");
    let mut checked = 0;
    for entry in std::fs::read_dir(BOOKINFO).expect("bookinfo dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if !name.ends_with(".yaml") || name == "bookinfo.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read sample");
        let mut files = vec![
            ("services.yaml", services.clone()),
            ("sample.yaml", text.clone()),
        ];
        if !text.contains("kind: DestinationRule") && !text.contains("kind: Gateway") {
            files.push(("rules.yaml", rules.clone()));
        }
        let (ok, out) = validate_dir(&files);
        match name.as_str() {
            // The cert-manager sample routes to a host bookinfo does not
            // define. (The mTLS and TLS-origination samples validate.)
            "certmanager-gateway.yaml" => {
                assert!(
                    !ok && out.contains("cert-manager-resolver"),
                    "{name}: {out}"
                );
            }
            _ => {
                assert!(ok, "{name} should validate: {out}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 15, "{checked} samples validated");
}

#[tokio::test(flavor = "multi_thread")]
async fn bookinfo_ratings_test_abort_applies() {
    let be = scripted("ratings-v1", |_| ok()).await;
    let port = free_port();
    let mut y = bookinfo_services();
    y.push_str(
        &std::fs::read_to_string(format!("{BOOKINFO}/destination-rule-all.yaml")).expect("rules"),
    );
    y.push_str("\n---\n");
    y.push_str(
        &std::fs::read_to_string(format!(
            "{BOOKINFO}/virtual-service-ratings-test-abort.yaml"
        ))
        .expect("sample"),
    );
    y.push_str(&format!(
        "\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ratings-x, namespace: default, labels: {{kubernetes.io/service-name: ratings}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [127.0.0.1]\n  targetRef: {{kind: Pod, name: ratings-v1-a, namespace: default}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: ratings-v1-a, namespace: default, labels: {{app: ratings, version: v1}}}}\nspec: {{containers: [{{name: app, image: ratings:1}}]}}\n",
        be.addr.port()
    ));
    let outbound = format!("127.0.0.1:{port}");
    let _b = Bosun::start(&["--outbound-address", &outbound], &y).await;
    let c = client();
    let url = format!("http://{outbound}/ratings/0");
    let r = request(&c, "GET", &url, "ratings:9080", &[("end-user", "jason")]).await;
    assert_eq!((r.status, flags(&r).as_str()), (500, "FI"), "{}", r.body);
    let r = get(&c, &url, "ratings:9080").await;
    assert_eq!(
        (r.status, r.headers["x-backend"].to_str().ok()),
        (200, Some("ratings-v1"))
    );
    assert_eq!(be.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_pool_retires_connections_and_upgrades_to_h2() {
    let per_conn = scripted("per-conn", |_| ok()).await;
    let aged = scripted("aged", |_| ok()).await;
    let idle = scripted("idle", |_| ok()).await;
    let h2 = scripted("h2", |_| ok()).await;
    let port = free_port();
    let mut y = gateway("web", port);
    for (name, be) in [("a", &per_conn), ("b", &aged), ("c", &idle), ("d", &h2)] {
        y.push_str(&site(name, &[(be.addr, "")]));
    }
    let mut http: String = ["a", "b", "c"]
        .iter()
        .map(|p| {
            format!("  - match: [{{uri: {{prefix: /{p}}}}}]\n    route: [{{destination: {{host: {p}}}}}]\n")
        })
        .collect();
    http.push_str("  - route: [{destination: {host: d}}]\n");
    y.push_str(&routes(&http));
    for (host, policy) in [
        ("a", "{http: {maxRequestsPerConnection: 2}}"),
        ("b", "{tcp: {maxConnectionDuration: 300ms}}"),
        (
            "c",
            "{http: {idleTimeout: 200ms}, tcp: {tcpKeepalive: {time: 30s, interval: 5s, probes: 3}}}",
        ),
        ("d", "{http: {h2UpgradePolicy: UPGRADE}}"),
    ] {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: web}}\nspec:\n  host: {host}\n  trafficPolicy:\n    connectionPool: {policy}\n---\n"
        ));
    }
    // One worker: upstream pools are per worker, and a client that opens a
    // second connection to the gateway (its first not yet back in its own
    // pool, as happens under load) could land on another worker and so on
    // another pool, making the counts below the workers' doing.
    let _b = Bosun::start(
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.1",
            "--workers",
            "1",
        ],
        &y,
    )
    .await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    // maxRequestsPerConnection 2: six requests, three connections.
    for _ in 0..6 {
        assert_eq!(get(&c, &format!("{base}/a"), "site").await.status, 200);
    }
    assert_eq!(per_conn.conns.load(Ordering::SeqCst), 3);
    // maxConnectionDuration 300 ms: a connection older than that is not reused.
    for _ in 0..3 {
        assert_eq!(get(&c, &format!("{base}/b"), "site").await.status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(aged.conns.load(Ordering::SeqCst), 3);
    // idleTimeout 200 ms: back to back they reuse one; after 300 ms idle, a new one.
    for _ in 0..3 {
        assert_eq!(get(&c, &format!("{base}/c"), "site").await.status, 200);
    }
    assert_eq!(idle.conns.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&c, &format!("{base}/c"), "site").await.status, 200);
    assert_eq!(idle.conns.load(Ordering::SeqCst), 2);
    // h2UpgradePolicy UPGRADE: an HTTP port spoken to as h2c.
    for _ in 0..3 {
        assert_eq!(get(&c, &format!("{base}/"), "site").await.status, 200);
    }
    let v = h2.versions.lock().expect("lock").clone();
    assert!(v.iter().all(|v| *v == http::Version::HTTP_2), "{v:?}");
    assert_eq!(h2.conns.load(Ordering::SeqCst), 1);
    // The Host is the h2 :authority, not the endpoint's address.
    let hosts = h2.hosts.lock().expect("lock").clone();
    assert!(hosts.iter().all(|h| h == "site"), "{hosts:?}");
}

/// A network namespace of its own (loopback only) whose `/etc/hosts` the
/// test writes (`ip netns exec` mounts `/etc/netns/NAME/hosts` over it),
/// with processes; all removed on drop.
struct HostsNs {
    name: String,
    hosts: std::path::PathBuf,
    procs: Vec<std::process::Child>,
}

impl HostsNs {
    fn new() -> HostsNs {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "bosun-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        run(&["netns", "add", &name]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        let dir = std::path::PathBuf::from(format!("/etc/netns/{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns/NAME");
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
        HostsNs {
            name,
            hosts,
            procs: Vec::new(),
        }
    }

    /// Rewrites the namespace's `/etc/hosts` in place (same file, so the
    /// mount over `/etc/hosts` shows the new text).
    fn set_hosts(&self, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.hosts)
            .expect("open hosts");
        f.write_all(text.as_bytes()).expect("write hosts");
    }

    fn spawn(&mut self, args: &[&str]) {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn in netns");
        self.procs.push(child);
    }

    fn curl(&self, url: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "curl", "-s", "--max-time", "5"])
            .args(["-H", "Host: site", url])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for HostsNs {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if let Some(dir) = self.hosts.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `resolution: DNS` follows the name: a changed answer moves traffic, a
/// failed lookup keeps the last good address (and is counted).
#[test]
fn a_dns_endpoint_follows_its_name_and_keeps_the_last_good_address() {
    let mut ns = HostsNs::new();
    ns.set_hosts("127.0.0.1 localhost\n127.0.0.11 svc.test\n");
    let bosun = env!("CARGO_BIN_EXE_bosun");
    ns.spawn(&[
        bosun,
        "echo",
        "--listen",
        "127.0.0.11:8080",
        "--name",
        "first",
    ]);
    ns.spawn(&[
        bosun,
        "echo",
        "--listen",
        "127.0.0.12:8080",
        "--name",
        "second",
    ]);
    let dir = TempDir::new("dns-ns");
    let mut y = gateway("web", 18500);
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: svc, namespace: web}\nspec:\n  hosts: [svc.test]\n  resolution: DNS\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n---\n",
    );
    y.push_str(&routes("  - route: [{destination: {host: svc.test}}]\n"));
    std::fs::write(dir.0.join("mesh.yaml"), y).expect("config");
    let cfg = dir.0.to_str().expect("utf8").to_string();
    ns.spawn(&[
        bosun,
        "proxy",
        "--mode",
        "gateway",
        "--gateway-address",
        "127.0.0.1",
        "--admin-address",
        "127.0.0.1:15000",
        "--config",
        &cfg,
        "--dns-refresh-rate",
        "300ms",
    ]);
    let url = "http://127.0.0.1:18500/";
    let until = |want: &str| {
        let by = Instant::now() + Duration::from_secs(10);
        loop {
            let got = ns.curl(url);
            if got.starts_with(want) {
                return;
            }
            assert!(Instant::now() < by, "wanted {want:?}, got {got:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until("first");
    ns.set_hosts("127.0.0.1 localhost\n127.0.0.12 svc.test\n");
    until("second");
    // The name is gone: lookups fail, the last good address keeps serving.
    ns.set_hosts("127.0.0.1 localhost\n");
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..5 {
        assert!(ns.curl(url).starts_with("second"));
    }
    let metrics = ns.curl("http://127.0.0.1:15000/stats/prometheus");
    let failures: f64 = metrics
        .lines()
        .find(|l| l.starts_with("bosun_dns_failures_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{metrics}");
}

fn with_header(status: u16, header: (&'static str, &'static str)) -> Answer {
    Answer {
        status,
        delay: Duration::ZERO,
        header: Some(header),
    }
}

/// retryOn conditions beyond 5xx: a status code, retriable-4xx (409), a
/// gRPC status in a trailers-only head, and a response header the client
/// named; each against a backend failing that way every other time.
#[tokio::test(flavor = "multi_thread")]
async fn retry_on_codes_4xx_grpc_status_and_named_headers() {
    let code = scripted("code", |n| if n % 2 == 0 { status(418) } else { ok() }).await;
    let conflict = scripted("conflict", |n| if n % 2 == 0 { status(409) } else { ok() }).await;
    let grpc = scripted("grpc", |n| {
        if n % 2 == 0 {
            with_header(200, ("grpc-status", "14"))
        } else {
            with_header(200, ("grpc-status", "0"))
        }
    })
    .await;
    let named = scripted("named", |n| {
        if n % 2 == 0 {
            with_header(200, ("x-try-again", "1"))
        } else {
            ok()
        }
    })
    .await;
    let port = free_port();
    let mut y = gateway("web", port);
    for (name, be) in [("a", &code), ("b", &conflict), ("c", &grpc), ("d", &named)] {
        y.push_str(&site(name, &[(be.addr, "")]));
    }
    let http: String = [
        ("a", "\"418\""),
        ("b", "retriable-4xx"),
        ("c", "unavailable"),
        ("d", "retriable-headers"),
    ]
    .iter()
    .map(|(p, on)| {
        format!("  - match: [{{uri: {{prefix: /{p}}}}}]\n    retries: {{attempts: 1, retryOn: {on}}}\n    route: [{{destination: {{host: {p}}}}}]\n")
    })
    .collect();
    y.push_str(&routes(&http));
    let _b = Bosun::gateway(&y).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..10 {
        let r = get(&c, &format!("{base}/a"), "site").await;
        assert_eq!(r.status, 200);
        let r = get(&c, &format!("{base}/b"), "site").await;
        assert_eq!(r.status, 200);
        let r = request(
            &c,
            "POST",
            &format!("{base}/c"),
            "site",
            &[("content-type", "application/grpc")],
        )
        .await;
        assert_eq!(r.headers["grpc-status"], "0");
        let r = request(
            &c,
            "GET",
            &format!("{base}/d"),
            "site",
            &[("x-envoy-retriable-header-names", "x-try-again")],
        )
        .await;
        assert!(!r.headers.contains_key("x-try-again"));
    }
    for be in [&code, &conflict, &grpc, &named] {
        assert_eq!(
            be.hits.load(Ordering::SeqCst),
            20,
            "every request tried twice"
        );
    }
    // Without the header naming it, a response header is not a reason to retry.
    let r = get(&c, &format!("{base}/d"), "site").await;
    assert_eq!(
        r.headers.get("x-try-again").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
}

/// A client that sends part of a body and waits for the answer before it
/// ends, as a gRPC stream does, is not held back by Istio's default retry
/// policy keeping bodies: the stream flows, the upstream's answer comes back.
#[tokio::test(flavor = "multi_thread")]
async fn retries_never_hold_back_an_http2_stream_still_being_sent() {
    // Answers at once, before reading the body.
    let up = h2_trickle(vec![(Duration::ZERO, b"early")]).await;
    let port = free_port();
    let mut y = gateway("web", port);
    y.push_str(&site_with("grpc", "GRPC", &[(up, "")]));
    y.push_str(&routes("  - route: [{destination: {host: grpc}}]\n"));
    let _b = Bosun::gateway(&y).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(4);
    body_tx
        .send(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"first message",
        ))))
        .await
        .expect("send");
    let body =
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body_rx));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://site:{port}/pkg.Svc/Stream"))
        .header("content-type", "application/grpc")
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(3), tx.send_request(req))
        .await
        .expect("answered while the request stream is still open")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&got[..], b"early");
    drop(body_tx);
}

/// The route timeout covers the whole response, as Envoy's does: a body
/// still trickling in when it expires is cut (`UT` in the metrics).
#[tokio::test(flavor = "multi_thread")]
async fn the_route_timeout_cuts_a_response_body_still_coming() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if s.write_all(b"1\r\nx\r\n").await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    let port = free_port();
    let http = format!("  - timeout: 500ms\n{ROUTE}");
    let b = Bosun::gateway(&mesh(port, &[(up, "")], &http, "")).await;
    let t = Instant::now();
    let r = get(&client(), &format!("http://127.0.0.1:{port}/"), "site").await;
    let took = t.elapsed();
    assert_eq!(r.status, 200, "the head came in time");
    assert!(r.body.len() < 20, "the body was cut: {:?}", r.body);
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let m = b.metrics().await;
    assert!(
        metric_sum(&m, "istio_requests_total", &["response_flags=\"UT\""]) >= 1.0,
        "{m}"
    );
}

/// The same over HTTP/2 to the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn the_route_timeout_cuts_an_http2_response_body_still_coming() {
    let up = h2_trickle(vec![(Duration::from_millis(100), b"x"); 20]).await;
    let port = free_port();
    let mut y = gateway("web", port);
    y.push_str(&site_with("slow", "HTTP2", &[(up, "")]));
    y.push_str(&routes(
        "  - timeout: 500ms\n    route: [{destination: {host: slow}}]\n",
    ));
    let b = Bosun::gateway(&y).await;
    let t = Instant::now();
    let r = get(&client(), &format!("http://127.0.0.1:{port}/"), "site").await;
    let took = t.elapsed();
    assert_eq!(r.status, 200, "the head came in time");
    assert!(r.body.len() < 20, "the body was cut: {:?}", r.body);
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let m = b.metrics().await;
    assert!(
        metric_sum(&m, "istio_requests_total", &["response_flags=\"UT\""]) >= 1.0,
        "{m}"
    );
}

/// An h2c upstream that answers every request at once, then sends its body
/// as these frames, each after its wait (without reading the request body).
async fn h2_trickle(frames: Vec<(Duration, &'static [u8])>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let frames = frames.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let frames = frames.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel::<
                            Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
                        >(1);
                        tokio::spawn(async move {
                            for (wait, data) in frames {
                                tokio::time::sleep(wait).await;
                                let frame = hyper::body::Frame::data(Bytes::from_static(data));
                                if tx.send(Ok(frame)).await.is_err() {
                                    return;
                                }
                            }
                        });
                        let body = http_body_util::StreamBody::new(
                            tokio_stream::wrappers::ReceiverStream::new(rx),
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    up
}

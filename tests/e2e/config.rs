//! Config handling end to end: refused configs keep the old one serving,
//! gateway mode on a plain upstream, sidecar mode with Kubernetes objects.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// The gateway of `gateway_to`, with `extra_route_field` appended to its route.
fn simple(port: u16, be: std::net::SocketAddr, extra_route_field: &str) -> String {
    format!("{}{extra_route_field}", gateway_to(port, be))
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_routes_to_a_plain_upstream_with_curl() {
    // Gateway + VirtualService + ServiceEntry (STATIC) in a directory, curl as the client.
    let be = backend("plain").await;
    let port = free_port();
    let _bosun = Bosun::gateway(&simple(port, be.addr, "")).await;
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Host: www.example.com",
            &format!("http://127.0.0.1:{port}/index.html"),
        ])
        .output()
        .expect("curl");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["backend"], "plain");
    assert_eq!(j["path"], "/index.html");
    assert_eq!(j["headers"]["host"], "www.example.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_is_refused_and_the_old_one_keeps_serving() {
    let be = backend("good").await;
    let port = free_port();
    let bosun = Bosun::gateway(&simple(port, be.addr, "")).await;
    let good_version = bosun.version().await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");

    // 1. A field Bosun does not implement yet.
    bosun.write_config(&simple(port, be.addr, "    mirrorPercent: 5\n"));
    // 2. Then a config that parses but routes to an undefined subset.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let log = bosun.log_text();
    assert!(log.contains("mesh.yaml"), "file named: {log}");
    assert!(
        log.contains("VirtualService/web/site"),
        "resource named: {log}"
    );
    assert!(
        log.contains("spec.http[0].mirrorPercent"),
        "field named: {log}"
    );
    assert_eq!(get(&c, &url, "x").await.backend(), "good");
    assert_eq!(bosun.version().await, good_version);

    let bad_subset = simple(port, be.addr, "").replace("{host: site}", "{host: site, subset: v9}");
    bosun.write_config(&bad_subset);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        bosun.log_text().contains("subset v9"),
        "{}",
        bosun.log_text()
    );
    assert_eq!(get(&c, &url, "x").await.backend(), "good");
    assert_eq!(bosun.version().await, good_version);
    let m = bosun.metrics().await;
    assert!(
        metric_sum(&m, "bosun_config_rejected_total", &[]) >= 2.0,
        "{m}"
    );

    // A good config is taken again within a second.
    let be2 = backend("new").await;
    let t = std::time::Instant::now();
    bosun.reconfigure(&simple(port, be2.addr, "")).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "applied in {:?}",
        t.elapsed()
    );
    assert_eq!(get(&c, &url, "x").await.backend(), "new");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_directory_moved_away_and_back_is_watched_again() {
    let be = backend("first").await;
    let port = free_port();
    let bosun = Bosun::gateway(&simple(port, be.addr, "")).await;
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let dir = bosun.config_dir();
    let away = dir.with_file_name("config.away");

    // Gone: refused (nothing to read); the last good config keeps serving.
    std::fs::rename(&dir, &away).expect("move away");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        bosun.log_text().contains("no config files"),
        "{}",
        bosun.log_text()
    );
    assert_eq!(get(&c, &url, "x").await.backend(), "first");

    // Back (looked for every second), and watched again: the next change is
    // an event, applied at once, not at the 10 s rescan.
    std::fs::rename(&away, &dir).expect("move back");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let be2 = backend("second").await;
    bosun.reconfigure(&simple(port, be2.addr, "")).await;
    assert_eq!(get(&c, &url, "x").await.backend(), "second");
    assert!(
        bosun.log_text().contains("config directory watched again"),
        "{}",
        bosun.log_text()
    );
}

#[test]
fn validate_reports_every_error_in_one_pass_at_the_fields_line() {
    let dir = TempDir::new("validate-all");
    // Two unsupported fields in one document, and a ServiceEntry refused
    // for its resolution ...
    std::fs::write(
        dir.0.join("a.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec:\n  hosts: [a]\n  http:\n  - mirrorPercent: 5\n    delegate: {name: x}\n    route: [{destination: {host: a.example}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: ns}\nspec:\n  hosts: [ext.example]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DYNAMIC_DNS\n",
    )
    .expect("write");
    // ... and, in another file, routes to that ServiceEntry and to nothing.
    std::fs::write(
        dir.0.join("b.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: ns}\nspec:\n  hosts: [b]\n  http:\n  - route:\n    - destination:\n        host: ext.example\n  - route:\n    - destination:\n        host: nowhere.example\n",
    )
    .expect("write");
    let (ok, text) = validate(&dir.0);
    assert!(!ok);
    for want in [
        "a.yaml:7:5: VirtualService/ns/a: spec.http[0].mirrorPercent",
        "a.yaml:8:5: VirtualService/ns/a: spec.http[0].delegate",
        "ServiceEntry/ns/ext: spec.resolution: resolution DYNAMIC_DNS: want NONE, STATIC, DNS or DNS_ROUND_ROBIN",
        "b.yaml:8:1: VirtualService/ns/b: spec.http[0].route[0].destination: host ext.example is defined by ServiceEntry/ns/ext, which was refused",
        "b.yaml:11:1: VirtualService/ns/b: spec.http[1].route[0].destination: host nowhere.example is not a known Service",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_command_names_file_line_resource_and_field() {
    let dir = TempDir::new("validate");
    std::fs::write(
        dir.0.join("vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  hosts: [r]\n  http:\n  - mirrorPercent: 5\n    route: [{destination: {host: r}}]\n",
    )
    .expect("write");
    let (ok, text) = validate(&dir.0);
    assert!(!ok);
    assert!(text.contains("vs.yaml:7:"), "{text}");
    assert!(
        text.contains("VirtualService/ns/r: spec.http[0].mirrorPercent"),
        "{text}"
    );
    assert!(text.contains("not supported"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_outbound_by_host_inbound_to_app_and_tcp_port() {
    let (r1, r2) = (backend("reviews-1").await, backend("reviews-2").await);
    let app = backend("local-app").await;
    let (out_port, in_port, tcp_port) = (free_port(), free_port(), free_port());
    // A TCP service (port named tcp-*) whose endpoint echoes.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move { echo_bytes(&mut s).await });
        }
    });
    let y = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec:
  selector: {{app: reviews}}
  ports:
  - {{name: http, port: 9080, targetPort: 9080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc
  namespace: default
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: {p1}}}]
endpoints:
- addresses: [127.0.0.1]
  conditions: {{ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-def
  namespace: default
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: {p2}}}]
endpoints:
- addresses: [127.0.0.1]
  conditions: {{ready: true}}
- addresses: [127.0.0.2]
  conditions: {{ready: false}}
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: default}}
spec:
  ports:
  - {{name: tcp-db, port: {tcp_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: default
  labels: {{kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{{name: tcp-db, port: {pe}}}]
endpoints:
- addresses: [127.0.0.1]
"#,
        p1 = r1.addr.port(),
        p2 = r2.addr.port(),
        pe = echo_addr.port(),
    );
    let bosun = Bosun::start(
        &[
            "--mode",
            "sidecar",
            "--outbound-address",
            &format!("127.0.0.1:{out_port}"),
            "--inbound-address",
            &format!("127.0.0.1:{in_port}"),
            "--app-port",
            &app.addr.port().to_string(),
            "--labels",
            "app=productpage,version=v1",
            "--workload",
            "productpage-v1",
        ],
        &y,
    )
    .await;
    // Outbound, plain HTTP proxy style (absolute URI, as with http_proxy=).
    let mut seen = Vec::new();
    for _ in 0..20 {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-x",
                &format!("http://127.0.0.1:{out_port}"),
                "http://reviews:9080/r",
            ])
            .output()
            .expect("curl");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        seen.push(j["backend"].as_str().unwrap_or("").to_string());
    }
    let counts = count_by(seen.iter().map(String::as_str));
    assert_eq!(counts.get("reviews-1"), Some(&10), "{counts:?}");
    assert_eq!(
        counts.get("reviews-2"),
        Some(&10),
        "not-ready endpoints get nothing: {counts:?}"
    );
    // The Host header alone also routes (FQDN form).
    let c = client();
    let r = get(
        &c,
        &format!("http://127.0.0.1:{out_port}/"),
        "reviews.default.svc.cluster.local:9080",
    )
    .await;
    assert!(r.backend().starts_with("reviews-"), "{}", r.body);
    // Inbound to the local app, reported by the destination.
    let r = get(&c, &format!("http://127.0.0.1:{in_port}/in"), "productpage").await;
    assert_eq!(r.backend(), "local-app");
    // TCP service port: a local listener on the service port.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
        .await
        .expect("tcp listener");
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.expect("read");
    assert_eq!(&b, b"ping");
    let m = bosun.metrics().await;
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                "source_workload=\"productpage-v1\"",
                "destination_service=\"reviews.default.svc.cluster.local\""
            ]
        ) >= 21.0,
        "{m}"
    );
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "destination_app=\"productpage\""
            ]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_example_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).expect("examples/") {
        let dir = entry.expect("entry").path();
        let (ok, text) = validate(&dir);
        assert!(ok, "{}: {text}", dir.display());
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn the_demo_shifts_weights_with_no_failed_request() {
    // Uses the demo's fixed ports (8080, 15000, 15010, 15012, 15014,
    // 15100-15111, 18081, 18082, 18091, 18092); the other tests only use
    // ephemeral ports.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bosun"))
        .args(["demo", "--step-seconds", "1", "--connections", "4"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("step ").count(), 3, "{text}");
    assert!(
        text.contains("weights v1=0   v2=100 | observed v1=  0.0% v2=100.0%"),
        "{text}"
    );
    assert!(text.contains(", 0 failed,"), "{text}");
    // Every answer came over mutual TLS (the backends saw the gateway's
    // identity), and the demo's lines are its own: no log lines between.
    assert_eq!(text.matches("| mTLS 100.0% |").count(), 3, "{text}");
    assert!(text.contains("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"));
    assert!(text.lines().all(|l| !l.contains(" INFO ")), "{text}");
}

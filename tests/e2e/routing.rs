//! Istio VirtualService matching, rewrites, redirects, direct responses,
//! header operations and Envoy's response flags, through a real gateway.

use crate::harness::*;

fn matches_yaml(port: u16, backend: std::net::SocketAddr) -> String {
    let other = port + 1;
    let mut y = gateway("t", port);
    y.push_str(&service_entry(
        "echo",
        "t",
        80,
        "HTTP",
        &[(backend, "app=echo")],
    ));
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: matches, namespace: t}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{{uri: {{exact: /exact}}}}]
    directResponse: {{status: 200, body: {{string: uri-exact}}}}
  - match: [{{uri: {{regex: "/re/[0-9]+"}}}}]
    directResponse: {{status: 200, body: {{string: uri-regex}}}}
  - match: [{{uri: {{prefix: /CaSe}}, ignoreUriCase: true}}]
    directResponse: {{status: 200, body: {{string: ignore-case}}}}
  - match: [{{authority: {{exact: api.example.com}}}}]
    directResponse: {{status: 200, body: {{string: authority}}}}
  - match: [{{headers: {{x-user: {{exact: alice}}}}}}]
    directResponse: {{status: 200, body: {{string: header-exact}}}}
  - match: [{{headers: {{x-user: {{prefix: bo}}}}}}]
    directResponse: {{status: 200, body: {{string: header-prefix}}}}
  - match: [{{headers: {{x-user: {{regex: "c.+y"}}}}}}]
    directResponse: {{status: 200, body: {{string: header-regex}}}}
  - match: [{{headers: {{x-present: {{}}}}}}]
    directResponse: {{status: 200, body: {{string: header-present}}}}
  - match: [{{queryParams: {{q: {{exact: "1"}}}}}}]
    directResponse: {{status: 200, body: {{string: query}}}}
  - match: [{{method: {{exact: DELETE}}}}]
    directResponse: {{status: 202, body: {{string: method}}}}
  - match: [{{uri: {{prefix: /port}}, port: {other}}}]
    directResponse: {{status: 200, body: {{string: wrong-port}}}}
  - match: [{{uri: {{prefix: /port}}, port: {port}}}]
    directResponse: {{status: 200, body: {{string: port}}}}
  - match: [{{uri: {{prefix: /labels}}, sourceLabels: {{app: somebody-else}}}}]
    directResponse: {{status: 200, body: {{string: wrong-labels}}}}
  - match: [{{uri: {{prefix: /labels}}, sourceLabels: {{istio: ingressgateway}}}}]
    directResponse: {{status: 200, body: {{string: source-labels}}}}
  - match: [{{uri: {{prefix: /gw}}, gateways: [other-gateway]}}]
    directResponse: {{status: 200, body: {{string: wrong-gateway}}}}
  - match: [{{uri: {{prefix: /gw}}, gateways: [gw]}}]
    directResponse: {{status: 200, body: {{string: gateway}}}}
  - match: [{{uri: {{prefix: /without}}, withoutHeaders: {{x-block: {{exact: "1"}}}}}}]
    directResponse: {{status: 200, body: {{string: without}}}}
  - match: [{{uri: {{prefix: /without}}}}]
    directResponse: {{status: 403, body: {{string: blocked}}}}
  - match: [{{uri: {{prefix: /or-a}}}}, {{uri: {{prefix: /or-b}}}}]
    directResponse: {{status: 200, body: {{string: or}}}}
  - match: [{{uri: {{prefix: /and}}, method: {{exact: POST}}}}]
    directResponse: {{status: 200, body: {{string: and}}}}
  - match: [{{uri: {{prefix: /and}}}}]
    directResponse: {{status: 200, body: {{string: and-fallthrough}}}}
  - match: [{{uri: {{exact: /old}}}}]
    redirect: {{uri: /new, authority: new.example.com}}
  - match: [{{uri: {{prefix: /api/}}}}]
    rewrite: {{uri: /v2/, authority: backend.internal}}
    headers:
      request: {{set: {{x-added: "yes"}}, remove: [x-secret]}}
      response: {{set: {{x-resp: "1"}}}}
    route:
    - destination: {{host: echo}}
  - route:
    - destination: {{host: echo}}
"#
    ));
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn every_match_type_rewrite_redirect_and_headers() {
    let be = backend("echo").await;
    let port = free_port();
    let bosun = Bosun::gateway(&matches_yaml(port, be.addr)).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let h = "any.example.com";
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/exact", vec![], "uri-exact"),
        ("GET", "/re/123", vec![], "uri-regex"),
        ("GET", "/case/x", vec![], "ignore-case"),
        ("GET", "/CASE", vec![], "ignore-case"),
        ("GET", "/x", vec![("x-user", "alice")], "header-exact"),
        ("GET", "/x", vec![("x-user", "bob")], "header-prefix"),
        ("GET", "/x", vec![("x-user", "carly")], "header-regex"),
        ("GET", "/x", vec![("x-present", "")], "header-present"),
        ("GET", "/x?a=2&q=1", vec![], "query"),
        ("DELETE", "/x", vec![], "method"),
        ("GET", "/port", vec![], "port"),
        ("GET", "/labels", vec![], "source-labels"),
        ("GET", "/gw", vec![], "gateway"),
        ("GET", "/without", vec![], "without"),
        ("GET", "/without", vec![("x-block", "1")], "blocked"),
        ("GET", "/or-b/1", vec![], "or"),
        ("POST", "/and", vec![], "and"),
        ("GET", "/and", vec![], "and-fallthrough"),
    ];
    for (method, path, headers, want) in &cases {
        let r = request(&c, method, &format!("{base}{path}"), h, headers).await;
        assert_eq!(r.body, *want, "{method} {path} {headers:?}");
    }
    let r = get(&c, &format!("{base}/anything"), "api.example.com").await;
    assert_eq!(r.body, "authority");
    // Not matching any specific route: the catch-all to the backend.
    let r = get(&c, &format!("{base}/re/abc"), h).await;
    assert_eq!(r.backend(), "echo");

    // Redirect.
    let r = get(&c, &format!("{base}/old?x=1"), h).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "http://new.example.com/new?x=1");

    // Rewrite of a prefix and the authority, header operations both ways.
    let r = request(
        &c,
        "GET",
        &format!("{base}/api/users?id=7"),
        h,
        &[("x-secret", "s")],
    )
    .await;
    let j = r.json();
    assert_eq!(j["path"], "/v2/users?id=7");
    assert_eq!(j["headers"]["host"], "backend.internal");
    assert_eq!(j["headers"]["x-added"], "yes");
    assert!(
        j["headers"].get("x-secret").is_none(),
        "x-secret must be removed: {j}"
    );
    assert_eq!(r.headers["x-resp"], "1");
    // Request id generated, forwarded-for appended.
    assert_eq!(
        j["headers"]["x-request-id"].as_str().map(str::len),
        Some(36)
    );
    let r = request(
        &c,
        "GET",
        &format!("{base}/y"),
        h,
        &[
            ("x-forwarded-for", "10.1.1.1"),
            ("traceparent", "00-abc-def-01"),
        ],
    )
    .await;
    let j = r.json();
    assert_eq!(j["headers"]["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(j["headers"]["traceparent"], "00-abc-def-01");
    drop(bosun);
}

/// Reads a request head, then closes without answering: an upstream reset.
async fn hang_up_backend() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn response_flags_nr_uh_uf_uc_and_access_log() {
    let port = free_port();
    let closed = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let reset = hang_up_backend().await;
    let mut y = gateway("t", port);
    y.push_str(&service_entry("down", "t", 80, "HTTP", &[(closed, "")]));
    y.push_str(&service_entry("reset", "t", 80, "HTTP", &[(reset, "")]));
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: empty, namespace: t}\nspec:\n  hosts: [empty.t.svc.cluster.local]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n---\n",
    );
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: t}\nspec:\n  hosts: [known.example]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /uf}}]\n    route: [{destination: {host: down}}]\n  - match: [{uri: {prefix: /uh}}]\n    route: [{destination: {host: empty}}]\n  - match: [{uri: {prefix: /uc}}]\n    route: [{destination: {host: reset}}]\n",
    );
    let bosun = Bosun::start(
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.1",
            "--access-log",
        ],
        &y,
    )
    .await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let r = get(&c, &format!("{base}/"), "unknown.example").await;
    assert_eq!(
        (r.status, r.headers["x-bosun-response-flags"].to_str().ok()),
        (404, Some("NR"))
    );
    let r = get(&c, &format!("{base}/nothing"), "known.example").await;
    assert_eq!(r.status, 404, "no route matches the path");
    let r = get(&c, &format!("{base}/uh"), "known.example").await;
    assert_eq!((r.status, r.body.as_str()), (503, "no healthy upstream"));
    let r = get(&c, &format!("{base}/uf"), "known.example").await;
    assert_eq!(r.status, 503);
    // Istio's default retry policy retried the connect failure twice.
    assert_eq!(r.headers["x-bosun-response-flags"], "UF,URX");
    let r = get(&c, &format!("{base}/uc"), "known.example").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-bosun-response-flags"], "UC");
    let m = bosun.metrics().await;
    for flags in ["NR", "UH", "UF,URX", "UC"] {
        assert!(
            metric_sum(
                &m,
                "istio_requests_total",
                &[&format!("response_flags=\"{flags}\"")]
            ) >= 1.0,
            "{flags} missing from metrics:\n{m}"
        );
    }
    // One JSON access-log line per request, with Envoy's flags.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let lines: Vec<serde_json::Value> = bosun
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON access log line"))
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    let uf = lines
        .iter()
        .find(|l| l["path"] == "/uf")
        .expect("uf logged");
    assert_eq!(uf["response_code"], 503);
    assert_eq!(uf["response_flags"], "UF,URX");
    assert_eq!(uf["authority"], "known.example");
    assert_eq!(uf["upstream_host"], closed.to_string());
    assert!(
        uf["upstream_cluster"]
            .as_str()
            .is_some_and(|c| c.contains("down.t.svc.cluster.local"))
    );
    assert_eq!(uf["request_id"].as_str().map(str::len), Some(36));
    assert_eq!(
        admin_get(bosun.admin, "/healthz").await.map(|r| r.0),
        Ok(200)
    );
}

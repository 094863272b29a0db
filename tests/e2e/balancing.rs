//! Canary weights, subsets, load-balancing policies, and metrics that count
//! what was really sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::*;

fn canary_yaml(
    port: u16,
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
    w1: u32,
    w2: u32,
) -> String {
    let mut y = gateway("shop", port);
    y.push_str(&service_entry(
        "reviews",
        "shop",
        80,
        "HTTP",
        &[
            (v1, "app=reviews,version=v1"),
            (v2, "app=reviews,version=v2"),
        ],
    ));
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {w1}
    - destination: {{host: reviews, subset: v2}}
      weight: {w2}
"#
    ));
    y
}

/// Sends `n` GETs over `conc` connections; returns backend name → count (""
/// for failures).
async fn spray(url: &str, host: &str, n: usize, conc: usize) -> HashMap<String, u64> {
    let c = client();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, next, url, host) = (c.clone(), next.clone(), url.to_string(), host.to_string());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                let r = get(&c, &url, &host).await;
                seen.push(if r.status == 200 {
                    r.backend()
                } else {
                    String::new()
                });
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    count_by(all.iter().map(String::as_str))
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_split_90_10_by_subset_and_metrics_match() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let bosun = Bosun::gateway(&canary_yaml(port, v1.addr, v2.addr, 90, 10)).await;
    let n = 10_000;
    let counts = spray(&format!("http://127.0.0.1:{port}/"), "shop.example", n, 16).await;
    assert_eq!(counts.get(""), None, "failed requests: {counts:?}");
    let share = 100.0 * counts["v1"] as f64 / n as f64;
    assert!(
        (88.5..=91.5).contains(&share),
        "v1 got {share:.2}% of {n}, want 90 ± 1.5"
    );
    // Subsets by labels: only the two labelled endpoints, each its own version.
    assert_eq!(v1.hits.load(Ordering::Relaxed), counts["v1"]);
    assert_eq!(v2.hits.load(Ordering::Relaxed), counts["v2"]);

    // Istio metrics count exactly what each version served.
    let m = bosun.metrics().await;
    for v in ["v1", "v2"] {
        let got = metric_sum(
            &m,
            "istio_requests_total",
            &[
                &format!("destination_version=\"{v}\""),
                "response_code=\"200\"",
                "reporter=\"source\"",
            ],
        );
        assert_eq!(got as u64, counts[v], "istio_requests_total for {v}:\n{m}");
        let dur = metric_sum(
            &m,
            "istio_request_duration_milliseconds_count",
            &[&format!("destination_version=\"{v}\"")],
        );
        assert_eq!(dur as u64, counts[v]);
    }
    assert!(m.contains("destination_service=\"reviews.shop.svc.cluster.local\""));
    assert!(m.contains("istio_request_duration_milliseconds_bucket{"));
    assert!(
        m.contains("le=\"0.5\"") && m.contains("le=\"3600000\""),
        "Envoy's duration buckets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_failures_while_weights_change_100_times() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let bosun = Arc::new(Bosun::gateway(&canary_yaml(port, v1.addr, v2.addr, 100, 0)).await);
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let changes_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = client();
    let mut load = Vec::new();
    for _ in 0..16 {
        let (c, sent, failed, done) = (
            c.clone(),
            sent.clone(),
            failed.clone(),
            changes_done.clone(),
        );
        let url = format!("http://127.0.0.1:{port}/");
        load.push(tokio::spawn(async move {
            while !(done.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) >= 20_000) {
                let r = get(&c, &url, "shop.example").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed: {} {}", r.status, r.body);
                }
            }
        }));
    }
    for i in 0..100u32 {
        let w = (i * 37) % 101;
        bosun
            .reconfigure(&canary_yaml(port, v1.addr, v2.addr, w, 100 - w))
            .await;
    }
    changes_done.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= 20_000);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests out of {sent}"
    );
    let m = bosun.metrics().await;
    assert_eq!(
        metric_sum(&m, "bosun_config_applied_total", &[]) as u64,
        101
    );
}

fn lb_yaml(port: u16, eps: &[std::net::SocketAddr], lb: &str) -> String {
    let mut y = gateway("lb", port);
    let eps: Vec<(std::net::SocketAddr, &str)> = eps.iter().map(|a| (*a, "app=pool")).collect();
    y.push_str(&service_entry("pool", "lb", 80, "HTTP", &eps));
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: pool, namespace: lb}}\nspec:\n  host: pool\n  trafficPolicy:\n    loadBalancer:\n{lb}---\n"
    ));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pool, namespace: lb}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: pool}}]\n");
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_is_even() {
    let bs = [backend("a").await, backend("b").await, backend("c").await];
    let port = free_port();
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let _bosun = Bosun::gateway(&lb_yaml(port, &addrs, "      simple: ROUND_ROBIN\n")).await;
    let counts = spray(&format!("http://127.0.0.1:{port}/"), "x", 3000, 4).await;
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((990..=1010).contains(&n), "round robin uneven: {counts:?}");
    }
}

async fn key_map(port: u16, keys: &[String]) -> HashMap<String, String> {
    let c = client();
    let mut m = HashMap::new();
    for k in keys {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = request(
                &c,
                "GET",
                &format!("http://127.0.0.1:{port}/"),
                "x",
                &[("x-user", k)],
            )
            .await;
            seen.push(r.backend());
        }
        assert!(
            seen.iter().all(|s| *s == seen[0]),
            "key {k} moved between requests: {seen:?}"
        );
        m.insert(k.clone(), seen[0].clone());
    }
    m
}

async fn consistent_hash_case(lb: &str, exact: bool) {
    let bs = [
        backend("a").await,
        backend("b").await,
        backend("c").await,
        backend("d").await,
    ];
    let port = free_port();
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let bosun = Bosun::gateway(&lb_yaml(port, &addrs, lb)).await;
    let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    let before = key_map(port, &keys).await;
    let per = count_by(before.values().map(String::as_str));
    assert_eq!(per.len(), 4, "keys spread over all endpoints: {per:?}");
    // Remove endpoint "d".
    bosun.reconfigure(&lb_yaml(port, &addrs[..3], lb)).await;
    let after = key_map(port, &keys).await;
    let moved = keys.iter().filter(|k| before[*k] != after[*k]).count();
    let on_d = keys.iter().filter(|k| before[*k] == "d").count();
    let frac = moved as f64 / keys.len() as f64;
    if exact {
        // Ring hash: exactly the keys of the removed endpoint move.
        assert_eq!(moved, on_d, "moved {moved}, were on d {on_d}");
    }
    assert!(
        moved >= on_d && frac < 0.40,
        "moved {frac:.2} of keys (~1/4 expected), {on_d} were on d"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ring_hash_keeps_keys_and_moves_only_the_removed_endpoints_keys() {
    consistent_hash_case("      consistentHash:\n        httpHeaderName: x-user\n        ringHash: {minimumRingSize: 4096}\n", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn maglev_keeps_keys_and_moves_few() {
    consistent_hash_case("      consistentHash:\n        httpHeaderName: x-user\n        maglev: {tableSize: 65537}\n", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn least_request_avoids_a_slow_endpoint() {
    let slow = backend_with_delay("slow", Duration::from_millis(200)).await;
    let (f1, f2) = (backend("fast1").await, backend("fast2").await);
    let port = free_port();
    let _bosun = Bosun::gateway(&lb_yaml(
        port,
        &[slow.addr, f1.addr, f2.addr],
        "      simple: LEAST_REQUEST\n",
    ))
    .await;
    let counts = spray(&format!("http://127.0.0.1:{port}/"), "x", 1500, 24).await;
    assert_eq!(counts.get(""), None);
    let slow_share = counts.get("slow").copied().unwrap_or(0) as f64 / 1500.0;
    assert!(
        slow_share < 0.10,
        "slow endpoint got {:.1}% (round robin would give 33%): {counts:?}",
        slow_share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_by_cookie_query_parameter_and_source_ip() {
    let bs = [
        backend("a").await,
        backend("b").await,
        backend("c").await,
        backend("d").await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let c = client();

    // Cookie with a ttl: a client without the cookie gets one, and sticks to it.
    let port = free_port();
    let _b = Bosun::gateway(&lb_yaml(
        port,
        &addrs,
        "      consistentHash:\n        httpCookie: {name: session, path: /, ttl: 3600s}\n",
    ))
    .await;
    let url = format!("http://127.0.0.1:{port}/");
    let first = get(&c, &url, "x").await;
    let set = first.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        set.starts_with("session=") && set.contains("Max-Age=3600") && set.contains("Path=/"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("pair").to_string();
    for _ in 0..10 {
        let r = request(&c, "GET", &url, "x", &[("cookie", &cookie)]).await;
        assert_eq!(r.backend(), first.backend(), "cookie {cookie} must stick");
        assert!(r.headers.get("set-cookie").is_none());
    }
    let mut owners = std::collections::HashSet::new();
    for i in 0..40 {
        let r = request(
            &c,
            "GET",
            &url,
            "x",
            &[("cookie", &format!("session=s{i}"))],
        )
        .await;
        owners.insert(r.backend());
    }
    assert!(owners.len() >= 3, "sessions spread: {owners:?}");

    // Query parameter.
    let port = free_port();
    let _b = Bosun::gateway(&lb_yaml(
        port,
        &addrs,
        "      consistentHash:\n        httpQueryParameterName: user\n",
    ))
    .await;
    let mut owners = std::collections::HashSet::new();
    for i in 0..20 {
        let u = format!("http://127.0.0.1:{port}/p?user=u{i}&x=1");
        let a = get(&c, &u, "x").await.backend();
        for _ in 0..3 {
            assert_eq!(get(&c, &u, "x").await.backend(), a);
        }
        owners.insert(a);
    }
    assert!(owners.len() >= 3, "{owners:?}");

    // Source IP: every request from 127.0.0.1 lands on one endpoint.
    let port = free_port();
    let _b = Bosun::gateway(&lb_yaml(
        port,
        &addrs,
        "      consistentHash:\n        useSourceIp: true\n",
    ))
    .await;
    let counts = spray(&format!("http://127.0.0.1:{port}/"), "x", 200, 4).await;
    assert_eq!(counts.len(), 1, "one client IP, one endpoint: {counts:?}");
}

//! `xds-load`: how fast one `bosun control` converges N proxies on S
//! services, and how fast one endpoint change reaches all of them.
//!
//! Usage: xds-load BOSUN_BINARY PROXIES SERVICES [NAMESPACES]
//!
//! It writes S ServiceEntries (10 endpoints each, one file per service),
//! spread round-robin over NAMESPACES namespaces (default 1: every proxy
//! receives every service; with more, a mesh-wide `Sidecar` in
//! `istio-system` with egress `./*` scopes each proxy to its namespace, as
//! Istio recommends at scale),
//! starts `bosun control` on them, opens N delta ADS streams as sidecars
//! (wildcard on all four types, over N/100 HTTP/2 connections), and reports:
//! full-push convergence (first request → every stream holds all four
//! types, every chunk), one-endpoint-change propagation p50/p99 (file rename → the
//! changed ClusterLoadAssignment arrives on each stream), and the control
//! process's RSS (current and peak) and CPU seconds.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bosun_xds_proto::core::Node;
use bosun_xds_proto::discovery::DeltaDiscoveryRequest;
use bosun_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use bosun_xds_proto::prost_types::{Struct, Value, value::Kind};
use bosun_xds_proto::type_url;
use tokio::sync::{Barrier, mpsc};

fn namespace(i: usize, namespaces: usize) -> String {
    if namespaces <= 1 {
        "load".into()
    } else {
        format!("ns-{}", i % namespaces)
    }
}

const MESH_SIDECAR: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: istio-system}\nspec:\n  egress:\n  - hosts: [\"./*\"]\n";

fn service(i: usize, port_base: u16, namespaces: usize) -> String {
    let ns = namespace(i, namespaces);
    let mut eps = String::new();
    for e in 0..10 {
        eps.push_str(&format!(
            "  - address: 10.{}.{}.{}\n    ports: {{http: {}}}\n    labels: {{app: svc-{i}}}\n",
            (i / 256) % 256,
            i % 256,
            e + 1,
            port_base
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec:\n  hosts: [svc-{i}.{ns}.svc.cluster.local]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints:\n{eps}"
    )
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn sidecar(id: usize, namespaces: usize) -> Node {
    let mut fields = BTreeMap::new();
    fields.insert(
        "MODE".to_string(),
        Value {
            kind: Some(Kind::StringValue("sidecar".into())),
        },
    );
    fields.insert(
        "NAMESPACE".to_string(),
        Value {
            kind: Some(Kind::StringValue(namespace(id, namespaces))),
        },
    );
    Node {
        id: format!("sidecar-{id}"),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if !(4..=5).contains(&args.len()) {
        eprintln!("usage: xds-load BOSUN_BINARY PROXIES SERVICES [NAMESPACES]");
        std::process::exit(2);
    }
    let (bosun, n, s): (String, usize, usize) =
        (args[1].clone(), args[2].parse()?, args[3].parse()?);
    let k: usize = args.get(4).map_or(Ok(1), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("bosun-xds-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for i in 0..s {
        std::fs::write(dir.join(format!("svc-{i:06}.yaml")), service(i, 8080, k))?;
    }
    if k > 1 {
        std::fs::write(dir.join("sidecar.yaml"), MESH_SIDECAR)?;
    }
    let xds = "127.0.0.1:25510";
    let mut control = Command::new(&bosun)
        .args([
            "control",
            "--config-dir",
            dir.to_str().unwrap_or("."),
            "--xds-addr",
            xds,
            "--admin-address",
            "127.0.0.1:25514",
        ])
        .env(
            "RUST_LOG",
            std::env::var("CONTROL_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = control.id();
    // Ready once the admin endpoint answers 200 on /ready.
    let started = Instant::now();
    loop {
        let ok = std::net::TcpStream::connect("127.0.0.1:25514").is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\n\r\n");
            let mut b = String::new();
            let _ = s.read_to_string(&mut b);
            b.starts_with("HTTP/1.1 200") || b.starts_with("HTTP/1.0 200")
        });
        if ok {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = control.kill();
            return Err("control not ready".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load_time = started.elapsed();

    let channels: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..n.div_ceil(100) {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))?
                .connect()
                .await?;
            v.push(ch);
        }
        v
    };
    let changed_cluster = format!("outbound|80||svc-0.{}.svc.cluster.local", namespace(0, k));
    // The proxies that receive svc-0: all, or those of its namespace.
    let receivers = if k > 1 { n.div_ceil(k) } else { n };
    let (done_tx, mut done_rx) = mpsc::channel::<(usize, Instant)>(n.max(1));
    let (change_tx, mut change_rx) = mpsc::channel::<Instant>(n.max(1));
    let barrier = Arc::new(Barrier::new(n + 1));
    let t_start = Instant::now();
    for id in 0..n {
        let ch = channels[id / 100].clone();
        let (done_tx, change_tx, barrier, changed_cluster) = (
            done_tx.clone(),
            change_tx.clone(),
            barrier.clone(),
            changed_cluster.clone(),
        );
        tokio::spawn(async move {
            let mut client = AggregatedDiscoveryServiceClient::new(ch)
                .max_decoding_message_size(512 * 1024 * 1024);
            let (tx, rx) = mpsc::channel(8);
            for t in type_url::ALL {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        node: Some(sidecar(id, k)),
                        type_url: t.into(),
                        ..Default::default()
                    })
                    .await;
            }
            let Ok(resp) = client
                .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            else {
                return;
            };
            let mut stream = resp.into_inner();
            // A type is complete at its last chunk (a nonce not ending in MORE).
            let mut complete = std::collections::HashSet::new();
            while complete.len() < 4 {
                let Ok(Some(r)) = stream.message().await else {
                    return;
                };
                if !r.nonce.ends_with(bosun_xds_proto::MORE) {
                    complete.insert(r.type_url.clone());
                }
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: r.type_url,
                        response_nonce: r.nonce,
                        ..Default::default()
                    })
                    .await;
            }
            let _ = done_tx.send((id, Instant::now())).await;
            barrier.wait().await;
            while let Ok(Some(r)) = stream.message().await {
                let hit = r.resources.iter().any(|x| x.name == changed_cluster);
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: r.type_url,
                        response_nonce: r.nonce,
                        ..Default::default()
                    })
                    .await;
                if hit {
                    let _ = change_tx.send(Instant::now()).await;
                    break;
                }
            }
            // Keep the stream open until the run ends.
            let _ = stream.message().await;
        });
    }
    drop(done_tx);
    let mut last = t_start;
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(600), done_rx.recv()).await {
            Ok(Some((_, t))) => last = last.max(t),
            _ => break,
        }
    }
    let full_push = last - t_start;
    let rss_after_push = proc_field(pid, "status", "VmRSS:");
    barrier.wait().await;

    // One endpoint change: svc-0's first endpoint moves.
    let tmp = dir.join(".svc-000000.yaml.tmp");
    std::fs::write(&tmp, service(0, 9090, k))?;
    let t0 = Instant::now();
    std::fs::rename(&tmp, dir.join("svc-000000.yaml"))?;
    let mut lat = Vec::new();
    for _ in 0..receivers {
        match tokio::time::timeout(Duration::from_secs(120), change_rx.recv()).await {
            Ok(Some(t)) => lat.push((t - t0).as_secs_f64() * 1000.0),
            _ => break,
        }
    }
    let got = lat.len();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let peak = proc_field(pid, "status", "VmHWM:");
    let cpu = cpu_seconds(pid);
    let _ = control.kill();
    let _ = control.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "| proxies × services (namespaces) | config load | full push (all proxies hold all 4 types) | one endpoint change p50 / p99 | proxies updated | control RSS after push / peak | control CPU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} × {s} ({k}) | {:.2} s | {:.2} s | {p50:.0} ms / {p99:.0} ms | {got}/{receivers} | {} MB / {} MB | {cpu:.1} s |",
        load_time.as_secs_f64(),
        full_push.as_secs_f64(),
        rss_after_push / 1024,
        peak / 1024
    );
    Ok(())
}

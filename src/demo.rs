//! `bosun demo`: a live canary on loopback, nothing to install.
//!
//! Two backends (v1 on :18081, v2 on :18082), a control service (xDS on
//! :15010) watching a directory that holds `examples/canary/canary.yaml`
//! (embedded), a gateway on :8080 configured by it over xDS, and a load
//! loop. The demo rewrites the VirtualService weights in the watched
//! directory while traffic flows, exactly as a user would, and reports each step.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

pub const CANARY_YAML: &str = include_str!("../examples/canary/canary.yaml");
const GATEWAY: &str = "127.0.0.1:8080";
const BACKENDS: [(&str, &str); 2] = [("v1", "127.0.0.1:18081"), ("v2", "127.0.0.1:18082")];
const STEPS: [(u32, u32); 3] = [(90, 10), (50, 50), (0, 100)];
const CONTROL_XDS: &str = "127.0.0.1:15010";
const CONTROL_ADMIN: &str = "127.0.0.1:15014";

/// The embedded canary config with the v1/v2 weights replaced.
pub fn canary_config(v1: u32, v2: u32) -> String {
    CANARY_YAML
        .replacen("weight: 90", "weight: @V1@", 1)
        .replacen("weight: 10", "weight: @V2@", 1)
        .replace("@V1@", &v1.to_string())
        .replace("@V2@", &v2.to_string())
}

async fn backend(version: &'static str, addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("demo backend {version} on {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(version.as_bytes()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// `bosun echo`: a backend for tests that answers "NAME CLIENT-IP\n", so
/// a test sees which endpoint served it and what source address it saw.
pub async fn echo(
    listen: std::net::SocketAddr,
    name: String,
) -> anyhow::Result<std::process::ExitCode> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("echo on {listen}: {e}"))?;
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    format!("{name} {}\n", peer.ip()),
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[derive(Default)]
struct Stats {
    v1: u64,
    v2: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    f64::from(v[i]) / 1000.0
}

fn write_config(dir: &std::path::Path, v1: u32, v2: u32) -> std::io::Result<()> {
    // Write aside and rename, so the watcher never reads half a file.
    let tmp = dir.join(".canary.yaml.tmp");
    std::fs::write(&tmp, canary_config(v1, v2))?;
    std::fs::rename(&tmp, dir.join("canary.yaml"))
}

pub async fn run(step_seconds: u64, connections: usize) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    for (v, addr) in BACKENDS {
        backend(v, addr).await?;
    }
    let dir = std::env::temp_dir().join(format!("bosun-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    write_config(&dir, STEPS[0].0, STEPS[0].1)?;
    // The control service watches the directory; the gateway gets its
    // config from it over xDS, as in a cluster.
    let control =
        crate::control::ControlArgs::new(dir.clone(), CONTROL_XDS.parse()?, CONTROL_ADMIN.parse()?);
    let _control = crate::control::start(&control).await?;
    // Parsed like the command line, so every default is the flag's default.
    let cli = <crate::Cli as clap::Parser>::try_parse_from([
        "bosun",
        "proxy",
        "--mode",
        "gateway",
        "--xds",
        CONTROL_XDS,
        "--namespace",
        "istio-system",
        "--workload",
        "istio-ingressgateway",
        "--admin-address",
        "127.0.0.1:15000",
        "--gateway-address",
        "127.0.0.1",
    ])?;
    let crate::Command::Proxy(args) = cli.command else {
        anyhow::bail!("demo: proxy arguments did not parse as a proxy command");
    };
    let proxy = crate::app::start_proxy(&args).await?;
    let ready_by = Instant::now() + Duration::from_secs(5);
    while proxy.listening_on().is_empty() {
        if Instant::now() > ready_by {
            // e.g. another program holds the gateway port: the NACK says so.
            anyhow::bail!("the gateway did not come up: see the log above");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "bosun demo: gateway http://{GATEWAY}/reviews  backends v1 {} v2 {}",
        BACKENDS[0].1, BACKENDS[1].1
    );
    println!(
        "            metrics http://127.0.0.1:15000/stats/prometheus  config {}",
        dir.display()
    );
    println!(
        "            control service xDS {CONTROL_XDS}; bosun status --control {CONTROL_ADMIN}"
    );

    let stats = Arc::new(Mutex::new(Stats::default()));
    let total = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("http://{GATEWAY}/reviews").parse()?;
    let mut workers = Vec::new();
    for _ in 0..connections.max(1) {
        let (client, url, stats, stop) = (client.clone(), url.clone(), stats.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let result = match client.get(url.clone()).await {
                    Ok(resp) if resp.status().is_success() => {
                        resp.into_body().collect().await.ok().map(|b| b.to_bytes())
                    }
                    _ => None,
                };
                let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                let mut s = stats.lock().await;
                match result.as_deref() {
                    Some(b"v1") => s.v1 += 1,
                    Some(b"v2") => s.v2 += 1,
                    _ => s.errors += 1,
                }
                s.latencies_us.push(us);
            }
        }));
    }

    for (i, (w1, w2)) in STEPS.iter().enumerate() {
        let before = proxy.version();
        if i > 0 {
            write_config(&dir, *w1, *w2)?;
            let by = Instant::now() + Duration::from_secs(3);
            while proxy.version() == before {
                if Instant::now() > by {
                    anyhow::bail!("the gateway did not pick up the new weights within 3 s");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Count only traffic routed by this step's weights: let requests
        // already routed by the previous weights finish first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let carried = std::mem::take(&mut *stats.lock().await);
        merge(&mut *total.lock().await, carried);
        tokio::time::sleep(Duration::from_secs(step_seconds)).await;
        let mut s = std::mem::take(&mut *stats.lock().await);
        let n = s.v1 + s.v2 + s.errors;
        let pct = |x: u64| {
            if n == 0 {
                0.0
            } else {
                100.0 * x as f64 / n as f64
            }
        };
        let p99 = percentile(&mut s.latencies_us, 0.99);
        println!(
            "step {}/{}  weights v1={w1:<3} v2={w2:<3} | observed v1={:5.1}% v2={:5.1}% | requests {n:>7} | errors {} | p99 {p99:.2} ms | config {}",
            i + 1,
            STEPS.len(),
            pct(s.v1),
            pct(s.v2),
            s.errors,
            proxy.version()
        );
        merge(&mut *total.lock().await, s);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let rest = std::mem::take(&mut *stats.lock().await);
    let mut t = total.lock().await;
    merge(&mut t, rest);
    let n = t.v1 + t.v2 + t.errors;
    let p99 = percentile(&mut t.latencies_us, 0.99);
    let p50 = percentile(&mut t.latencies_us, 0.50);
    println!(
        "summary: {n} requests in {:.1} s, {} failed, v1 {} v2 {}, p50 {p50:.2} ms p99 {p99:.2} ms, {} weight changes applied with traffic flowing",
        started.elapsed().as_secs_f64(),
        t.errors,
        t.v1,
        t.v2,
        STEPS.len() - 1
    );
    Ok(if t.errors == 0 && n > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn merge(into: &mut Stats, s: Stats) {
    into.v1 += s.v1;
    into.v2 += s.v2;
    into.errors += s.errors;
    into.latencies_us.extend(s.latencies_us);
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

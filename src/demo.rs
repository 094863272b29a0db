//! `bosun demo`: a live canary on loopback, over mutual TLS, nothing to install.
//!
//! Two backends (v1 on :18081, v2 on :18082), each behind its sidecar
//! (inbound :18091, :18092), a control service that is also the mesh's CA
//! (authenticated xDS and certificates on :15012) watching a directory that
//! holds `examples/canary/canary.yaml` (embedded), a gateway on :8080
//! configured by it over xDS, and a load loop. Every proxy gets its
//! certificate from the CA with a bootstrap token; the gateway speaks
//! Istio mutual TLS to the sidecars (STRICT), and each backend echoes the
//! identity its sidecar saw. The demo rewrites the VirtualService weights
//! in the watched directory while traffic flows, exactly as a user would,
//! and reports each step.

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
const CONTROL_TLS: &str = "127.0.0.1:15012";
const CONTROL_ADMIN: &str = "127.0.0.1:15014";
/// The sidecars: (version, inbound, app, admin, outbound).
const SIDECARS: [(&str, &str, u16, &str, &str); 2] = [
    (
        "v1",
        "127.0.0.1:18091",
        18081,
        "127.0.0.1:15100",
        "127.0.0.1:15101",
    ),
    (
        "v2",
        "127.0.0.1:18092",
        18082,
        "127.0.0.1:15110",
        "127.0.0.1:15111",
    ),
];
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/demo/sa/reviews";

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
                // "<version> <caller's SPIFFE ID>", from the XFCC header
                // the sidecar set ("-" if none).
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| async move {
                    let caller = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| {
                            v.rsplit(";URI=")
                                .next()
                                .filter(|u| u.starts_with("spiffe://"))
                        })
                        .unwrap_or("-")
                        .to_string();
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        format!("{version} {caller}"),
                    ))))
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
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| async move {
                // "NAME CLIENT-IP", and the client certificate the sidecar
                // forwarded (x-forwarded-client-cert) when there is one.
                let mut body = format!("{name} {}", peer.ip());
                if let Some(x) = req
                    .headers()
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                {
                    body.push_str(&format!(" xfcc={x}"));
                }
                body.push('\n');
                let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                // /status/NNN answers with that status (a probe target).
                if let Some(code) = req
                    .uri()
                    .path()
                    .strip_prefix("/status/")
                    .and_then(|c| c.parse::<u16>().ok())
                    .and_then(|c| hyper::StatusCode::from_u16(c).ok())
                {
                    *resp.status_mut() = code;
                }
                Ok::<_, std::convert::Infallible>(resp)
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
    /// Answers whose backend saw the gateway's identity (mutual TLS).
    mtls: u64,
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
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let _cleanup = Cleanup(dir.clone());
    write_config(&config, STEPS[0].0, STEPS[0].1)?;
    // One bootstrap token per proxy: the CA signs only the identity a token maps to.
    let tokens = dir.join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n\
         - {token: demo-gateway-token-0001, namespace: istio-system, serviceAccount: istio-ingressgateway}\n\
         - {token: demo-reviews-token-0001, namespace: demo, serviceAccount: reviews}\n",
    )?;
    std::fs::write(dir.join("gateway.token"), "demo-gateway-token-0001")?;
    std::fs::write(dir.join("reviews.token"), "demo-reviews-token-0001")?;
    // The control service watches the directory and is the mesh's CA;
    // the proxies get certificates and config from it, as in a cluster.
    let control = crate::control::ControlArgs::new(
        config.clone(),
        CONTROL_XDS.parse()?,
        CONTROL_ADMIN.parse()?,
    )
    .with_ca(dir.join("ca"), CONTROL_TLS.parse()?, tokens);
    let _control = crate::control::start(&control).await?;
    let root = dir.join("ca").join("root-cert.pem");
    let root = root.to_str().unwrap_or_default();
    let xds = format!("https://{CONTROL_TLS}");
    let mut sidecars = Vec::new();
    for (version, inbound, app, admin, outbound) in SIDECARS {
        let token = dir.join("reviews.token");
        let args = proxy_args(&[
            "--mode",
            "sidecar",
            "--xds",
            &xds,
            "--ca-root-cert",
            root,
            "--token-file",
            token.to_str().unwrap_or_default(),
            "--namespace",
            "demo",
            "--service-account",
            "reviews",
            "--workload",
            &format!("reviews-{version}"),
            "--node-id",
            &format!("sidecar~reviews-{version}"),
            "--labels",
            &format!("app=reviews,version={version}"),
            "--app-port",
            &app.to_string(),
            "--inbound-address",
            inbound,
            "--admin-address",
            admin,
            "--outbound-address",
            outbound,
        ])?;
        sidecars.push(crate::app::start_proxy(&args).await?);
    }
    let token = dir.join("gateway.token");
    let args = proxy_args(&[
        "--mode",
        "gateway",
        "--xds",
        &xds,
        "--ca-root-cert",
        root,
        "--token-file",
        token.to_str().unwrap_or_default(),
        "--namespace",
        "istio-system",
        "--service-account",
        "istio-ingressgateway",
        "--workload",
        "istio-ingressgateway",
        "--admin-address",
        "127.0.0.1:15000",
        "--gateway-address",
        "127.0.0.1",
    ])?;
    let proxy = crate::app::start_proxy(&args).await?;
    let ready_by = Instant::now() + Duration::from_secs(10);
    let all = || std::iter::once(&proxy).chain(sidecars.iter());
    while all().any(|p| p.listening_on().is_empty() || p.shared().tls.get().is_none()) {
        if Instant::now() > ready_by {
            // e.g. another program holds a port: the log says so.
            anyhow::bail!("the proxies did not come up with certificates and config within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "bosun demo: gateway http://{GATEWAY}/reviews -> sidecars {} {} -> backends v1 {} v2 {}",
        SIDECARS[0].1, SIDECARS[1].1, BACKENDS[0].1, BACKENDS[1].1
    );
    println!("            mutual TLS (STRICT): {GATEWAY_ID} -> {REVIEWS_ID}");
    println!(
        "            certificates and xDS from the control service's CA https://{CONTROL_TLS} (bootstrap tokens); bosun status --control {CONTROL_ADMIN}"
    );
    println!(
        "            metrics http://127.0.0.1:15000/stats/prometheus  config {}",
        config.display()
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
                let text = result.as_deref().map(String::from_utf8_lossy);
                let (version, caller) = text
                    .as_deref()
                    .and_then(|t| t.split_once(' '))
                    .unwrap_or(("", ""));
                let mut s = stats.lock().await;
                match version {
                    "v1" => s.v1 += 1,
                    "v2" => s.v2 += 1,
                    _ => s.errors += 1,
                }
                if caller == GATEWAY_ID {
                    s.mtls += 1;
                }
                s.latencies_us.push(us);
            }
        }));
    }

    for (i, (w1, w2)) in STEPS.iter().enumerate() {
        let before = proxy.version();
        if i > 0 {
            write_config(&config, *w1, *w2)?;
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
            "step {}/{}  weights v1={w1:<3} v2={w2:<3} | observed v1={:5.1}% v2={:5.1}% | requests {n:>7} | errors {} | mTLS {:5.1}% | p99 {p99:.2} ms | config {}",
            i + 1,
            STEPS.len(),
            pct(s.v1),
            pct(s.v2),
            s.errors,
            pct(s.mtls),
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
        "summary: {n} requests in {:.1} s, {} failed, v1 {} v2 {}, {} over mutual TLS, p50 {p50:.2} ms p99 {p99:.2} ms, {} weight changes applied with traffic flowing",
        started.elapsed().as_secs_f64(),
        t.errors,
        t.v1,
        t.v2,
        t.mtls,
        STEPS.len() - 1
    );
    Ok(if t.errors == 0 && n > 0 && t.mtls == n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn merge(into: &mut Stats, s: Stats) {
    into.mtls += s.mtls;
    into.v1 += s.v1;
    into.v2 += s.v2;
    into.errors += s.errors;
    into.latencies_us.extend(s.latencies_us);
}

/// Proxy flags parsed as the command line parses them, so every default
/// is the flag's default.
fn proxy_args(args: &[&str]) -> anyhow::Result<Box<crate::ProxyArgs>> {
    let argv = ["bosun", "proxy"].into_iter().chain(args.iter().copied());
    let cli = <crate::Cli as clap::Parser>::try_parse_from(argv)?;
    match cli.command {
        crate::Command::Proxy(args) => Ok(args),
        _ => anyhow::bail!("demo: proxy arguments did not parse as a proxy command"),
    }
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

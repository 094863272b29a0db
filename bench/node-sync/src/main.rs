//! `node-sync`: how long node mode takes to program S services (10
//! endpoints each) into the kernel, in full and for one endpoint change
//! (replaced; removed, and on nftables the exact split that follows),
//! with the nftables and the iptables backend. Run it as root inside a
//! network namespace of its own (`bench/node-sync.sh` does):
//!
//!   node-sync SERVICES[,SERVICES...] [CHANGES] [nftables,iptables]  → a Markdown table
//!   node-sync --program SERVICES BACKEND          → program and exit, rules kept
//!
//! Services are 10.96.x.y:80 → 10.1.x.y:8080 ×10, built in memory (the YAML
//! reading is not what is measured).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bosun_node::services::{Endpoint, Proto, ServiceMap, ServicePort};
use bosun_node::{Backend, Syncer};

fn services(n: usize) -> ServiceMap {
    // NODE_SYNC_ENDPOINT=ip:port sends every service to one real backend
    // (for the first-packet latency run).
    let real: Option<(Ipv4Addr, u16)> = std::env::var("NODE_SYNC_ENDPOINT").ok().and_then(|v| {
        let a: std::net::SocketAddrV4 = v.parse().ok()?;
        Some((*a.ip(), a.port()))
    });
    let mut m = ServiceMap::new();
    for i in 0..n {
        let (a, b) = ((i / 250) as u8, (i % 250) as u8 + 1);
        let id = format!("bench/svc-{i}/tcp/http");
        m.insert(
            id.clone(),
            std::sync::Arc::new(ServicePort {
                id,
                proto: Proto::Tcp,
                port: 80,
                cluster_ips: vec![Ipv4Addr::new(10, 96, a, b).into()],
                external_ips: vec![],
                load_balancer_ips: vec![],
                source_ranges: vec![],
                node_port: None,
                affinity_timeout: None,
                external_local: false,
                internal_local: false,
                endpoints: (0..10)
                    .map(|e| Endpoint {
                        ip: real
                            .map_or(Ipv4Addr::new(10, 100 + e, a, b), |r| r.0)
                            .into(),
                        port: real.map_or(8080, |r| r.1),
                        local: true,
                        node: String::new(),
                        weight: 1,
                    })
                    .collect(),
            }),
        );
    }
    m
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (median, max) of a change, in seconds.
type Stat = (f64, f64);
/// Full sync; one endpoint replaced, removed, the split evened out after,
/// one endpoint added.
type Measured = (f64, Stat, Stat, Stat, Stat);

/// Full sync, then (median, max) of one endpoint replaced (a pod restarted
/// elsewhere: as many endpoints as before) and of one endpoint removed.
async fn measure(n: usize, backend: Backend, changes: usize) -> Result<Measured, String> {
    Syncer::cleanup(backend).await?;
    let mut map = services(n);
    let mut s = Syncer::new(backend, Default::default());
    let t = Instant::now();
    s.sync(&map, Instant::now()).await?;
    let full = t.elapsed().as_secs_f64();
    let mut one = Vec::new();
    for c in 0..changes {
        // One endpoint of one service moves to another port.
        let key = format!("bench/svc-{}/tcp/http", (c * 7919) % n);
        if let Some(sp) = map.get_mut(&key) {
            std::sync::Arc::make_mut(sp).endpoints[0].port = 9000 + c as u16;
        }
        let t = Instant::now();
        s.sync(&map, Instant::now()).await?;
        one.push(t.elapsed().as_secs_f64());
    }
    let (mut removed, mut evened) = (Vec::new(), Vec::new());
    for c in 0..changes {
        let key = format!("bench/svc-{}/tcp/http", (c * 7919 + 1) % n);
        if let Some(sp) = map.get_mut(&key) {
            std::sync::Arc::make_mut(sp).endpoints.pop();
        }
        let t = Instant::now();
        s.sync(&map, Instant::now()).await?;
        removed.push(t.elapsed().as_secs_f64());
        // nftables keeps the rule (an uneven split) and evens it out after.
        if s.skewed() {
            let t = Instant::now();
            s.sync_exact(&map, Instant::now()).await?;
            evened.push(t.elapsed().as_secs_f64());
        }
    }
    let mut added = Vec::new();
    for c in 0..changes {
        let key = format!("bench/svc-{}/tcp/http", (c * 7919 + 2) % n);
        if let Some(sp) = map.get_mut(&key) {
            let sp = std::sync::Arc::make_mut(sp);
            let mut e = sp.endpoints[0].clone();
            e.ip = Ipv4Addr::new(10, 200, c as u8, 1).into();
            sp.endpoints.push(e);
            sp.endpoints.sort();
        }
        let t = Instant::now();
        s.sync(&map, Instant::now()).await?;
        added.push(t.elapsed().as_secs_f64());
    }
    let stats = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        (median(v), v.iter().copied().fold(0.0, f64::max))
    };
    Syncer::cleanup(backend).await?;
    Ok((
        full,
        stats(&mut one),
        stats(&mut removed),
        stats(&mut evened),
        stats(&mut added),
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--dump") {
        // The nft text of a full sync and of one endpoint change, with the
        // time spent rendering and diffing (no kernel involved).
        let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10);
        let mut map = services(n);
        let opts = Default::default();
        let t = Instant::now();
        let a = bosun_node::nft::render(
            bosun_node::services::Family::V4,
            &map,
            &opts,
            None,
            bosun_node::nft::Split::Exact,
        );
        let full = bosun_node::nft::full_text(&a);
        let t_full = t.elapsed();
        if let Some(sp) = map.get_mut("bench/svc-0/tcp/http") {
            std::sync::Arc::make_mut(sp).endpoints[0].port = 9000;
        }
        let t = Instant::now();
        let b = bosun_node::nft::render(
            bosun_node::services::Family::V4,
            &map,
            &opts,
            Some(&a),
            bosun_node::nft::Split::KeepRules,
        );
        let diff = bosun_node::nft::diff_text(&a, &b).unwrap_or_default();
        let t_diff = t.elapsed();
        let _ = std::fs::write("/tmp/node-sync-full.nft", &full);
        let _ = std::fs::write("/tmp/node-sync-diff.nft", &diff);
        eprintln!(
            "render+full {t_full:?} ({} bytes), render+diff {t_diff:?} ({} bytes)",
            full.len(),
            diff.len()
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("--program") {
        let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10);
        let backend = match args.get(3).map(String::as_str) {
            Some("iptables") => Backend::Iptables,
            _ => Backend::Nftables,
        };
        let mut s = Syncer::new(backend, Default::default());
        let _ = Syncer::cleanup(Backend::Nftables).await;
        let _ = Syncer::cleanup(Backend::Iptables).await;
        if let Err(e) = s.sync(&services(n), Instant::now()).await {
            eprintln!("node-sync: {e}");
            std::process::exit(1);
        }
        return;
    }
    let sizes: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 10_000, 30_000]);
    let changes: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(5);
    let backends: Vec<(&str, Backend)> = [
        ("nftables", Backend::Nftables),
        ("iptables", Backend::Iptables),
    ]
    .into_iter()
    .filter(|(name, _)| args.get(3).is_none_or(|b| b.split(',').any(|x| x == *name)))
    .collect();
    println!(
        "| services × 10 endpoints | backend | full sync | one endpoint replaced (median / max of {changes}) | one endpoint removed (median / max) | then the split evened out (median / max) | one endpoint added (median / max) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for n in sizes {
        for &(name, backend) in &backends {
            match measure(n, backend, changes).await {
                Ok((full, (med, max), (rmed, rmax), (emed, emax), (amed, amax))) => println!(
                    "| {n} | {name} | {:.3} s | {:.1} ms / {:.1} ms | {:.1} ms / {:.1} ms | {} | {:.1} ms / {:.1} ms |",
                    full,
                    med * 1000.0,
                    max * 1000.0,
                    rmed * 1000.0,
                    rmax * 1000.0,
                    if emed.is_nan() {
                        "(not needed)".to_string()
                    } else {
                        format!("{:.1} ms / {:.1} ms", emed * 1000.0, emax * 1000.0)
                    },
                    amed * 1000.0,
                    amax * 1000.0
                ),
                Err(e) => println!("| {n} | {name} | failed: {e} | |"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

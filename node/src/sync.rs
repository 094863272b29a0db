//! Applying rendered rules to the kernel, and what it cost.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use crate::services::{Family, ServiceMap};
use crate::{iptables, nft};

/// How rules reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
    /// An in-process L4 proxy (see [`crate::userspace`]).
    Userspace,
}

/// A Prometheus histogram (cumulative buckets on output).
#[derive(Debug)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn exponential(start: f64, factor: f64, n: usize) -> Histogram {
        let bounds: Vec<f64> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        Histogram {
            counts: vec![0; bounds.len()],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }
    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn write(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// kube-proxy-compatible metrics, plus the last sync's kind and time.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<MetricsInner>,
}

#[derive(Debug)]
struct MetricsInner {
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    programming: Histogram,
    last_sync_unix: f64,
    last_sync_seconds: f64,
    last_sync_full: bool,
    failures: u64,
    services: usize,
    synced_once: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(MetricsInner {
                sync: Histogram::exponential(0.001, 2.0, 15),
                full: Histogram::exponential(0.001, 2.0, 15),
                partial: Histogram::exponential(0.001, 2.0, 15),
                programming: Histogram::exponential(0.001, 2.0, 18),
                last_sync_unix: 0.0,
                last_sync_seconds: 0.0,
                last_sync_full: false,
                failures: 0,
                services: 0,
                synced_once: false,
            }),
        }
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut MetricsInner) -> T) -> T {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut m)
    }
    /// Whether rules were ever programmed, and when last (unix seconds).
    pub fn last_sync(&self) -> Option<f64> {
        self.with(|m| m.synced_once.then_some(m.last_sync_unix))
    }
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            m.sync.write(
                &mut out,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            );
            m.full.write(
                &mut out,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "Full SyncProxyRules latency in seconds",
            );
            m.partial.write(
                &mut out,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "Partial SyncProxyRules latency in seconds",
            );
            m.programming.write(
                &mut out,
                "kubeproxy_network_programming_duration_seconds",
                "In-cluster network programming latency in seconds (config change seen to rules in the kernel)",
            );
            out.push_str(&format!(
                "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}\n\
# TYPE bosun_node_last_sync_seconds gauge\nbosun_node_last_sync_seconds{{kind=\"{}\"}} {}\n\
# TYPE bosun_node_sync_failures_total counter\nbosun_node_sync_failures_total {}\n\
# TYPE bosun_node_service_ports gauge\nbosun_node_service_ports {}\n",
                m.last_sync_unix,
                if m.last_sync_full { "full" } else { "partial" },
                m.last_sync_seconds,
                m.failures,
                m.services
            ));
            out
        })
    }
}

async fn run_with_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| format!("{cmd}: writing rules: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Programs the kernel from successive service maps, sending only what
/// changed (nftables) and falling back to a full sync after a failure.
pub struct Syncer {
    backend: Backend,
    opts: nft::Options,
    pub metrics: std::sync::Arc<Metrics>,
    /// What the kernel holds, per family (ip, ip6).
    nft_last: Option<[nft::Rendered; 2]>,
    ipt_last: Option<[iptables::Rendered; 2]>,
    userspace: Option<crate::userspace::Userspace>,
    /// The nf_tables socket (nftables), opened on first use.
    netlink: Option<crate::netlink::Conn>,
    /// False once the kernel refused a full sync over netlink: `nft -f`.
    use_netlink: bool,
}

impl Syncer {
    pub fn new(backend: Backend, opts: nft::Options) -> Syncer {
        let use_netlink = std::env::var_os("BOSUN_NODE_NFT_TEXT").is_none();
        if backend == Backend::Nftables && !use_netlink {
            tracing::info!("BOSUN_NODE_NFT_TEXT is set: programming through nft -f");
        }
        Syncer {
            backend,
            opts,
            metrics: Default::default(),
            nft_last: None,
            netlink: None,
            use_netlink,
            ipt_last: None,
            userspace: None,
        }
    }

    /// Makes the kernel match `services`. `changed_at` is when the change
    /// was seen (for the network programming latency). Returns whether it
    /// was a full sync.
    pub async fn sync(
        &mut self,
        services: &ServiceMap,
        changed_at: Instant,
    ) -> Result<bool, String> {
        self.sync_split(services, changed_at, nft::Split::KeepRules)
            .await
    }

    /// Whether the last sync left some service's split uneven (nftables:
    /// endpoints went and the rule was kept, see [`nft::Split`]); a
    /// [`Syncer::sync_exact`] evens it out.
    pub fn skewed(&self) -> bool {
        self.nft_last
            .as_ref()
            .is_some_and(|l| l.iter().any(nft::Rendered::skewed))
    }

    /// [`Syncer::sync`], with every service's split made exact.
    pub async fn sync_exact(
        &mut self,
        services: &ServiceMap,
        changed_at: Instant,
    ) -> Result<bool, String> {
        self.sync_split(services, changed_at, nft::Split::Exact)
            .await
    }

    async fn sync_split(
        &mut self,
        services: &ServiceMap,
        changed_at: Instant,
        split: nft::Split,
    ) -> Result<bool, String> {
        let t = Instant::now();
        let result = match self.backend {
            Backend::Nftables => self.sync_nft(services, split).await,
            Backend::Iptables => self.sync_iptables(services).await,
            Backend::Userspace => {
                let first = self.userspace.is_none();
                self.userspace
                    .get_or_insert_with(Default::default)
                    .apply(services)
                    .await
                    .map(|()| first)
            }
        };
        let took = t.elapsed().as_secs_f64();
        let programming = changed_at.elapsed().as_secs_f64();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        self.metrics.with(|m| match &result {
            Ok(full) => {
                m.sync.observe(took);
                if *full {
                    m.full.observe(took);
                } else {
                    m.partial.observe(took);
                }
                m.programming.observe(programming);
                m.last_sync_unix = now;
                m.last_sync_seconds = took;
                m.last_sync_full = *full;
                m.services = services.len();
                m.synced_once = true;
            }
            Err(_) => m.failures += 1,
        });
        if let Ok(full) = &result {
            tracing::info!(
                backend = ?self.backend,
                full,
                service_ports = services.len(),
                sync_ms = (took * 1000.0) as u64,
                "rules synced"
            );
        }
        result
    }

    async fn sync_nft(&mut self, services: &ServiceMap, split: nft::Split) -> Result<bool, String> {
        // Both tables, ip and ip6, in one transaction.
        let t = Instant::now();
        // The last rendering is only diffed against from here on (its
        // hairpin counts move to the new one).
        let mut old = self.nft_last.take();
        let new = [Family::V4, Family::V6].map(|f| match old.as_mut() {
            Some(o) => nft::render_taking(f, services, &self.opts, &mut o[f as usize], split),
            None => nft::render(f, services, &self.opts, None, split),
        });
        let rendered = t.elapsed();
        let full = old.is_none();
        if !self.use_netlink {
            return self.sync_nft_text(old, new).await;
        }
        let mut conn = match self.netlink.take() {
            Some(c) => c,
            None => crate::netlink::Conn::open()?,
        };
        let mut batch = conn.batch();
        match &old {
            Some(old) => {
                let mut any = false;
                for (o, n) in old.iter().zip(&new) {
                    any |= nft::diff_batch(o, n, &mut batch);
                }
                if !any {
                    self.netlink = Some(conn);
                    self.nft_last = Some(new);
                    return Ok(false);
                }
            }
            None => new.iter().for_each(|n| nft::full_batch(n, &mut batch)),
        }
        // Inline: one send; the kernel applies it before the send returns.
        let encoded = t.elapsed();
        let sent = conn.send(batch);
        tracing::debug!(
            render_ms = rendered.as_secs_f64() * 1e3,
            encode_ms = (encoded - rendered).as_secs_f64() * 1e3,
            kernel_ms = (t.elapsed() - encoded).as_secs_f64() * 1e3,
            "nftables sync over netlink"
        );
        match sent {
            Ok(()) => {
                self.netlink = Some(conn);
                self.nft_last = Some(new);
                Ok(full)
            }
            Err(e) if full => {
                // The kernel refused even a whole table from us: this
                // kernel may not take Bosun's netlink encoding. nft from now on.
                tracing::warn!(error = %e, "netlink sync refused; programming through nft from now on");
                self.use_netlink = false;
                self.sync_nft_text(None, new).await
            }
            Err(e) => {
                // The kernel may differ from what we think: resync in full next time.
                self.nft_last = None;
                Err(e)
            }
        }
    }

    /// The same transaction as `nft -f` text (when netlink is refused).
    async fn sync_nft_text(
        &mut self,
        old: Option<[nft::Rendered; 2]>,
        new: [nft::Rendered; 2],
    ) -> Result<bool, String> {
        let (text, full) = match &old {
            Some(old) => {
                let parts: Vec<String> = old
                    .iter()
                    .zip(&new)
                    .filter_map(|(o, n)| nft::diff_text(o, n))
                    .collect();
                if parts.is_empty() {
                    self.nft_last = Some(new);
                    return Ok(false);
                }
                (parts.concat(), false)
            }
            None => (new.iter().map(nft::full_text).collect::<String>(), true),
        };
        match run_with_stdin("nft", &["-f", "-"], &text).await {
            Ok(()) => {
                self.nft_last = Some(new);
                Ok(full)
            }
            Err(e) => {
                self.nft_last = None;
                Err(e)
            }
        }
    }

    async fn sync_iptables(&mut self, services: &ServiceMap) -> Result<bool, String> {
        let new = [Family::V4, Family::V6].map(|f| iptables::render(f, services, &self.opts));
        if self.ipt_last.as_ref() == Some(&new) {
            return Ok(false);
        }
        for (i, r) in new.iter().enumerate() {
            let prev = self.ipt_last.as_ref().map(|l| &l[i]);
            if prev == Some(r) {
                continue;
            }
            let (restore, bin) = ipt_tools(r.family);
            let text = iptables::restore_text(r, prev);
            let applied = async {
                run_with_stdin(restore, &["--noflush", "-w"], &text).await?;
                for (table, builtin, rule) in iptables::JUMPS {
                    let args: Vec<&str> = rule.split(' ').collect();
                    let mut check = vec!["-w", "-t", table, "-C", builtin];
                    check.extend(&args);
                    if run(bin, &check).await.is_err() {
                        let mut insert = vec!["-w", "-t", table, "-I", builtin, "1"];
                        insert.extend(&args);
                        run(bin, &insert).await?;
                    }
                }
                Ok::<(), String>(())
            }
            .await;
            if let Err(e) = applied {
                self.ipt_last = None;
                return Err(e);
            }
        }
        self.ipt_last = Some(new);
        Ok(true)
    }

    /// Stops what this syncer runs (the userspace proxy) and removes
    /// everything node mode programmed with its backend.
    /// Removes the rules. The userspace backend first lets its proxied
    /// connections finish for up to `drain`; the kernel backends' tables go
    /// at once.
    pub async fn shutdown(&mut self, drain: std::time::Duration) -> Result<(), String> {
        if let Some(u) = &mut self.userspace {
            u.shutdown(drain).await;
        }
        Syncer::cleanup(self.backend).await
    }

    /// Removes everything node mode programmed with this backend.
    pub async fn cleanup(backend: Backend) -> Result<(), String> {
        match backend {
            Backend::Userspace => crate::userspace::cleanup().await,
            Backend::Nftables => {
                // Over netlink (no nft needed); `nft -f` if the kernel refuses.
                let sent = crate::netlink::Conn::open().and_then(|mut c| {
                    let mut b = c.batch();
                    nft::cleanup_batch(&mut b);
                    c.send(b)
                });
                match sent {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "netlink cleanup refused; using nft");
                        run_with_stdin("nft", &["-f", "-"], &nft::cleanup_text()).await
                    }
                }
            }
            Backend::Iptables => {
                for f in [Family::V4, Family::V6] {
                    let (restore, bin) = ipt_tools(f);
                    for (table, builtin, rule) in iptables::JUMPS {
                        let args: Vec<&str> = rule.split(' ').collect();
                        let mut del = vec!["-w", "-t", table, "-D", builtin];
                        del.extend(&args);
                        while run(bin, &del).await.is_ok() {}
                    }
                    let save = format!("{bin}-save");
                    let mut chains: [BTreeSet<String>; 2] = Default::default();
                    for (i, table) in ["nat", "filter"].iter().enumerate() {
                        let saved = run(&save, &["-t", table]).await.unwrap_or_default();
                        for line in saved.lines() {
                            if let Some(rest) = line.strip_prefix(":BOSUN-")
                                && let Some(name) = rest.split_whitespace().next()
                            {
                                chains[i].insert(format!("BOSUN-{name}"));
                            }
                        }
                    }
                    let nat: Vec<String> = chains[0].iter().cloned().collect();
                    let filter: Vec<String> = chains[1].iter().cloned().collect();
                    if nat.is_empty() && filter.is_empty() {
                        continue;
                    }
                    run_with_stdin(
                        restore,
                        &["--noflush", "-w"],
                        &iptables::cleanup_text(&nat, &filter),
                    )
                    .await?;
                }
                Ok(())
            }
        }
    }
}

/// (`*-restore`, the rule tool) for a family.
fn ipt_tools(f: Family) -> (&'static str, &'static str) {
    match f {
        Family::V4 => ("iptables-restore", "iptables"),
        Family::V6 => ("ip6tables-restore", "ip6tables"),
    }
}

//! `bosun`: the one binary. Flags are parsed here; the work is in `app`
//! (running a proxy from a config path) and `demo` (the live canary).

mod app;
mod capture;
mod control;
mod demo;
mod inject;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bosun",
    version,
    about = "Bosun service mesh: sidecar, gateway and node (kube-proxy) modes driven by Istio and Kubernetes config"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Next to a workload: outbound listener (HTTP by Host, TCP per service port; with
    /// --capture, by original destination) and inbound to the app.
    Sidecar,
    /// Ingress gateway: listens on the ports of the Gateway resources selecting --labels.
    Gateway,
    /// In place of kube-proxy: Services and EndpointSlices programmed into nftables (tables
    /// `ip bosun`, `ip6 bosun`), iptables (chains BOSUN-*) or a userspace proxy. Needs root
    /// (CAP_NET_ADMIN).
    Node,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NodeBackend {
    /// One verdict map per address kind, partial syncs (kube-proxy's nftables mode).
    Nftables,
    /// iptables-restore of Bosun's chains, for hosts without nftables.
    Iptables,
    /// An in-process TCP proxy on each service address (local routes on lo); the last resort.
    Userspace,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// sidecar, gateway or node.
    #[arg(long, value_enum, default_value = "sidecar")]
    mode: Mode,
    /// A YAML file or a directory of YAML files (Istio and Kubernetes resources); watched.
    #[arg(long, conflicts_with = "xds", required_unless_present_any = ["xds", "cleanup"])]
    config: Option<PathBuf>,
    /// Control service xDS address(es), host:port[,host:port...]: config over ADS instead of
    /// files; on failure the proxy moves to the next replica. https://host:port: over TLS,
    /// the control checked against --ca-root-cert and the proxy authenticated by its workload
    /// certificate (from that CA with --token-file, or --cert-dir).
    #[arg(long)]
    xds: Option<String>,
    /// The node id announced to the control service (default: <mode>~<workload>~<namespace>;
    /// node mode: node~<node-name>).
    #[arg(long)]
    node_id: Option<String>,
    /// Use state-of-the-world ADS instead of incremental (delta).
    #[arg(long)]
    xds_sotw: bool,
    /// This proxy's workload labels, k=v,... (gateways select on them; sourceLabels match them).
    /// Default: istio=ingressgateway in gateway mode, none in sidecar mode.
    #[arg(long)]
    labels: Option<String>,
    /// This proxy's labels from a file in the Kubernetes downward API's format
    /// (`key="value"` lines, `metadata.labels`), as the injected sidecar reads them.
    #[arg(long, conflicts_with = "labels")]
    labels_file: Option<PathBuf>,
    /// Sidecar: the status listener(s), comma-separated (Istio's 15020 and 15021):
    /// /healthz/ready, the app's probes under /app-health/ (from ISTIO_KUBE_APP_PROBERS,
    /// as `bosun inject` writes them) and /stats/prometheus; reachable from outside the pod
    #[arg(long, value_delimiter = ',')]
    status_address: Vec<SocketAddr>,
    /// On SIGTERM, keep serving (the app may still be sending) until no connection is
    /// left or --termination-grace has passed, then drain (Istio's
    /// EXIT_ON_ZERO_ACTIVE_CONNECTIONS)
    #[arg(long)]
    exit_on_zero_active_connections: bool,
    /// With --exit-on-zero-active-connections: the longest wait before the drain
    /// (keep it under the pod's terminationGracePeriodSeconds minus --drain-duration)
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    termination_grace: Duration,
    /// This proxy's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// This proxy's locality, region/zone/subzone (Istio's istio-locality): with
    /// outlierDetection, endpoints in the same zone, then region, are preferred and failed
    /// over from. Sent to the control service as the xDS node's locality.
    #[arg(long, default_value = "")]
    locality: String,
    /// Workload name reported as source_workload in metrics.
    #[arg(long, default_value = "")]
    workload: String,
    /// Admin listener: /ready, /healthz, /stats/prometheus, /config_dump.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: SocketAddr,
    /// Sidecar: the outbound listener (plain HTTP, routed by Host). TCP service
    /// ports get a listener on the same IP at the service's port.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_address: SocketAddr,
    /// Sidecar: the inbound listener, forwarding to --app-port on 127.0.0.1 (with --capture:
    /// to the port the client dialled).
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_address: SocketAddr,
    /// Sidecar: the local application's port; no inbound listener without it.
    #[arg(long)]
    app_port: Option<u16>,
    /// Sidecar: the pod's traffic is redirected here by `bosun capture`:
    /// outbound connections are routed by their original destination
    /// (ClusterIP or endpoint, then Host, SNI or sniffed protocol; unknown
    /// ones by outboundTrafficPolicy), inbound ones go to the app at the
    /// port the client dialled (--app-port is not used)
    #[arg(long)]
    capture: bool,
    /// Gateway: the IP Gateway server ports bind on (a server's `bind` overrides it).
    #[arg(long, default_value = "0.0.0.0")]
    gateway_address: String,
    /// Write a JSON access log line per request to stdout.
    #[arg(long)]
    access_log: bool,
    /// Workers (default: one per core), each a thread with its own event loop that accepts
    /// on its own socket of every listener (SO_REUSEPORT) and serves its connections start
    /// to end; xDS, admin and DNS run on the main thread. 1 = one thread, one event loop for everything
    #[arg(long)]
    workers: Option<usize>,
    /// Node mode: this node's name; endpoints whose nodeName matches are local
    /// (externalTrafficPolicy/internalTrafficPolicy Local). Default: the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// Node mode: how rules reach the kernel.
    #[arg(long, value_enum, default_value = "nftables")]
    backend: NodeBackend,
    /// Node mode: the pod CIDR, one per family (v4[,v6]); cluster-IP traffic from outside it
    /// is masqueraded.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Node mode: remove every rule node mode programmed (with --backend) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Node mode: kube-proxy's health check, /healthz.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_address: SocketAddr,
    /// Node mode: Prometheus metrics, /metrics (kubeproxy_* names).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_address: SocketAddr,
    /// A request head must arrive within this of accept (the first request) or of its first
    /// byte (HTTP/1.1 keep-alive); else the connection is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_head_timeout: Duration,
    /// A downstream connection with no request in flight and none started for this long is
    /// closed (HTTP/2: GOAWAY), after one to two idle timeouts. HTTP/1.1 waits for a head at most
    /// --request-head-timeout as well.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Largest request head (request line and headers, HTTP/1.1; header list, HTTP/2); over
    /// it: 431.
    #[arg(long, default_value_t = 60 * 1024)]
    max_request_head_bytes: usize,
    /// Most request headers (HTTP/1.1); over it: 431.
    #[arg(long, default_value_t = 100)]
    max_request_headers: usize,
    /// Concurrent downstream connections per listener; at the limit the listener stops
    /// accepting until one closes. Keep the file descriptor limit above twice the sum.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Concurrent streams per downstream HTTP/2 connection.
    #[arg(long, default_value_t = 1024)]
    max_concurrent_streams: u32,
    /// An upstream that sends nothing for this long (before or during its response) fails
    /// the request: 504 with flag SI (Envoy's stream idle timeout).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    stream_idle_timeout: Duration,
    /// Idle upstream keep-alive connections are closed after this.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    upstream_idle_timeout: Duration,
    /// Upstream connect timeout (503 UF).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// On SIGTERM, SIGINT or POST /quitquitquit: how long in-flight requests, upgrades and TCP
    /// streams get to finish (Istio's terminationDrainDuration). A second signal exits at once.
    /// Node mode: how long the userspace backend's connections get before its routes go.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_duration: Duration,
    /// Workload certificate from files with Istio's file-mounted names (cert-chain.pem, key.pem,
    /// root-cert.pem), reloaded when they change: mTLS without a CA (cert-manager, your own PKI).
    #[arg(long, conflicts_with = "ca_address")]
    cert_dir: Option<PathBuf>,
    /// The CA to ask for a workload certificate (Bosun's control, or istiod), https://host:port.
    /// Default: the --xds address when it is https://.
    #[arg(long)]
    ca_address: Option<String>,
    /// PEM roots the control service's certificate must chain to (Istio's istio-ca-root-cert);
    /// needed for an https:// --xds or --ca-address. They are trusted for mesh peers too.
    #[arg(long)]
    ca_root_cert: Option<PathBuf>,
    /// The bearer token the CA checks: a projected ServiceAccount token (audience istio-ca) or a
    /// bootstrap token from the control's --ca-tokens file. Read at each request.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The service account this workload runs as; its SPIFFE ID is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Workload certificate lifetime asked of the CA (renewed at 40-60% of it).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// The DNS name the control service's certificate is checked for.
    #[arg(long, default_value = "bosun-control.istio-system.svc")]
    control_name: String,
    /// How often DNS ServiceEntry names are looked up again (Istio's meshConfig
    /// dnsRefreshRate, 60s); a cluster's own shorter interval wins.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    dns_refresh_rate: Duration,
}

impl ProxyArgs {
    fn limits(&self) -> bosun_proxy::Limits {
        bosun_proxy::Limits {
            request_head_timeout: self.request_head_timeout,
            idle_timeout: self.idle_timeout,
            max_request_head_bytes: self.max_request_head_bytes,
            max_request_headers: self.max_request_headers,
            max_connections: self.max_connections.max(1),
            max_concurrent_streams: self.max_concurrent_streams,
            stream_idle_timeout: self.stream_idle_timeout,
            upstream_idle_timeout: self.upstream_idle_timeout,
            connect_timeout: self.connect_timeout,
            dns_refresh_rate: self.dns_refresh_rate.max(Duration::from_millis(100)),
        }
    }
}

/// `250ms`, `5s`, `2m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

/// SIGTERM and SIGINT, registered once at start so none is missed.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (sidecar or gateway), configured from files (--config) or a control service
    /// (--xds); or node mode (--mode node), programming Services into the kernel in place of kube-proxy.
    Proxy(Box<ProxyArgs>),
    /// A live canary on loopback: backends, a control service and a gateway; weights shifted 90/10 → 50/50 → 0/100.
    Demo {
        /// Seconds of traffic per weight step.
        #[arg(long, default_value_t = 5)]
        step_seconds: u64,
        /// Concurrent client connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
    },
    /// The control service: reads the config, validates it, and pushes it to proxies over xDS.
    Control(Box<control::ControlArgs>),
    /// In a pod's network namespace (as an init container): redirect the app's TCP into its
    /// sidecar (outbound to 15001, inbound to 15006) with nftables or iptables; --cleanup
    /// removes it.
    Capture(Box<capture::CaptureArgs>),
    /// Add the sidecar to workloads, as `istioctl kube-inject` does: Pods, Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs in multi-document YAML in,
    /// the same out with the init container, the bosun-proxy container and probes rewritten.
    Inject(Box<inject::InjectArgs>),
    /// Wait until a URL answers 200 (the injected postStart hook: the app starts once its
    /// proxy is ready, Istio's holdApplicationUntilProxyStarts).
    Wait {
        /// The URL polled every 500 ms (plain http://host:port/path).
        #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
        url: String,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Each proxy connected to a control service, its ACKed version and last NACK.
    Status {
        /// The control service's admin address.
        #[arg(long, default_value = "127.0.0.1:15014")]
        control: String,
    },
    /// Check a config file or directory offline; exit non-zero on any error.
    Validate { path: PathBuf },
    /// A test backend: answers every HTTP request with "NAME CLIENT-IP".
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
}

fn parse_labels(s: &str) -> anyhow::Result<bosun_control::model::Labels> {
    let mut out = bosun_control::model::Labels::new();
    for kv in s.split(',').filter(|x| !x.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--labels: {kv:?} is not k=v"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// `Some(1)`: one thread (tokio's current-thread scheduler: no work
/// stealing, no cross-thread wake-ups); otherwise a work-stealing pool of
/// `workers` threads (the control service, the demo).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(1) => {
            let mut b = tokio::runtime::Builder::new_current_thread();
            // A thread for blocking work (config file reads) goes soon after:
            // the process is then one thread, and the kernel's file table
            // is not shared (no reference taken and dropped on the socket
            // at every read and write, as for an nginx worker).
            b.thread_keep_alive(std::time::Duration::from_secs(1));
            b
        }
        Some(w) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(w.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own lines; its components' logs show warnings
    // only (RUST_LOG still overrides).
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let result = match cli.command {
        Command::Proxy(args) if matches!(args.mode, Mode::Node) => runtime(Some(1))
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(app::run_node(*args))),
        // The main thread's event loop; with more than one worker the
        // data plane runs on the workers' own (see bosun_proxy::workers).
        Command::Proxy(args) => runtime(Some(1))
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(app::run_proxy(*args))),
        Command::Demo {
            step_seconds,
            connections,
        } => runtime(None)
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(demo::run(step_seconds, connections))),
        Command::Validate { path } => app::validate(&path),
        Command::Echo { listen, name } => runtime(Some(1))
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(demo::echo(listen, name))),
        Command::Control(args) => runtime(None)
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(control::run(*args))),
        Command::Status { control } => runtime(Some(1))
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(control::status(&control))),
        Command::Capture(args) => capture::run(&args),
        Command::Inject(args) => inject::run(&args),
        Command::Wait { url, timeout } => runtime(Some(1))
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(inject::wait(&url, timeout))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bosun: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_take_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "5 min", "-1s", "1.5s", "10d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

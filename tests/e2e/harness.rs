//! Test harness: real `bosun` processes, real backends on 127.0.0.1, real clients.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A port for a listener the proxy will bind later. Taken below Linux's
/// ephemeral range (32768+), so that no outgoing connection of another test
/// can grab it between this check and the proxy's bind.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = (std::process::id() % 40) as u16 * 300;
    loop {
        let p = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if StdListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "bosun-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `bosun proxy` process, killed on drop.
pub struct Bosun {
    child: Child,
    pub admin: SocketAddr,
    pub dir: TempDir,
    pub log: PathBuf,
}

impl Bosun {
    /// `bosun proxy --mode gateway` on a directory holding `yaml`.
    pub async fn gateway(yaml: &str) -> Bosun {
        Bosun::start(
            &["--mode", "gateway", "--gateway-address", "127.0.0.1"],
            yaml,
        )
        .await
    }

    pub async fn start(extra: &[&str], yaml: &str) -> Bosun {
        let dir = TempDir::new("proxy");
        let cfg = dir.0.join("config");
        std::fs::create_dir_all(&cfg).expect("mkdir config");
        std::fs::write(cfg.join("mesh.yaml"), yaml).expect("write config");
        let cfg_arg = cfg.to_str().expect("utf8").to_string();
        let mut args = vec!["--config", cfg_arg.as_str()];
        args.extend_from_slice(extra);
        let b = Bosun::spawn(dir, &args);
        b.wait_ready().await;
        b
    }

    /// A proxy fed by a control service over xDS (`--xds`); not waited for.
    pub fn with_xds(xds: SocketAddr, extra: &[&str]) -> Bosun {
        Bosun::with_xds_list(&xds.to_string(), extra)
    }

    /// As `with_xds`, with `host:port,host:port` of several control replicas.
    pub fn with_xds_list(xds: &str, extra: &[&str]) -> Bosun {
        let mut args = vec!["--xds", xds];
        args.extend_from_slice(extra);
        Bosun::spawn(TempDir::new("xds-proxy"), &args)
    }

    fn spawn(dir: TempDir, args: &[&str]) -> Bosun {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.0.join("bosun.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let outf = std::fs::File::create(dir.0.join("stdout.log")).expect("stdout file");
        // Two workers unless the test asks for a count of its own.
        let workers: &[&str] = if args.contains(&"--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_bosun"))
            .arg("proxy")
            .args(["--admin-address", &admin.to_string()])
            .args(workers)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(outf)
            .stderr(logf)
            .spawn()
            .expect("spawn bosun");
        Bosun {
            child,
            admin,
            dir,
            log,
        }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.0.join("config")
    }

    /// What the proxy wrote on stdout (the access log).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stdout.log")).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, _)) = admin_get(self.admin, "/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bosun not ready; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Replaces the config (atomically, as an editor or a ConfigMap would).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.config_dir().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.config_dir().join("mesh.yaml")).expect("rename");
    }

    pub async fn version(&self) -> String {
        let (_, body) = admin_get(self.admin, "/config_dump")
            .await
            .expect("config_dump");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["version"].as_str().unwrap_or("").to_string()
    }

    /// Writes a config and waits until the proxy serves it.
    pub async fn reconfigure(&self, yaml: &str) {
        let before = self.version().await;
        self.write_config(yaml);
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.version().await == before {
            assert!(
                Instant::now() < deadline,
                "config not applied within 3 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, within)
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/stats/prometheus")
            .await
            .expect("metrics")
            .1
    }
}

impl Drop for Bosun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let c = client();
    let resp = c
        .get(
            format!("http://{addr}{path}")
                .parse()
                .map_err(|e| format!("{e}"))?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// Which backend answered (from the echo backend's JSON).
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap_or("").to_string()
    }
}

/// One request through the proxy: `host` sets the Host header.
pub async fn request(
    c: &HttpClient,
    method: &str,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = http::Request::builder()
        .method(method)
        .uri(url)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).expect("request");
    match c.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Reply {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            }
        }
        Err(e) => Reply {
            status: 0,
            headers: http::HeaderMap::new(),
            body: format!("client error: {e}"),
        },
    }
}

pub async fn get(c: &HttpClient, url: &str, host: &str) -> Reply {
    request(c, "GET", url, host, &[]).await
}

/// An HTTP/1.1 + h2c backend that answers with JSON describing the request.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

pub async fn backend(name: &str) -> Backend {
    backend_with_delay(name, Duration::ZERO).await
}

pub async fn backend_with_delay(name: &str, delay: Duration) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let name: Arc<str> = Arc::from(name);
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, hits) = (name.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (name, hits) = (name.clone(), hits.clone());
                        async move {
                            hits.fetch_add(1, Ordering::Relaxed);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut headers = HashMap::new();
                            for (k, v) in req.headers() {
                                headers.insert(
                                    k.as_str().to_string(),
                                    v.to_str().unwrap_or("").to_string(),
                                );
                            }
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let j = serde_json::json!({
                                "backend": &*name,
                                "method": parts.method.as_str(),
                                "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                                "version": format!("{:?}", parts.version),
                                "headers": headers,
                                "body_len": body.len(),
                            });
                            let resp = http::Response::builder()
                                .header("x-backend", &*name)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(j.to_string())))
                                .expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// A ServiceEntry (STATIC) with labelled endpoints: (address, labels "k=v,...").
pub fn service_entry(
    name: &str,
    ns: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(SocketAddr, &str)],
) -> String {
    let mut eps = String::new();
    for (addr, labels) in endpoints {
        let labels: Vec<String> = labels
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("k=v");
                format!("{k}: {v}")
            })
            .collect();
        eps.push_str(&format!(
            "  - address: {}\n    ports: {{port: {}}}\n    labels: {{{}}}\n",
            addr.ip(),
            addr.port(),
            labels.join(", ")
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}.{ns}.svc.cluster.local]\n  resolution: STATIC\n  ports:\n  - {{number: {port}, name: port, protocol: {protocol}}}\n  endpoints:\n{eps}---\n"
    )
}

/// A Gateway selecting the default gateway labels, HTTP on `port`, all hosts.
pub fn gateway(ns: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: {ns}}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n---\n"
    )
}

/// A gateway on `port` routing every host to one STATIC endpoint `be`
/// (service `site` in namespace `web`).
pub fn gateway_to(port: u16, be: SocketAddr) -> String {
    gateway_routes_to(port, be, "  - route: [{destination: {host: site}}]\n")
}

/// As `gateway_to`, with the VirtualService's `http:` routes given (YAML,
/// two-space indented list items, to `host: site`).
pub fn gateway_routes_to(port: u16, be: SocketAddr, http: &str) -> String {
    let mut y = gateway("web", port);
    y.push_str(&service_entry(
        "site",
        "web",
        80,
        "HTTP",
        &[(be, "app=site")],
    ));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: site, namespace: web}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n");
    y.push_str(http);
    y
}

pub fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i.to_string()).or_insert(0) += 1;
    }
    m
}

/// The value of one Prometheus series whose labels contain every `needle`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes back every byte read until the peer closes.
pub async fn echo_bytes(s: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A running `bosun control` process, killed on drop.
pub struct Control {
    child: Child,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Control {
    /// Starts a control service on `dir` (its YAML is watched).
    pub async fn start(dir: &std::path::Path, xds: Option<SocketAddr>) -> Control {
        let d = dir.to_str().expect("utf8").to_string();
        Control::start_with(&["--config-dir", &d], dir, xds, &[]).await
    }

    /// As `start`, with more flags.
    pub async fn start_args(dir: &std::path::Path, extra: &[&str]) -> Control {
        let d = dir.to_str().expect("utf8").to_string();
        let mut args = vec!["--config-dir", d.as_str()];
        args.extend_from_slice(extra);
        Control::start_with(&args, dir, None, &[]).await
    }

    /// Starts a control service on the Kubernetes API named by `kubeconfig`.
    pub async fn start_kubernetes(kubeconfig: &std::path::Path, logs: &std::path::Path) -> Control {
        let k = kubeconfig.to_str().expect("utf8");
        Control::start_with(&["--kubernetes"], logs, None, &[("KUBECONFIG", k)]).await
    }

    /// As `start_kubernetes`, with more flags.
    pub async fn start_kubernetes_args(
        kubeconfig: &std::path::Path,
        logs: &std::path::Path,
        extra: &[&str],
    ) -> Control {
        let k = kubeconfig.to_str().expect("utf8");
        let mut args = vec!["--kubernetes"];
        args.extend_from_slice(extra);
        Control::start_with(&args, logs, None, &[("KUBECONFIG", k)]).await
    }

    /// Starts a control service reading etcd at `url`, keys under `prefix`.
    pub async fn start_etcd(url: &str, prefix: &str, logs: &std::path::Path) -> Control {
        Control::start_with(&["--etcd", url, "--etcd-prefix", prefix], logs, None, &[]).await
    }

    async fn start_with(
        source: &[&str],
        dir: &std::path::Path,
        xds: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> Control {
        let xds =
            xds.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().expect("addr"));
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        static N: AtomicU64 = AtomicU64::new(0);
        let log = dir.with_extension(format!("control{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(env!("CARGO_BIN_EXE_bosun"))
            .arg("control")
            .args(source)
            .envs(env.iter().copied())
            .args([
                "--xds-addr",
                &xds.to_string(),
                "--admin-address",
                &admin.to_string(),
            ])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn control");
        let c = Control {
            child,
            xds,
            admin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(admin_get(c.admin, "/ready").await, Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "control not ready: {}",
                c.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/debug/proxies`: what `bosun status` prints.
    pub async fn proxies(&self) -> Vec<serde_json::Value> {
        let (_, body) = admin_get(self.admin, "/debug/proxies")
            .await
            .expect("status");
        serde_json::from_str(&body).expect("json")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, within)
    }
}

fn wait_child(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Writes `yaml` as the one file of a config directory (atomically).
pub fn write_dir(dir: &std::path::Path, yaml: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let tmp = dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, dir.join("mesh.yaml")).expect("rename");
}

/// Waits until `f` holds, or panics with `what` after 5 s.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A real etcd (Debian's etcd-server) on loopback, killed on drop.
pub struct Etcd {
    child: Child,
    pub url: String,
    _dir: TempDir,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let dir = TempDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                dir.0.join("data").to_str().expect("utf8"),
            ])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(std::fs::File::create(dir.0.join("etcd.log")).expect("log"))
            .stderr(std::fs::File::create(dir.0.join("etcd.err")).expect("log"))
            .spawn()
            .expect("etcd is installed (test.sh installs etcd-server)");
        let e = Etcd {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = client_post(&format!("{}/v3/kv/range", e.url), r#"{"key":"AA=="}"#)
                .await
                .is_ok();
            if ok {
                return e;
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Puts one key through etcd's v3 JSON gateway.
    pub async fn put(&self, key: &str, value: &str) {
        let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
        client_post(&format!("{}/v3/kv/put", self.url), &body.to_string())
            .await
            .expect("etcd put");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client_post(url: &str, body: &str) -> Result<String, String> {
    let req = http::Request::post(url)
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let b = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `bosun validate PATH`: whether it passed, and what it printed.
pub fn validate(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bosun"))
        .args(["validate", path.to_str().expect("utf8")])
        .output()
        .expect("run bosun validate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// curl with `-s -S --max-time 5` and `args`: (succeeded, stdout + stderr).
pub fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

//! Node mode in network namespaces: a client, a node and three backend
//! "pods", joined by veth pairs, with no route out. `bosun proxy --mode
//! node` runs in the node namespace and programs real nftables (or
//! iptables) rules there; curl in the client namespace is the client.
//! Everything is torn down on drop, also when a test fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces, processes and a config directory, removed on drop.
struct Topo {
    node: String,
    client: String,
    all: Vec<String>,
    procs: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for p in &mut self.procs {
            // SIGTERM first: node mode removes its rules on the way out.
            let _ = Command::new("kill").arg(p.id().to_string()).status();
        }
        let by = Instant::now() + Duration::from_secs(3);
        for p in &mut self.procs {
            while Instant::now() < by && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in &self.all {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NODE_IP: &str = "10.0.0.1";
const CLIENT_IP: &str = "10.0.0.2";
const NODE_IP6: &str = "fd00::1";
const CLIENT_IP6: &str = "fd00::2";

impl Topo {
    /// client (10.0.0.2) — node (10.0.0.1, 10.1.k.1) — backend k (10.1.k.2:8080).
    fn new(backends: usize) -> Topo {
        let tag = format!(
            "bsn{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("{tag}-node");
        let client = format!("{tag}-cl");
        let dir = std::env::temp_dir().join(format!("{tag}-cfg"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut t = Topo {
            node: node.clone(),
            client: client.clone(),
            all: vec![],
            procs: vec![],
            dir,
        };
        for n in [&node, &client] {
            ip(&["netns", "add", n]);
            t.all.push(n.clone());
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &client, "link", "add", "eth0", "type", "veth", "peer", "name", "c0", "netns",
            &node,
        ]);
        ip(&[
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &client, "link", "set", "eth0", "up"]);
        ip(&["-n", &client, "route", "add", "default", "via", NODE_IP]);
        // IPv6 beside IPv4 (nodad: usable at once).
        ip(&[
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&[
            "-n", &client, "-6", "route", "add", "default", "via", NODE_IP6,
        ]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "c0",
        ]);
        ip(&["-n", &node, "link", "set", "c0", "up"]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "c0",
            "nodad",
        ]);
        let sysctl = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ])
            .status()
            .expect("sysctl");
        assert!(sysctl.success());
        for k in 1..=backends {
            let b = format!("{tag}-b{k}");
            ip(&["netns", "add", &b]);
            t.all.push(b.clone());
            ip(&["-n", &b, "link", "set", "lo", "up"]);
            let peer = format!("b{k}");
            ip(&[
                "-n", &b, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
                &node,
            ]);
            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("10.1.{k}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &b, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("fd00:1:{k}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&[
                "-n",
                &b,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:1:{k}::1"),
            ]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("fd00:1:{k}::1/64"),
                "dev",
                &peer,
                "nodad",
            ]);
            ip(&[
                "-n",
                &b,
                "route",
                "add",
                "default",
                "via",
                &format!("10.1.{k}.1"),
            ]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.1.{k}.1/24"),
                "dev",
                &peer,
            ]);
            ip(&["-n", &node, "link", "set", &peer, "up"]);
            let child = Command::new("ip")
                .args(["netns", "exec", &b, env!("CARGO_BIN_EXE_bosun"), "echo"])
                .args(["--listen", "[::]:8080", "--name", &format!("b{k}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start echo backend");
            t.procs.push(child);
        }
        t
    }

    fn write(&self, yaml: &str) {
        crate::harness::write_dir(&self.dir, yaml);
    }

    fn start_node(&mut self, backend: &str) {
        let dir = self.dir.display().to_string();
        self.start_node_with(backend, &["--config", &dir]);
    }

    /// A control service in the node namespace, on the config directory.
    fn start_control(&mut self) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node,
                env!("CARGO_BIN_EXE_bosun"),
                "control",
            ])
            .arg("--config-dir")
            .arg(&self.dir)
            .args([
                "--xds-addr",
                "127.0.0.1:15010",
                "--admin-address",
                "127.0.0.1:15014",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start control");
        self.procs.push(child);
    }

    fn start_node_with(&mut self, backend: &str, source: &[&str]) {
        let log = std::fs::File::create(self.dir.with_extension("log")).expect("log");
        // "nftables-text": nftables programmed through `nft -f` (the
        // fallback when the kernel refuses Bosun's netlink batches).
        let (backend, text) = match backend {
            "nftables-text" => ("nftables", true),
            b => (b, false),
        };
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node,
                env!("CARGO_BIN_EXE_bosun"),
                "proxy",
            ])
            .args([
                "--mode",
                "node",
                "--node-name",
                "node-a",
                "--backend",
                backend,
            ])
            .args(if source.contains(&"--cluster-cidr") {
                &[][..]
            } else {
                &["--cluster-cidr", "10.1.0.0/16"][..]
            })
            .args(source)
            .envs(text.then_some(("BOSUN_NODE_NFT_TEXT", "1")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start node mode");
        self.procs.push(child);
        let by = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.node,
                    "curl",
                    "-sf",
                    "http://127.0.0.1:10256/healthz",
                ])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < by,
                "node mode did not sync: {}",
                std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command in the node namespace: (success, stdout + stderr).
    fn node_cmd(&self, cmd: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .args(cmd)
            .output()
            .expect("run in node namespace");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Whether no Bosun rule is left in the node namespace (either backend).
    fn rules_gone(&self) -> bool {
        let (nft_table, _) = self.node_cmd(&["nft", "list", "table", "ip", "bosun"]);
        let (_, saved) = self.node_cmd(&["iptables-save"]);
        let (_, saved6) = self.node_cmd(&["ip6tables-save"]);
        let (nft6, _) = self.node_cmd(&["nft", "list", "table", "ip6", "bosun"]);
        let (_, routes) = self.node_cmd(&["ip", "route", "show", "table", "local", "proto", "249"]);
        !nft_table
            && !nft6
            && !saved.contains("BOSUN")
            && !saved6.contains("BOSUN")
            && routes.trim().is_empty()
    }

    /// SIGTERM to node mode (the last process started) and wait for it.
    fn stop_node(&mut self) {
        let Some(mut p) = self.procs.pop() else {
            return;
        };
        let _ = Command::new("kill").arg(p.id().to_string()).status();
        let by = Instant::now() + Duration::from_secs(5);
        while Instant::now() < by && matches!(p.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = p.kill();
        let _ = p.wait();
    }

    /// `n` requests from the client, each on a new connection: (body lines, curl's exit code).
    fn curl(&self, url: &str, n: usize) -> (Vec<String>, i32) {
        let target = if n > 1 {
            format!("{url}?[1-{n}]")
        } else {
            url.to_string()
        };
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.client,
                "curl",
                "-s",
                "--max-time",
                "20",
            ])
            .args(["--connect-timeout", "3", "-H", "Connection: close", &target])
            .output()
            .expect("curl");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        (lines, out.status.code().unwrap_or(-1))
    }

    /// How many of `n` requests each backend served.
    fn spread(&self, url: &str, n: usize) -> BTreeMap<String, usize> {
        let (lines, _) = self.curl(url, n);
        let mut m = BTreeMap::new();
        for l in lines {
            let name = l.split_whitespace().next().unwrap_or("").to_string();
            *m.entry(name).or_default() += 1;
        }
        m
    }

    /// Waits until `f` holds (rules follow a config change asynchronously).
    fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let by = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < by, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn endpoint(k: usize, node: &str, ready: bool) -> String {
    format!(
        "  - addresses: [10.1.{k}.2]\n    conditions: {{ready: {ready}}}\n    nodeName: {node}\n    targetRef: {{kind: Pod, name: b{k}, namespace: shop}}\n"
    )
}

fn service(name: &str, ip: &str, extra: &str, eps: &str) -> String {
    let eps = if eps.is_empty() { "  []\n" } else { eps };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n{extra}---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}---\n"
    )
}

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: b1, namespace: shop, labels: {app: web, version: v1}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: b2, namespace: shop, labels: {app: web, version: v2}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: b3, namespace: shop, labels: {app: web, version: v2}}\n---\n";

fn config(web_eps: &str) -> String {
    let all = format!(
        "{}{}{}",
        endpoint(1, "node-a", true),
        endpoint(2, "node-a", true),
        endpoint(3, "node-b", true)
    );
    let mut y = String::from(PODS);
    // Load balancers: one admitting the client's range, one not.
    for (name, ip, lb, range) in [
        ("lb-ok", "10.96.0.15", "203.0.113.7", "10.0.0.0/24"),
        ("lb-deny", "10.96.0.16", "203.0.113.8", "10.9.0.0/24"),
    ] {
        y += &service(
            name,
            ip,
            &format!(
                "  type: LoadBalancer\n  loadBalancerIP: {lb}\n  loadBalancerSourceRanges: [{range}]\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
            ),
            &endpoint(1, "node-a", true),
        );
    }
    y += &service(
        "web",
        "10.96.0.10",
        "  type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
        web_eps,
    );
    y += &service(
        "local",
        "10.96.0.11",
        "  type: NodePort\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]\n",
        &all,
    );
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: shop}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{name: http, port: 80}]\n---\n";
    y += &service(
        "sticky",
        "10.96.0.13",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        &all,
    );
    y += &service(
        "canary",
        "10.96.0.14",
        "  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        &format!(
            "{}{}",
            endpoint(1, "node-a", true),
            endpoint(2, "node-a", true)
        ),
    );
    y += "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: canary, namespace: shop}\nspec:\n  host: canary.shop.svc.cluster.local\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\n";
    y += "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: canary, namespace: shop}\nspec:\n  hosts: [canary.shop.svc.cluster.local]\n  tcp:\n  - route:\n    - {destination: {host: canary.shop.svc.cluster.local, subset: v1}, weight: 80}\n    - {destination: {host: canary.shop.svc.cluster.local, subset: v2}, weight: 20}\n";
    y
}

fn suite(backend: &str) {
    let mut t = Topo::new(3);
    let all = format!(
        "{}{}{}",
        endpoint(1, "node-a", true),
        endpoint(2, "node-a", true),
        endpoint(3, "node-b", true)
    );
    t.write(&config(&all));
    t.start_node(backend);

    // ClusterIP spreads over the three backends.
    let m = t.spread("http://10.96.0.10/", 300);
    assert_eq!(m.values().sum::<usize>(), 300, "{m:?}");
    for b in ["b1", "b2", "b3"] {
        assert!(m.get(b).copied().unwrap_or(0) >= 50, "{backend}: {m:?}");
    }

    // A bad config is refused with file, resource and field named, and the
    // rules in place keep serving.
    t.write(&config(&all).replace("sessionAffinity: ClientIP", "sessionAffinity: Sticky"));
    t.until("the refusal is logged", || {
        std::fs::read_to_string(t.dir.with_extension("log"))
            .unwrap_or_default()
            .contains("Service/shop/sticky: spec.sessionAffinity")
    });
    let m = t.spread("http://10.96.0.13/", 10);
    assert_eq!(
        m.values().sum::<usize>(),
        10,
        "{backend}: old rules serve: {m:?}"
    );
    t.write(&config(&all));

    // NodePort, externalTrafficPolicy Cluster: served, source masqueraded.
    let (lines, code) = t.curl(&format!("http://{NODE_IP}:30080/"), 30);
    assert_eq!(code, 0, "{backend}: NodePort");
    assert_eq!(lines.len(), 30);
    // (The userspace backend proxies: endpoints always see the node.)
    assert!(
        lines.iter().all(|l| !l.ends_with(CLIENT_IP)),
        "{backend}: ETP Cluster should masquerade: {lines:?}"
    );
    // externalTrafficPolicy Local: only this node's endpoints, client address kept.
    let (lines, code) = t.curl(&format!("http://{NODE_IP}:30081/"), 60);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 60);
    for l in &lines {
        assert!(
            backend == "userspace" || l.ends_with(CLIENT_IP),
            "{backend}: ETP Local keeps the source: {l}"
        );
        assert!(
            !l.starts_with("b3"),
            "{backend}: b3 is on another node: {l}"
        );
    }

    // No endpoints: refused at once, not a timeout.
    let t0 = Instant::now();
    let (_, code) = t.curl("http://10.96.0.12/", 1);
    assert_eq!(code, 7, "{backend}: want connection refused (curl exit 7)");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    // Session affinity sticks, then expires (timeoutSeconds: 1).
    let m = t.spread("http://10.96.0.13/", 30);
    assert_eq!(m.len(), 1, "{backend}: affinity should stick: {m:?}");
    let first = m.keys().next().cloned().unwrap_or_default();
    let mut moved = false;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(2200));
        let m = t.spread("http://10.96.0.13/", 3);
        assert_eq!(
            m.len(),
            1,
            "{backend}: still sticky within the timeout: {m:?}"
        );
        if !m.contains_key(&first) {
            moved = true;
            break;
        }
    }
    assert!(moved, "{backend}: affinity never expired");

    // loadBalancerSourceRanges: the client's range passes, another drops
    // (the userspace backend closes the connection instead).
    let (lines, code) = t.curl("http://203.0.113.7/", 3);
    assert_eq!((code, lines.len()), (0, 3), "{backend}: admitted range");
    let (lines, code) = t.curl("http://203.0.113.8/", 1);
    assert!(
        code != 0 && lines.is_empty(),
        "{backend}: other ranges are dropped: {code} {lines:?}"
    );

    // kube-proxy's metrics.
    let (ok, metrics) = t.node_cmd(&["curl", "-sf", "http://127.0.0.1:10249/metrics"]);
    assert!(ok, "{backend}: metrics");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
    ] {
        let n: f64 = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        assert!(n >= 1.0, "{backend}: {name} = {n}\n{metrics}");
    }

    // L4 weights from a DestinationRule subset split: 80/20.
    let m = t.spread("http://10.96.0.14/", 2000);
    let total = m.values().sum::<usize>();
    assert_eq!(total, 2000, "{m:?}");
    let v1 = m.get("b1").copied().unwrap_or(0) as f64 / total as f64 * 100.0;
    // ±5: a client port reused while conntrack still holds its old entry
    // keeps the old backend, so the picks are not quite independent (3.7σ
    // off once under a loaded machine with ±3).
    assert!(
        (v1 - 80.0).abs() <= 5.0,
        "{backend}: want 80/20 ±5, got {m:?}"
    );

    // An endpoint removed, then one not ready: no more traffic to them.
    t.write(&config(&format!(
        "{}{}",
        endpoint(1, "node-a", true),
        endpoint(2, "node-a", true)
    )));
    t.until("b3 removed", || {
        !t.spread("http://10.96.0.10/", 60).contains_key("b3")
    });
    if backend.starts_with("nftables") {
        // The removal kept web's rule (3 slots, one of the two endpoints
        // left in two of them); within a second an exact sync makes the
        // rule draw from the two endpoints' slots alone.
        t.until("web's split evened out", || {
            t.node_cmd(&[
                "nft",
                "list",
                "chain",
                "ip",
                "bosun",
                "svc-shop/web/tcp/http",
            ])
            .1
            .contains("numgen random mod 2 offset")
        });
    }
    // An endpoint replaced (as many as before): on nftables only map
    // elements change (in a netlink batch, as every nftables sync is).
    t.write(&config(&format!(
        "{}{}",
        endpoint(1, "node-a", true),
        endpoint(3, "node-b", true)
    )));
    t.until("b2 replaced by b3", || {
        let m = t.spread("http://10.96.0.10/", 60);
        m.len() == 2 && m.contains_key("b1") && m.contains_key("b3")
    });
    if backend.starts_with("nftables") {
        let log = std::fs::read_to_string(t.dir.with_extension("log")).unwrap_or_default();
        let through_nft = log.contains("programming through nft");
        assert_eq!(through_nft, backend == "nftables-text", "{log}");
    }
    t.write(&config(&format!(
        "{}{}",
        endpoint(1, "node-a", true),
        endpoint(2, "node-a", false)
    )));
    t.until("b2 not ready", || {
        let m = t.spread("http://10.96.0.10/", 60);
        m.len() == 1 && m.contains_key("b1")
    });
    // And all endpoints gone: refused.
    t.write(&config(""));
    t.until("no endpoints refuse", || {
        t.curl("http://10.96.0.10/", 1).1 == 7
    });

    // Every sync so far applied as it was (a failed partial sync would have
    // been hidden by the full resync that follows it).
    let log = std::fs::read_to_string(t.dir.with_extension("log")).unwrap_or_default();
    assert!(!log.contains("sync failed"), "{backend}: {log}");

    if backend.starts_with("nftables") {
        // Rules changed behind node mode's back: the next partial sync
        // fails, and a full resync puts everything back.
        assert!(t.node_cmd(&["nft", "delete", "table", "ip", "bosun"]).0);
        t.write(&config(&format!(
            "{}{}",
            endpoint(1, "node-a", true),
            endpoint(3, "node-b", true)
        )));
        t.until("full resync after a failed partial one", || {
            let m = t.spread("http://10.96.0.10/", 30);
            m.len() == 2 && m.contains_key("b1") && m.contains_key("b3")
        });
        // The same when the failed change is elements only: the kernel's
        // refusal of the batch is seen, not taken for success.
        assert!(t.node_cmd(&["nft", "delete", "table", "ip", "bosun"]).0);
        t.write(&config(&format!(
            "{}{}",
            endpoint(1, "node-a", true),
            endpoint(2, "node-a", true)
        )));
        t.until("full resync after a failed netlink update", || {
            let m = t.spread("http://10.96.0.10/", 30);
            m.len() == 2 && m.contains_key("b1") && m.contains_key("b2")
        });
        let log = std::fs::read_to_string(t.dir.with_extension("log")).unwrap_or_default();
        if backend == "nftables" {
            assert!(log.contains("nf_tables refused the batch"), "{log}");
        }
    }

    // SIGTERM with a connection in flight: the userspace backend drains it
    // (its local route stays until the connection ends).
    if backend == "userspace" {
        t.write(&config(&endpoint(1, "node-a", true)));
        t.until("served again", || {
            t.spread("http://10.96.0.10/", 3).contains_key("b1")
        });
    }
    let slow_client = (backend == "userspace").then(|| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.client,
                "python3",
                "-c",
                "import socket,time\n\
             s=socket.create_connection(('10.96.0.10',80),timeout=5)\n\
             time.sleep(1)\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
             d=b''\n\
             while True:\n    c=s.recv(4096)\n    if not c: break\n    d+=c\n\
             print(d.split(b' ')[1].decode())",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python client")
    });
    std::thread::sleep(Duration::from_millis(300));
    // SIGTERM: node mode removes what it programmed.
    t.stop_node();
    if let Some(c) = slow_client {
        let out = c.wait_with_output().expect("client output");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "200",
            "{backend}: a connection in flight at SIGTERM was cut: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(t.rules_gone(), "{backend}: rules left after exit");
    // --cleanup removes rules a killed node left behind.
    t.start_node(backend);
    assert!(!t.rules_gone());
    if let Some(mut p) = t.procs.pop() {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert!(!t.rules_gone(), "{backend}: SIGKILL leaves the rules");
    let bin = env!("CARGO_BIN_EXE_bosun");
    let (ok, out) = t.node_cmd(&[
        bin,
        "proxy",
        "--mode",
        "node",
        "--cleanup",
        "--backend",
        backend.trim_end_matches("-text"),
    ]);
    assert!(ok, "{out}");
    assert!(t.rules_gone(), "{backend}: rules left after --cleanup");
}

#[test]
fn node_mode_nftables() {
    suite("nftables");
}

#[test]
fn node_mode_nftables_through_nft() {
    suite("nftables-text");
}

#[test]
fn node_mode_iptables() {
    suite("iptables");
}

#[test]
fn node_mode_userspace() {
    suite("userspace");
}

/// Node mode fed by the control service over ADS (NodeService resources):
/// the same rules, and a change to the control's config reaches the kernel.
#[test]
fn node_mode_over_xds() {
    let mut t = Topo::new(3);
    let eps = |ks: &[usize]| -> String {
        ks.iter()
            .map(|k| endpoint(*k, if *k == 3 { "node-b" } else { "node-a" }, true))
            .collect()
    };
    let yaml = |ks: &[usize]| {
        format!(
            "{PODS}{}",
            service(
                "web",
                "10.96.0.10",
                "  type: NodePort\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
                &eps(ks),
            )
        )
    };
    t.write(&yaml(&[1, 2, 3]));
    t.start_control();
    t.start_node_with("nftables", &["--xds", "127.0.0.1:15010"]);
    let m = t.spread("http://10.96.0.10/", 150);
    assert_eq!(m.len(), 3, "{m:?}");
    // Which endpoints are local is decided by the node: b3 is on node-b.
    let (lines, code) = t.curl(&format!("http://{NODE_IP}:30080/"), 40);
    assert_eq!(code, 0);
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("b3") && l.ends_with(CLIENT_IP)),
        "{lines:?}"
    );
    t.write(&yaml(&[2]));
    t.until("the control's change reaches the rules", || {
        let m = t.spread("http://10.96.0.10/", 30);
        m.len() == 1 && m.contains_key("b2")
    });
}

/// A dual-stack Service: programmed in both families (`ip bosun` and `ip6
/// bosun`, or iptables and ip6tables), each with its own endpoints.
#[test]
fn node_mode_dual_stack() {
    for backend in ["nftables", "iptables"] {
        let mut t = Topo::new(3);
        let slice = |family: &str, ks: &[usize]| -> String {
            let eps: String = ks
                .iter()
                .map(|k| {
                    let a = if family == "IPv4" {
                        format!("10.1.{k}.2")
                    } else {
                        format!("\"fd00:1:{k}::2\"")
                    };
                    format!("  - addresses: [{a}]\n    nodeName: node-a\n")
                })
                .collect();
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dual-{family}, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}\naddressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}---\n"
            )
        };
        t.write(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dual, namespace: shop}}\nspec:\n  type: NodePort\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\n---\n{}{}",
            slice("IPv4", &[1, 2]),
            slice("IPv6", &[2, 3])
        ));
        t.start_node_with(
            backend,
            &[
                "--config",
                &t.dir.display().to_string(),
                "--cluster-cidr",
                "10.1.0.0/16,fd00:1::/48",
            ],
        );
        let v4 = t.spread("http://10.96.0.10/", 100);
        assert_eq!(
            v4.keys().collect::<Vec<_>>(),
            ["b1", "b2"],
            "{backend} v4: {v4:?}"
        );
        let v6 = t.spread("http://[fd00:96::10]/", 100);
        assert_eq!(
            v6.keys().collect::<Vec<_>>(),
            ["b2", "b3"],
            "{backend} v6: {v6:?}"
        );
        // NodePort on the node's IPv6 address, masqueraded (ETP Cluster).
        let (lines, code) = t.curl(&format!("http://[{NODE_IP6}]:30080/"), 20);
        assert_eq!(code, 0, "{backend}");
        assert_eq!(lines.len(), 20);
        assert!(
            lines.iter().all(|l| !l.ends_with(CLIENT_IP6)),
            "{backend}: {lines:?}"
        );
        t.stop_node();
        assert!(t.rules_gone(), "{backend}: rules left");
    }
}

/// `nft list ruleset` with each set's elements sorted (the kernel lists a
/// hash set in its own order).
fn normalized(listing: &str) -> String {
    let mut out = String::new();
    let mut rest = listing;
    while let Some(i) = rest.find("elements = {") {
        let (head, tail) = rest.split_at(i + "elements = {".len());
        out.push_str(head);
        let end = tail.find('}').unwrap_or(tail.len());
        let mut items: Vec<&str> = tail[..end].split(',').map(str::trim).collect();
        items.sort();
        out.push_str(&items.join(", "));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Node mode programs nftables over netlink, encoding each rule itself.
/// The same Services programmed by `nft -f` from the same rendering must
/// read back identically: every statement, set declaration and element
/// (the golden fixture has NodePorts, affinity, Local policies, source
/// ranges, masquerading and both families).
#[test]
fn node_mode_netlink_programs_what_nft_would() {
    let mut t = Topo::new(0);
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/node/tests/golden/services.yaml"
    );
    let yaml = std::fs::read_to_string(fixture).expect("fixture");
    t.write(&yaml);
    let cidr = "10.1.0.0/16,fd00:1::/48";
    t.start_node_with(
        "nftables",
        &[
            "--config",
            &t.dir.display().to_string(),
            "--cluster-cidr",
            cidr,
        ],
    );
    let (ok, by_netlink) = t.node_cmd(&["nft", "list", "ruleset"]);
    assert!(ok, "{by_netlink}");
    let log = std::fs::read_to_string(t.dir.with_extension("log")).unwrap_or_default();
    assert!(!log.contains("programming through nft"), "{log}");

    let cfg = bosun_control::load::ParseCache::default()
        .load(&[(fixture.to_string(), yaml)])
        .expect("fixture parses");
    let services = bosun_node::services::service_map(&cfg, "node-a").expect("fixture is valid");
    let opts = bosun_node::nft::Options {
        cluster_cidr: Some(cidr.into()),
    };
    let text: String = [
        bosun_node::services::Family::V4,
        bosun_node::services::Family::V6,
    ]
    .iter()
    .map(|f| {
        bosun_node::nft::full_text(&bosun_node::nft::render(
            *f,
            &services,
            &opts,
            None,
            bosun_node::nft::Split::Exact,
        ))
    })
    .collect();
    let scratch = format!("bsn-nft-{}", std::process::id());
    ip(&["netns", "add", &scratch]);
    t.all.push(scratch.clone());
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &scratch, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    {
        use std::io::Write;
        let mut stdin = nft.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write rules");
    }
    assert!(
        nft.wait().expect("nft").success(),
        "nft -f refused the text"
    );
    let by_nft = Command::new("ip")
        .args(["netns", "exec", &scratch, "nft", "list", "ruleset"])
        .output()
        .expect("nft list");
    let by_nft = String::from_utf8_lossy(&by_nft.stdout).into_owned();
    assert!(by_nft.contains("svc-shop/web/tcp/http"), "{by_nft}");
    let (a, b) = (normalized(&by_netlink), normalized(&by_nft));
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        assert_eq!(x, y, "line {} differs (netlink, then nft)", i + 1);
    }
    assert_eq!(a.lines().count(), b.lines().count());
}

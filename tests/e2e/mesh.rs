//! A whole mesh in network namespaces this test makes (as root, no route
//! out): three "pods" (sleep, reviews-v1, reviews-v2), each a namespace with
//! a veth to a "node" namespace, an app, a sidecar running as uid 1337 with
//! what `bosun inject` gave it, and `bosun capture`'s rules from the
//! injected init container's arguments; node mode in the node namespace
//! providing ClusterIPs (the sidecars reach the control through one); the
//! control service with its CA and its injection webhook. The apps know
//! nothing of the mesh: pod A's curl dials `reviews.default.svc.cluster.local`
//! from its hosts file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const CONTROL_VIP: &str = "10.96.0.1";
const REVIEWS_VIP: &str = "10.96.0.20";
const EXTERNAL: &str = "10.1.9.2";

/// pod k: 10.1.k.2 behind the node's 10.1.k.1; the "external" server is 10.1.9.2.
fn pod_ip(k: usize) -> String {
    format!("10.1.{k}.2")
}

struct Mesh {
    tag: String,
    node: String,
    pods: Vec<String>,
    all: Vec<String>,
    procs: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for (_, p) in &mut self.procs {
            let _ = Command::new("kill")
                .arg(p.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        let by = Instant::now() + Duration::from_secs(3);
        for (_, p) in &mut self.procs {
            while Instant::now() < by && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in &self.all {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(n));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Mesh {
    fn new() -> Mesh {
        let tag = format!("bm{}", std::process::id() % 100_000);
        let node = format!("{tag}-node");
        let dir = std::env::temp_dir().join(format!("{tag}-mesh"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("config")).expect("mkdir");
        // The sidecars (uid 1337) read their tokens and the root here.
        let _ = Command::new("chmod")
            .args(["0755", dir.to_str().expect("utf8")])
            .status();
        let mut m = Mesh {
            tag: tag.clone(),
            node: node.clone(),
            pods: vec![],
            all: vec![],
            procs: vec![],
            dir,
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &node])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &node]);
        m.all.push(node.clone());
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .expect("sysctl");
        assert!(ok.success());
        for k in [1usize, 2, 3, 9] {
            let name = format!("{tag}-p{k}");
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", &name]);
            m.all.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            // pod eth0 10.1.k.2/24 ── node p<k> 10.1.k.1/24, the pod's default route.
            let (peer, gw) = (format!("p{k}"), format!("10.1.{k}.1"));
            for cmd in [
                format!("-n {name} link add eth0 type veth peer name {peer} netns {node}"),
                format!("-n {name} addr add {}/24 dev eth0", pod_ip(k)),
                format!("-n {name} link set eth0 up"),
                format!("-n {name} route add default via {gw}"),
                format!("-n {node} addr add {gw}/24 dev {peer}"),
                format!("-n {node} link set {peer} up"),
            ] {
                ip(&cmd.split(' ').collect::<Vec<_>>());
            }
            if k != 9 {
                m.pods.push(name.clone());
            }
            // The app's resolver: this namespace's hosts file.
            let etc = Path::new("/etc/netns").join(&name);
            std::fs::create_dir_all(&etc).expect("mkdir /etc/netns");
            std::fs::write(
                etc.join("hosts"),
                format!(
                    "127.0.0.1 localhost\n{REVIEWS_VIP} reviews.default.svc.cluster.local reviews\n"
                ),
            )
            .expect("hosts");
        }
        m
    }

    fn pod(&self, k: usize) -> &str {
        &self.pods[k - 1]
    }

    fn ext(&self) -> String {
        format!("{}-p9", self.tag)
    }

    fn spawn(
        &mut self,
        what: &str,
        ns: &str,
        as_proxy: bool,
        args: &[&str],
        env: &[(&str, String)],
    ) {
        let log = std::fs::File::create(self.dir.join(format!("{what}.log"))).expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if as_proxy {
            cmd.args(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]);
        }
        let child = cmd
            .arg(env!("CARGO_BIN_EXE_bosun"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        self.procs.push((what.to_string(), child));
    }

    fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    fn sigterm(&mut self, what: &str) -> &mut Child {
        let (_, p) = self
            .procs
            .iter_mut()
            .find(|(w, _)| w == what)
            .unwrap_or_else(|| panic!("no process {what}"));
        let ok = Command::new("kill")
            .args(["-TERM", &p.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        p
    }

    /// curl in `ns` (as the app: captured): (success, stdout).
    fn curl(&self, ns: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "--max-time", "5"])
            .args(args)
            .output()
            .expect("curl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn until(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let by = Instant::now() + within;
        while !f() {
            assert!(
                Instant::now() < by,
                "timed out: {what}\ncontrol: {}\nsidecar A: {}\nsidecar B: {}",
                self.log("control"),
                self.log("sidecar-1"),
                self.log("sidecar-2")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn write_config(&self, yaml: &str) {
        crate::harness::write_dir(&self.dir.join("config"), yaml);
    }
}

fn pod_yaml(name: &str, k: usize, labels: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}, security.istio.io/tlsMode: istio}}}}\n\
spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {}}}\n---\n",
        pod_ip(k)
    )
}

/// The mesh's config: the control reached by a ClusterIP, reviews with two
/// versions split `w1`/`w2`, STRICT mTLS, and an optional Sidecar.
fn mesh_config(w1: u32, w2: u32, reviews_pods: &[usize], sidecar: &str) -> String {
    let eps: String = reviews_pods
        .iter()
        .map(|k| {
            format!(
                "  - addresses: [{}]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: reviews-v{}, namespace: default}}\n",
                pod_ip(*k),
                k - 1
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "  []\n".to_string()
    } else {
        eps
    };
    // 0/0: no subsets, every endpoint of reviews.
    let routes = if w1 + w2 == 0 {
        "    - destination: {host: reviews}\n".to_string()
    } else {
        format!(
            "    - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: {w2}}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bosun-control, namespace: istio-system}}\n\
spec: {{clusterIP: {CONTROL_VIP}, ports: [{{name: tls-xds, port: 15012}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: bosun-control-1, namespace: istio-system, labels: {{kubernetes.io/service-name: bosun-control}}}}\n\
addressType: IPv4\nports: [{{name: tls-xds, port: 15012}}]\nendpoints:\n  - addresses: [10.1.1.1]\n    conditions: {{ready: true}}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\n\
spec: {{clusterIP: {REVIEWS_VIP}, selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}\n\
addressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n{eps}---\n\
{}{}{}\
apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\n\
spec: {{host: reviews, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\n\
spec:\n  hosts: [reviews]\n  http:\n  - route:\n{routes}---\n\
apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: default}}\nspec: {{mtls: {{mode: STRICT}}}}\n---\n\
{sidecar}",
        pod_yaml("sleep", 1, "app: sleep", "sleep"),
        pod_yaml(
            "reviews-v1",
            2,
            "app: reviews, version: v1",
            "bookinfo-reviews"
        ),
        pod_yaml(
            "reviews-v2",
            3,
            "app: reviews, version: v2",
            "bookinfo-reviews"
        ),
    )
}

const REGISTRY_ONLY: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\n\
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n---\n";

/// What `bosun inject` makes of pod `name`: the sidecar's env (the app
/// probers) and the init container's `bosun capture` arguments.
fn injected(
    name: &str,
    labels: &str,
    probes: serde_json::Value,
) -> (Vec<(String, String)>, Vec<String>) {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .split(", ")
        .filter_map(|kv| kv.split_once(": "))
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let mut container = serde_json::json!({
        "name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 9080}]
    });
    if let (Some(c), Some(p)) = (container.as_object_mut(), probes.as_object()) {
        c.extend(p.clone());
    }
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [container]}
    });
    let injected = bosun_control::inject::inject_object(&mut v, &Default::default(), &|_| None)
        .expect("inject");
    assert!(injected);
    let spec = &v["spec"];
    let proxy = spec["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "bosun-proxy")
        .expect("injected proxy");
    let env = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"][0], "capture");
    let args = init["args"]
        .as_array()
        .expect("args")
        .iter()
        .skip(1)
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    (env, args)
}

fn count(body: &str, needle: &str) -> usize {
    body.lines().filter(|l| l.starts_with(needle)).count()
}

#[test]
fn a_mesh_of_injected_pods_in_network_namespaces() {
    let mut m = Mesh::new();
    let dir = m.dir.clone();
    let node = m.node.clone();
    m.write_config(&mesh_config(80, 20, &[2, 3], ""));
    let tokens = "tokens:\n- {token: token-of-sleep-0123456789, namespace: default, serviceAccount: sleep}\n\
- {token: token-of-reviews-0123456789, namespace: default, serviceAccount: bookinfo-reviews}\n";
    std::fs::write(dir.join("tokens.yaml"), tokens).expect("tokens");
    for (who, tok) in [
        ("sleep", "token-of-sleep-0123456789"),
        ("reviews", "token-of-reviews-0123456789"),
    ] {
        std::fs::write(dir.join(format!("{who}.token")), tok).expect("token");
    }
    let cfg = dir.join("config").display().to_string();
    let ca = dir.join("ca").display().to_string();
    let tok = dir.join("tokens.yaml").display().to_string();
    // The control: config, CA, authenticated xDS on 15012, the webhook.
    m.spawn(
        "control",
        &node,
        false,
        &[
            "control",
            "--config-dir",
            &cfg,
            "--ca-dir",
            &ca,
            "--ca-tokens",
            &tok,
            "--xds-addr",
            "127.0.0.1:15010",
            "--xds-tls-addr",
            "0.0.0.0:15012",
            "--admin-address",
            "127.0.0.1:15014",
            "--webhook-address",
            "127.0.0.1:15017",
        ],
        &[],
    );
    m.until("the control is ready", Duration::from_secs(20), || {
        m.curl(&node, &["-f", "http://127.0.0.1:15014/ready"]).0
    });
    // Node mode programs the ClusterIPs (the control's among them).
    m.spawn(
        "node",
        &node,
        false,
        &[
            "proxy",
            "--mode",
            "node",
            "--node-name",
            "node-a",
            "--xds",
            "127.0.0.1:15010",
            "--cluster-cidr",
            "10.1.0.0/16",
        ],
        &[],
    );
    m.until("node mode is synced", Duration::from_secs(20), || {
        m.curl(&node, &["-f", "http://127.0.0.1:10256/healthz"]).0
    });
    let root = dir.join("root-cert.pem");
    std::fs::copy(dir.join("ca/root-cert.pem"), &root).expect("root");

    // The webhook, over TLS with the CA's certificate: an AdmissionReview
    // for a pod gets a JSONPatch adding the sidecar.
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "default",
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-"},
                "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
    });
    let (ok, body) = m.curl(
        &node,
        &[
            "--cacert",
            root.to_str().expect("utf8"),
            "--resolve",
            "localhost:15017:127.0.0.1",
            "-H",
            "content-type: application/json",
            "--data",
            &review.to_string(),
            "https://localhost:15017/inject",
        ],
    );
    assert!(ok, "webhook: {body}");
    let resp: serde_json::Value = serde_json::from_str(&body).expect("AdmissionReview");
    assert_eq!(resp["response"]["uid"], "u-1");
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(resp["response"]["patch"].as_str().expect("patch"))
            .expect("base64")
    };
    assert!(String::from_utf8_lossy(&patch).contains("bosun-proxy"));
    // Hostile or broken input: not JSON, not an AdmissionReview, too large, not POST.
    let root_s = root.to_str().expect("utf8").to_string();
    let webhook = |extra: &[&str]| -> String {
        let mut args = vec![
            "--cacert",
            root_s.as_str(),
            "--resolve",
            "localhost:15017:127.0.0.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push("https://localhost:15017/inject");
        m.curl(&node, &args).1
    };
    assert_eq!(webhook(&["--data", "{not json"]), "400");
    assert_eq!(webhook(&["--data", "{\"kind\": \"Pod\"}"]), "400");
    let big = dir.join("big.json");
    std::fs::write(&big, vec![b' '; 5 << 20]).expect("big");
    let big_arg = format!("@{}", big.display());
    assert_eq!(webhook(&["--data-binary", &big_arg]), "413");
    assert_eq!(webhook(&[]), "405");

    // The pods: app, capture rules from the injected init container, and
    // the injected sidecar (its probers included) as uid 1337.
    let probes = serde_json::json!({
        "livenessProbe": {"httpGet": {"path": "/status/200", "port": "http"}},
        "readinessProbe": {"httpGet": {"path": "/status/503", "port": 9080}},
        "startupProbe": {"tcpSocket": {"port": 9080}},
    });
    let none = serde_json::json!({});
    let pods = [
        (1usize, "sleep", "app: sleep", "sleep", &none),
        (
            2,
            "reviews-v1",
            "app: reviews, version: v1",
            "bookinfo-reviews",
            &probes,
        ),
        (
            3,
            "reviews-v2",
            "app: reviews, version: v2",
            "bookinfo-reviews",
            &none,
        ),
    ];
    for (k, name, labels, sa, probes) in pods {
        let ns = m.pod(k).to_string();
        let (env, capture_args) = injected(name, labels, probes.clone());
        if k == 2 {
            assert!(env.iter().any(|(n, _)| n == "ISTIO_KUBE_APP_PROBERS"));
        }
        m.spawn(
            &format!("app-{k}"),
            &ns,
            false,
            &["echo", "--listen", "[::]:9080", "--name", name],
            &[],
        );
        let mut capture: Vec<&str> = vec!["capture"];
        capture.extend(capture_args.iter().map(String::as_str));
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_bosun")])
            .args(&capture)
            .output()
            .expect("capture");
        assert!(
            out.status.success(),
            "capture: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The downward API's labels file.
        let labels_file = dir.join(format!("labels-{k}"));
        let body: String = labels
            .split(", ")
            .map(|kv| {
                let (k, v) = kv.split_once(": ").expect("label");
                format!("{k}=\"{v}\"\n")
            })
            .collect();
        std::fs::write(&labels_file, body).expect("labels");
        let token = dir.join(format!(
            "{}.token",
            if k == 1 { "sleep" } else { "reviews" }
        ));
        let xds = format!("https://{CONTROL_VIP}:15012");
        m.spawn(
            &format!("sidecar-{k}"),
            &ns,
            true,
            &[
                "proxy",
                "--mode",
                "sidecar",
                "--capture",
                "--xds",
                &xds,
                "--ca-root-cert",
                root.to_str().expect("utf8"),
                "--token-file",
                token.to_str().expect("utf8"),
                "--namespace",
                "default",
                "--service-account",
                sa,
                "--workload",
                name,
                "--labels-file",
                labels_file.to_str().expect("utf8"),
                "--inbound-address",
                "0.0.0.0:15006",
                "--outbound-address",
                "127.0.0.1:15001",
                "--status-address",
                "0.0.0.0:15020,0.0.0.0:15021",
                "--exit-on-zero-active-connections",
                "--termination-grace",
                "4s",
                "--request-head-timeout",
                "3s",
                "--drain-duration",
                "3s",
            ],
            &env.iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect::<Vec<_>>(),
        );
    }
    let ext = m.ext();
    m.spawn(
        "external",
        &ext,
        false,
        &["echo", "--listen", "0.0.0.0:80", "--name", "external"],
        &[],
    );
    // Ready (certificate and config) as the kubelet sees it.
    for k in 1..=3 {
        let url = format!("http://{}:15021/healthz/ready", pod_ip(k));
        m.until(
            &format!("sidecar {k} ready"),
            Duration::from_secs(30),
            || m.curl(&node, &["-f", &url]).0,
        );
    }
    let a = m.pod(1).to_string();
    let reviews = "http://reviews.default.svc.cluster.local:9080/";

    // A plain curl reaches reviews through both sidecars over mutual TLS;
    // the app sees A's identity.
    let mut first = String::new();
    m.until("A reaches reviews", Duration::from_secs(20), || {
        let (ok, body) = m.curl(&a, &[reviews]);
        first = body;
        ok && first.starts_with("reviews-v")
    });
    assert!(
        first.contains("xfcc=") && first.contains("URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{first}"
    );

    // 80/20 over 2,000 requests, within 3 points.
    let (ok, body) = m.curl(&a, &[&format!("{reviews}?n=[1-2000]")]);
    assert!(ok);
    let (v1, v2) = (count(&body, "reviews-v1"), count(&body, "reviews-v2"));
    assert_eq!(v1 + v2, 2000, "{body}");
    let share = v1 as f64 / 2000.0 * 100.0;
    assert!(
        (77.0..=83.0).contains(&share),
        "v1 share {share}% ({v1}/{v2})"
    );

    // STRICT: plaintext straight to pod B's IP (from the node, and from
    // A's sidecar uid, which is not captured) is refused.
    let b_direct = format!("http://{}:9080/", pod_ip(2));
    let (ok, body) = m.curl(&node, &[&b_direct]);
    assert!(!ok && !body.contains("reviews-v1"), "{body}");
    // A kubelet-style probe from the node: the app's status, through the
    // proxy, in plaintext.
    let probe = |path: &str| -> String {
        let url = format!("http://{}:15020/app-health/app/{path}", pod_ip(2));
        m.curl(&node, &["-o", "/dev/null", "-w", "%{http_code}", &url])
            .1
    };
    assert_eq!(probe("livez"), "200");
    assert_eq!(probe("readyz"), "503");
    assert_eq!(probe("startupz"), "200");
    // The status port serves probes, readiness and metrics, nothing else.
    let quit = format!("http://{}:15020/quitquitquit", pod_ip(2));
    let (_, code) = m.curl(
        &node,
        &["-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", &quit],
    );
    assert_eq!(code, "404");
    // `bosun wait` (the postStart hook) returns once the proxy is ready.
    let wait = |url: &str| -> bool {
        Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_bosun"), "wait"])
            .args(["--url", url, "--timeout", "2s"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(wait(&format!("http://{}:15021/healthz/ready", pod_ip(2))));
    assert!(!wait(&format!("http://{}:15029/healthz/ready", pod_ip(2))));
    // The proxy's own ports are not reachable through the inbound side.
    let (ok, _) = m.curl(&node, &[&format!("http://{}:15000/config_dump", pod_ip(2))]);
    assert!(!ok, "the admin port is reachable from outside the pod");

    // ALLOW_ANY (no Sidecar): an unknown IP passes through A's sidecar.
    let unknown = format!("http://{EXTERNAL}/");
    let (ok, body) = m.curl(&a, &[&unknown]);
    assert!(ok && body.starts_with("external"), "{body}");
    // Bytes that are not HTTP are sniffed as opaque TCP and pass through
    // too: the external HTTP server itself answers them (400).
    // `silent`: seconds the client waits before it sends (a server-first
    // protocol, as far as the sidecar can tell), longer than the sidecars'
    // 3 s head timeout; then it sends `payload` (a Python bytes literal).
    let raw = |ns: &str, silent: u32, payload: &str| -> String {
        let script = format!(
            "import socket, time\ns=socket.create_connection(('{EXTERNAL}',80),timeout=10)\ntime.sleep({silent})\ns.sendall({payload})\ntry:\n print(s.recv(64))\nexcept Exception as e:\n print('error', e)\n"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let not_http = "b'\\x00\\x01not http\\r\\n\\r\\n'";
    let http = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'";
    let answer = raw(&a, 0, not_http);
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    // A client silent past the head timeout is opaque TCP: passed through.
    let answer = raw(&a, 4, http);
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    // REGISTRY_ONLY: blocked (502 for HTTP, as Istio's BlackHoleCluster).
    m.write_config(&mesh_config(80, 20, &[2, 3], REGISTRY_ONLY));
    m.until("REGISTRY_ONLY applies", Duration::from_secs(20), || {
        let (_, code) = m.curl(&a, &["-o", "/dev/null", "-w", "%{http_code}", &unknown]);
        code == "502"
    });
    // TCP to an unknown destination is closed, and counted; so is a
    // client silent past the head timeout (TCP, not the 502 of HTTP).
    let answer = raw(&a, 0, not_http);
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    let answer = raw(&a, 4, http);
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    let (_, metrics) = m.curl(&a, &["http://127.0.0.1:15000/stats/prometheus"]);
    assert!(
        crate::harness::metric_sum(&metrics, "bosun_blackholed_connections_total", &[]) >= 1.0,
        "{metrics}"
    );
    // The mesh's own services still work.
    let (ok, body) = m.curl(&a, &[reviews]);
    assert!(ok && body.starts_with("reviews-v"), "{body}");
    m.write_config(&mesh_config(80, 20, &[2, 3], ""));
    m.until("ALLOW_ANY again", Duration::from_secs(20), || {
        m.curl(&a, &[&unknown]).1.starts_with("external")
    });

    // SIGTERM to pod B's sidecar while A sends requests, as Kubernetes
    // stops a pod: its endpoint leaves the EndpointSlice and its sidecar
    // gets SIGTERM together. Not one request fails. (Reviews without
    // subsets first, so C can take B's share.)
    m.write_config(&mesh_config(0, 0, &[2, 3], ""));
    m.until("both pods serve reviews", Duration::from_secs(20), || {
        let (_, body) = m.curl(&a, &[&format!("{reviews}?n=[1-20]")]);
        count(&body, "reviews-v1") > 0 && count(&body, "reviews-v2") > 0
    });
    let load = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            "curl",
            "-s",
            "--rate",
            "50/s",
            "-w",
            "|%{http_code}\n",
        ])
        .arg(format!("{reviews}?n=[1-400]"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("load");
    std::thread::sleep(Duration::from_secs(2));
    m.write_config(&mesh_config(0, 0, &[3], ""));
    let b = m.sigterm("sidecar-2");
    let by = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Ok(Some(s)) = b.try_wait() {
            break Some(s);
        }
        if Instant::now() > by {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = load.wait_with_output().expect("load output");
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.rsplit_once('|').map(|(_, c)| c))
        .collect();
    assert_eq!(codes.len(), 400, "{text}");
    let failed = codes.iter().filter(|c| **c != "200").count();
    assert_eq!(
        failed, 0,
        "{failed} failed requests while B's sidecar stopped:\n{text}"
    );
    assert!(
        exited.is_some_and(|s| s.success()),
        "B's sidecar did not exit cleanly: {}",
        m.log("sidecar-2")
    );
}

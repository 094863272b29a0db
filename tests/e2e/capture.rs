//! `bosun capture` in a network namespace this test makes (as root, no
//! route out): a "pod" with listeners standing in for the sidecar's
//! outbound (15001) and inbound (15006) ports and an app, and a peer
//! namespace across a veth with the "real" destinations. What reaches which
//! listener shows what the rules redirect.

use std::process::{Child, Command};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Pod {
    pod: String,
    peer: String,
    procs: Vec<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

impl Pod {
    fn new() -> Pod {
        Pod::with("bcap", true)
    }

    /// `tag` names the namespaces; `echo_outbound`: a stand-in listener
    /// on 15001 (else a real sidecar goes there).
    fn with(tag: &str, echo_outbound: bool) -> Pod {
        let id = std::process::id() % 10_000;
        let (pod, peer) = (format!("{tag}-pod-{id}"), format!("{tag}-peer-{id}"));
        let mut p = Pod {
            pod: pod.clone(),
            peer: peer.clone(),
            procs: Vec::new(),
        };
        for n in [&pod, &peer] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &peer,
        ]);
        for (n, v4, v6) in [
            (&pod, "10.231.0.1/24", "fd00:231::1/64"),
            (&peer, "10.231.0.2/24", "fd00:231::2/64"),
        ] {
            ip(&["-n", n, "addr", "add", v4, "dev", "eth0"]);
            ip(&["-n", n, "addr", "add", v6, "dev", "eth0", "nodad"]);
            ip(&["-n", n, "link", "set", "eth0", "up"]);
        }
        for (ns, listen, name) in [
            // The sidecar's listeners take both families (redirected IPv6
            // arrives on ::1).
            (&pod, "[::]:15001", "outbound"),
            (&pod, "[::]:15006", "inbound"),
            (&pod, "[::]:8080", "app"),
            // Dual-stack: IPv4 and IPv6 on one socket.
            (&peer, "[::]:80", "real"),
            (&peer, "0.0.0.0:81", "real81"),
        ] {
            if listen.ends_with(":15001") && !echo_outbound {
                continue;
            }
            let child = Command::new("ip")
                .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_bosun"), "echo"])
                .args(["--listen", listen, "--name", name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("echo");
            p.procs.push(child);
        }
        p
    }

    /// Which listener answers `url` from `ns` (optionally as uid:gid 1337).
    fn who(&self, ns: &str, url: &str, as_proxy: bool) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if as_proxy {
            cmd.args(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]);
        }
        let out = cmd
            .args(["curl", "-s", "--max-time", "3", url])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn capture(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod,
                env!("CARGO_BIN_EXE_bosun"),
                "capture",
            ])
            .args(args)
            .output()
            .expect("capture");
        assert!(
            out.status.success(),
            "capture {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = Command::new("ip")
            .args(["netns", "exec", &self.pod, "nft", "list", "ruleset"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&list.stdout).to_string()
    }

    fn until_up(&self) {
        for _ in 0..100 {
            if self.who(&self.peer, "http://10.231.0.1:8080/", false) == "app"
                && self.who(&self.pod, "http://10.231.0.2/", false) == "real"
                && self.who(&self.pod, "http://[fd00:231::2]/", false) == "real"
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the listeners did not come up");
    }
}

#[test]
fn capture_redirects_the_apps_tcp_into_the_sidecar_and_cleans_up() {
    let p = Pod::new();
    p.until_up();
    let (pod, peer) = (p.pod.clone(), p.peer.clone());
    let rules = p.capture(&["--exclude-outbound-ports", "81"]);
    // Idempotent: a second run leaves the same rules.
    assert_eq!(p.capture(&["--exclude-outbound-ports", "81"]), rules);
    assert_eq!(
        rules.matches("table inet bosun_capture").count(),
        1,
        "{rules}"
    );

    // The app's connections out go to the sidecar's outbound port, IPv4 and IPv6.
    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "outbound");
    assert_eq!(p.who(&pod, "http://[fd00:231::2]/", false), "outbound");
    // Not the sidecar's own (uid 1337), not an excluded port, not loopback.
    assert_eq!(p.who(&pod, "http://10.231.0.2/", true), "real");
    assert_eq!(p.who(&pod, "http://10.231.0.2:81/", false), "real81");
    assert_eq!(p.who(&pod, "http://127.0.0.1:8080/", false), "app");
    // Connections in go to the sidecar's inbound port.
    assert_eq!(p.who(&peer, "http://10.231.0.1:8080/", false), "inbound");

    // Only some outbound ranges: other destinations go straight.
    p.capture(&["--include-outbound-ip-ranges", "192.0.2.0/24"]);
    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "real");
    assert_eq!(p.who(&pod, "http://[fd00:231::2]/", false), "real");

    // Bad input is refused and the rules in place stay.
    let bad = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod,
            env!("CARGO_BIN_EXE_bosun"),
            "capture",
        ])
        .args(["--exclude-inbound-ports", "ssh"])
        .output()
        .expect("capture");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--exclude-inbound-ports"));
    assert_eq!(p.who(&peer, "http://10.231.0.1:8080/", false), "inbound");

    // --cleanup: everything goes where it was sent.
    let after = p.capture(&["--cleanup"]);
    assert!(!after.contains("bosun_capture"), "{after}");
    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "real");
    assert_eq!(p.who(&peer, "http://10.231.0.1:8080/", false), "app");
}

#[test]
fn a_sidecar_behind_capture_sees_where_the_app_was_going() {
    let mut p = Pod::with("bcsc", false);
    let dir = crate::harness::TempDir::new("capture-sidecar");
    let cfg = dir.0.join("mesh.yaml");
    std::fs::write(
        &cfg,
        crate::harness::service_entry(
            "web",
            "default",
            80,
            "HTTP",
            &[("10.231.0.2:80".parse().expect("addr"), "app=web")],
        ),
    )
    .expect("config");
    let log = dir.0.join("access.log");
    // The sidecar runs as 1337, so its own connections are not captured.
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.pod,
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
        ])
        .args([
            env!("CARGO_BIN_EXE_bosun"),
            "proxy",
            "--mode",
            "sidecar",
            "--access-log",
        ])
        .args(["--config", cfg.to_str().expect("utf8")])
        .args([
            "--outbound-address",
            "[::]:15001",
            "--admin-address",
            "127.0.0.1:15000",
        ])
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sidecar");
    p.procs.push(child);
    p.until_up();
    p.capture(&[]);
    let pod = p.pod.clone();
    // The app dials the service's address as if there were no sidecar; the
    // sidecar answers (by Host it routes, and this Host it does not know:
    // 404 NR), and logs the original destination as Envoy does.
    let line = (0..100)
        .find_map(|_| {
            let _ = p.who(&pod, "http://10.231.0.2/", false);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("downstream_local_address") {
                return Some(text);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            None
        })
        .expect("the sidecar logged the request");
    assert!(
        line.contains("\"downstream_local_address\":\"10.231.0.2:80\""),
        "{line}"
    );
}

/// The iptables fallback: the same redirections as chains in the nat
/// table of iptables and ip6tables.
#[test]
fn capture_with_iptables_redirects_the_same_and_cleans_up() {
    let p = Pod::with("bcip", true);
    p.until_up();
    let (pod, peer) = (p.pod.clone(), p.peer.clone());
    let saved = || {
        let mut all = String::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &pod, tool, "-t", "nat"])
                .output()
                .expect("save");
            // Counters and the dump's timestamps change between runs.
            all += &String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" [").next().unwrap_or(l).to_string() + "\n")
                .collect::<String>();
        }
        all
    };
    // The pod's capture on iptables: what `nft list ruleset` shows after it.
    let run = |args: &[&str]| -> String {
        let mut all = vec!["--backend", "iptables"];
        all.extend_from_slice(args);
        p.capture(&all)
    };
    run(&["--exclude-outbound-ports", "81"]);
    let rules = saved();
    let ruleset = run(&["--exclude-outbound-ports", "81"]);
    assert_eq!(saved(), rules, "a second run changes nothing");
    assert_eq!(
        rules
            .matches("-A PREROUTING -p tcp -j BOSUN_INBOUND")
            .count(),
        2,
        "{rules}"
    );
    // Nothing in nftables' own table.
    assert!(!ruleset.contains("bosun_capture"), "{ruleset}");

    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "outbound");
    assert_eq!(p.who(&pod, "http://[fd00:231::2]/", false), "outbound");
    assert_eq!(p.who(&pod, "http://10.231.0.2/", true), "real");
    assert_eq!(p.who(&pod, "http://10.231.0.2:81/", false), "real81");
    assert_eq!(p.who(&pod, "http://127.0.0.1:8080/", false), "app");
    assert_eq!(p.who(&peer, "http://10.231.0.1:8080/", false), "inbound");
    run(&["--include-outbound-ip-ranges", "192.0.2.0/24"]);
    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "real");

    run(&["--cleanup"]);
    let after = saved();
    assert!(!after.contains("BOSUN"), "{after}");
    assert_eq!(p.who(&pod, "http://10.231.0.2/", false), "real");
    assert_eq!(p.who(&peer, "http://10.231.0.1:8080/", false), "app");
}

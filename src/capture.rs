//! `bosun capture`: what an init container runs in a pod's network
//! namespace so the app's traffic goes through its sidecar without the app
//! knowing: TCP the app sends out is redirected to the sidecar's outbound
//! port (15001), TCP coming in to the sidecar's inbound port (15006).
//! The sidecar's own traffic (uid/gid 1337), loopback destinations, the
//! proxy's ports and what Istio's `traffic.sidecar.istio.io/*` annotations
//! exclude are left alone.
//!
//! The rules are one nftables table, `inet bosun_capture` (IPv4 and IPv6),
//! replaced whole in one `nft -f` transaction, so running it twice leaves
//! the same rules and a failure leaves the old ones. `--cleanup` removes
//! the table. Without nftables (`--backend iptables`, or `auto` when `nft`
//! is missing) the same rules are chains BOSUN_INBOUND and BOSUN_OUTPUT in
//! the nat table of iptables and ip6tables.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, ExitCode, Stdio};

/// The proxy's status ports (health, app probes, metrics): reached from
/// outside the pod, never redirected inbound (Istio's list). Its other
/// ports (admin 15000 and outbound 15001 on loopback, inbound 15006) are
/// redirected like any port, and the sidecar refuses inbound connections
/// to them, so nothing outside the pod reaches them.
pub const PROXY_PORTS: [u16; 3] = [15020, 15021, 15090];

#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// The sidecar's outbound listener port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The sidecar's inbound listener port.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The uid the sidecar runs as: its traffic is not redirected.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The gid the sidecar runs as: its traffic is not redirected.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// CIDRs whose outbound traffic is redirected, comma-separated; `*` all
    /// (Istio's traffic.sidecar.istio.io/includeOutboundIPRanges).
    #[arg(long, default_value = "*")]
    include_outbound_ip_ranges: String,
    /// CIDRs never redirected (excludeOutboundIPRanges).
    #[arg(long, default_value = "")]
    exclude_outbound_ip_ranges: String,
    /// Inbound ports redirected, comma-separated; `*` all (includeInboundPorts).
    #[arg(long, default_value = "*")]
    include_inbound_ports: String,
    /// Inbound ports never redirected (excludeInboundPorts).
    #[arg(long, default_value = "")]
    exclude_inbound_ports: String,
    /// Outbound ports never redirected (excludeOutboundPorts).
    #[arg(long, default_value = "")]
    exclude_outbound_ports: String,
    /// Outbound ports redirected even to excluded ranges (includeOutboundPorts).
    #[arg(long, default_value = "")]
    include_outbound_ports: String,
    /// Remove the rules instead.
    #[arg(long)]
    cleanup: bool,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// nftables (one table, `inet bosun_capture`), iptables (chains BOSUN_INBOUND and
    /// BOSUN_OUTPUT in the nat table, iptables-restore and ip6tables-restore), or auto:
    /// nftables when `nft` is installed, else iptables (node mode's choice).
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Nftables,
    Iptables,
}

const TABLE: &str = "bosun_capture";

fn ports(s: &str, what: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what}: {p:?} is not a port"))
        })
        .collect()
}

/// CIDRs by family: (IPv4, IPv6).
fn ranges(s: &str, what: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for r in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (ip, len) = r.split_once('/').unwrap_or((r, ""));
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{what}: {r:?} is not an IP or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = if len.is_empty() {
            max
        } else {
            len.parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{what}: {r:?}: bad prefix length"))?
        };
        let cidr = format!("{ip}/{len}");
        if ip.is_ipv4() {
            v4.push(cidr)
        } else {
            v6.push(cidr)
        }
    }
    Ok((v4, v6))
}

fn set<T: ToString>(items: &[T]) -> String {
    let v: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{{ {} }}", v.join(", "))
}

/// The nftables transaction that installs (or with `cleanup`, removes)
/// the capture rules. Adding the table first makes the delete succeed
/// whether or not it existed.
pub fn render(a: &CaptureArgs) -> Result<String, String> {
    let mut out = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
    if a.cleanup {
        return Ok(out);
    }
    let mut pre = vec![
        // The proxy's status ports, and anything not TCP, pass.
        "meta l4proto != tcp return".to_string(),
        format!("tcp dport {} return", set(&PROXY_PORTS)),
    ];
    let excl_in = ports(&a.exclude_inbound_ports, "--exclude-inbound-ports")?;
    if !excl_in.is_empty() {
        pre.push(format!("tcp dport {} return", set(&excl_in)));
    }
    if a.include_inbound_ports.trim() != "*" {
        let inc = ports(&a.include_inbound_ports, "--include-inbound-ports")?;
        if inc.is_empty() {
            pre.push("return".into());
        } else {
            pre.push(format!("tcp dport != {} return", set(&inc)));
        }
    }
    pre.push(format!("meta l4proto tcp redirect to :{}", a.inbound_port));

    let mut outp = vec![
        "meta l4proto != tcp return".to_string(),
        // The sidecar's own connections go where they were sent.
        format!("meta skuid {} return", a.proxy_uid),
        format!("meta skgid {} return", a.proxy_gid),
        // The app talking to itself, or to anything on loopback.
        "ip daddr 127.0.0.0/8 return".into(),
        "ip6 daddr ::1 return".into(),
    ];
    let incl_out_ports = ports(&a.include_outbound_ports, "--include-outbound-ports")?;
    if !incl_out_ports.is_empty() {
        outp.push(format!(
            "tcp dport {} redirect to :{}",
            set(&incl_out_ports),
            a.outbound_port
        ));
    }
    let excl_out = ports(&a.exclude_outbound_ports, "--exclude-outbound-ports")?;
    if !excl_out.is_empty() {
        outp.push(format!("tcp dport {} return", set(&excl_out)));
    }
    let (ex4, ex6) = ranges(
        &a.exclude_outbound_ip_ranges,
        "--exclude-outbound-ip-ranges",
    )?;
    if !ex4.is_empty() {
        outp.push(format!("ip daddr {} return", set(&ex4)));
    }
    if !ex6.is_empty() {
        outp.push(format!("ip6 daddr {} return", set(&ex6)));
    }
    if a.include_outbound_ip_ranges.trim() != "*" {
        let (in4, in6) = ranges(
            &a.include_outbound_ip_ranges,
            "--include-outbound-ip-ranges",
        )?;
        // A family with no included range is not redirected at all.
        outp.push(if in4.is_empty() {
            "meta nfproto ipv4 return".into()
        } else {
            format!("ip daddr != {} return", set(&in4))
        });
        outp.push(if in6.is_empty() {
            "meta nfproto ipv6 return".into()
        } else {
            format!("ip6 daddr != {} return", set(&in6))
        });
    }
    outp.push(format!("meta l4proto tcp redirect to :{}", a.outbound_port));

    // priority -100: dstnat (nft takes the name in prerouting only).
    let chain = |name: &str, hook: &str, rules: &[String]| {
        let mut c =
            format!("  chain {name} {{\n    type nat hook {hook} priority -100; policy accept;\n");
        for r in rules {
            c.push_str(&format!("    {r}\n"));
        }
        c.push_str("  }\n");
        c
    };
    out.push_str(&format!("table inet {TABLE} {{\n"));
    out.push_str(&chain("inbound", "prerouting", &pre));
    out.push_str(&chain("outbound", "output", &outp));
    out.push_str("}\n");
    Ok(out)
}

/// The nat-table rules of one family for `iptables-restore --noflush`:
/// the two chains (declared, so emptied) with their rules, and the jumps
/// from PREROUTING and OUTPUT (removed first by the caller, so never
/// twice). `v6`: ip6tables.
pub fn render_iptables(a: &CaptureArgs, v6: bool) -> Result<String, String> {
    let multiport = |ports: &[u16], neg: bool| -> Vec<String> {
        ports
            .chunks(15)
            .map(|c| {
                let list: Vec<String> = c.iter().map(u16::to_string).collect();
                format!(
                    "-p tcp -m multiport {}--dports {}",
                    if neg { "! " } else { "" },
                    list.join(",")
                )
            })
            .collect()
    };
    let mut r = vec![
        "*nat".to_string(),
        ":BOSUN_INBOUND - [0:0]".into(),
        ":BOSUN_OUTPUT - [0:0]".into(),
    ];
    let inb = |rule: String| format!("-A BOSUN_INBOUND {rule}");
    let out = |rule: String| format!("-A BOSUN_OUTPUT {rule}");
    for m in multiport(&PROXY_PORTS, false) {
        r.push(inb(format!("{m} -j RETURN")));
    }
    let excl_in = ports(&a.exclude_inbound_ports, "--exclude-inbound-ports")?;
    for m in multiport(&excl_in, false) {
        r.push(inb(format!("{m} -j RETURN")));
    }
    if a.include_inbound_ports.trim() != "*" {
        let inc = ports(&a.include_inbound_ports, "--include-inbound-ports")?;
        if inc.len() > 15 {
            return Err("--include-inbound-ports: at most 15 ports with iptables".into());
        }
        match multiport(&inc, true).pop() {
            Some(m) => r.push(inb(format!("{m} -j RETURN"))),
            None => r.push(inb("-j RETURN".into())),
        }
    }
    r.push(inb(format!(
        "-p tcp -j REDIRECT --to-ports {}",
        a.inbound_port
    )));

    r.push(out(format!(
        "-m owner --uid-owner {} -j RETURN",
        a.proxy_uid
    )));
    r.push(out(format!(
        "-m owner --gid-owner {} -j RETURN",
        a.proxy_gid
    )));
    r.push(out(format!(
        "-d {} -j RETURN",
        if v6 { "::1/128" } else { "127.0.0.0/8" }
    )));
    let incl_out_ports = ports(&a.include_outbound_ports, "--include-outbound-ports")?;
    for m in multiport(&incl_out_ports, false) {
        r.push(out(format!(
            "{m} -j REDIRECT --to-ports {}",
            a.outbound_port
        )));
    }
    let excl_out = ports(&a.exclude_outbound_ports, "--exclude-outbound-ports")?;
    for m in multiport(&excl_out, false) {
        r.push(out(format!("{m} -j RETURN")));
    }
    let pick = |(v4s, v6s): (Vec<String>, Vec<String>)| if v6 { v6s } else { v4s };
    let excl = pick(ranges(
        &a.exclude_outbound_ip_ranges,
        "--exclude-outbound-ip-ranges",
    )?);
    for c in excl {
        r.push(out(format!("-d {c} -j RETURN")));
    }
    let redirect = format!("-p tcp -j REDIRECT --to-ports {}", a.outbound_port);
    if a.include_outbound_ip_ranges.trim() != "*" {
        let inc = pick(ranges(
            &a.include_outbound_ip_ranges,
            "--include-outbound-ip-ranges",
        )?);
        for c in inc {
            r.push(out(format!("-d {c} {redirect}")));
        }
        r.push(out("-j RETURN".into()));
    } else {
        r.push(out(redirect));
    }
    r.push("-A PREROUTING -p tcp -j BOSUN_INBOUND".into());
    r.push("-A OUTPUT -p tcp -j BOSUN_OUTPUT".into());
    r.push("COMMIT".into());
    Ok(r.join("\n") + "\n")
}

fn backend(a: &CaptureArgs) -> Backend {
    match a.backend {
        Backend::Auto => {
            let has_nft = Command::new("nft")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if has_nft {
                Backend::Nftables
            } else {
                Backend::Iptables
            }
        }
        b => b,
    }
}

/// Runs `cmd` with `input` on stdin; its stderr in the error.
fn pipe(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running {cmd}: {e} (is it installed?)"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("{cmd}: no stdin"))?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} refused the capture rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// iptables: the jumps to Bosun's chains are removed (as often as they
/// are there), then the chains emptied and filled and the jumps added in
/// one iptables-restore per family, so a second run leaves the same rules.
fn run_iptables(a: &CaptureArgs) -> anyhow::Result<ExitCode> {
    let families = [
        (false, "iptables", "iptables-restore"),
        (true, "ip6tables", "ip6tables-restore"),
    ];
    // Everything is rendered (and checked) before anything changes.
    let mut rendered = Vec::new();
    for (v6, _, _) in families {
        rendered.push(render_iptables(a, v6).map_err(anyhow::Error::msg)?);
    }
    if a.dry_run {
        for r in &rendered {
            print!("{r}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for ((_, tool, restore), text) in families.into_iter().zip(&rendered) {
        for (chain, target) in [("PREROUTING", "BOSUN_INBOUND"), ("OUTPUT", "BOSUN_OUTPUT")] {
            for _ in 0..16 {
                let removed = Command::new(tool)
                    .args(["-w", "-t", "nat", "-D", chain, "-p", "tcp", "-j", target])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !removed {
                    break;
                }
            }
        }
        if a.cleanup {
            for chain in ["BOSUN_INBOUND", "BOSUN_OUTPUT"] {
                for op in ["-F", "-X"] {
                    let _ = Command::new(tool)
                        .args(["-w", "-t", "nat", op, chain])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
            continue;
        }
        pipe(restore, &["-w", "--noflush"], text)?;
    }
    println!(
        "{}",
        if a.cleanup {
            "capture rules removed (iptables chains BOSUN_INBOUND, BOSUN_OUTPUT)"
        } else {
            "capture rules installed (iptables chains BOSUN_INBOUND, BOSUN_OUTPUT)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(a: &CaptureArgs) -> anyhow::Result<ExitCode> {
    if backend(a) == Backend::Iptables {
        return run_iptables(a);
    }
    let text = render(a).map_err(anyhow::Error::msg)?;
    if a.dry_run {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    pipe("nft", &["-f", "-"], &text)?;
    println!(
        "{}",
        if a.cleanup {
            "capture rules removed (table inet bosun_capture)"
        } else {
            "capture rules installed (table inet bosun_capture)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CaptureArgs,
    }

    fn args(extra: &[&str]) -> CaptureArgs {
        T::parse_from(std::iter::once("t").chain(extra.iter().copied())).a
    }

    #[test]
    fn annotations_become_rules_and_bad_values_are_refused() {
        let t = render(&args(&[
            "--exclude-inbound-ports",
            "22",
            "--exclude-outbound-ports",
            "3306,5432",
            "--exclude-outbound-ip-ranges",
            "10.0.0.0/8,fd00::/8",
            "--include-outbound-ip-ranges",
            "10.0.0.0/8",
        ]))
        .expect("renders");
        for want in [
            "tcp dport { 15020, 15021, 15090 } return",
            "tcp dport { 22 } return",
            "redirect to :15006",
            "meta skuid 1337 return",
            "tcp dport { 3306, 5432 } return",
            "ip daddr { 10.0.0.0/8 } return",
            "ip6 daddr { fd00::/8 } return",
            "ip daddr != { 10.0.0.0/8 } return",
            "meta nfproto ipv6 return",
            "redirect to :15001",
        ] {
            assert!(t.contains(want), "{want}\n{t}");
        }
        assert!(render(&args(&["--exclude-inbound-ports", "http"])).is_err());
        assert!(render(&args(&["--exclude-outbound-ip-ranges", "10.0.0.0/40"])).is_err());
        let c = render(&args(&["--cleanup"])).expect("cleanup");
        assert_eq!(
            c,
            "table inet bosun_capture {}\ndelete table inet bosun_capture\n"
        );
    }
}

//! Golden tests: a fixture of Services and EndpointSlices → the nftables
//! and iptables text node mode generates, compared with the checked-in
//! files (`UPDATE_GOLDEN=1` rewrites them), and checked by the kernel with
//! `nft -c` and `iptables-restore --test` in a network namespace of its
//! own when this runs as root with those tools (as CI does).

use std::path::Path;
use std::process::{Command, Stdio};

use bosun_control::load::ParseCache;
use bosun_node::services::{Family, service_map};
use bosun_node::{iptables, nft};

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("read golden (UPDATE_GOLDEN=1 writes it)");
    if want != got {
        for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
            assert_eq!(w, g, "{name}: line {} differs", i + 1);
        }
        assert_eq!(
            want.lines().count(),
            got.lines().count(),
            "{name}: line count"
        );
    }
}

fn fixture() -> bosun_node::services::ServiceMap {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/services.yaml");
    let text = std::fs::read_to_string(&path).expect("fixture");
    let cfg = ParseCache::default()
        .load(&[(path.display().to_string(), text)])
        .expect("fixture parses");
    service_map(&cfg, "node-a").expect("fixture is valid")
}

/// Runs `cmd` with `input` on stdin inside a fresh network namespace;
/// `None` when that cannot be done here (not root, tool missing).
fn in_netns(cmd: &[&str], input: &str) -> Option<Result<(), String>> {
    let have = |c: &str| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if !have("ip") || !have(cmd[0]) {
        return None;
    }
    let ns = format!("bsn-golden-{}-{}", std::process::id(), cmd[0]);
    if !Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .ok()?
        .success()
    {
        return None;
    }
    let run = || -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .ok_or("stdin")?
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let r = run();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    Some(r)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn opts() -> nft::Options {
    nft::Options {
        cluster_cidr: Some("10.1.0.0/16,fd00:1::/48".into()),
    }
}

/// The IPv4 rendering of `services`, from `prev`.
fn v4(
    services: &bosun_node::services::ServiceMap,
    prev: Option<&nft::Rendered>,
    split: nft::Split,
) -> nft::Rendered {
    nft::render(Family::V4, services, &nft::Options::default(), prev, split)
}

/// A diff that touches no rule, chain or set: map elements only.
fn assert_elements_only(diff: &str) {
    for line in diff.lines() {
        assert!(
            line.starts_with("add element ") || line.starts_with("delete element "),
            "{diff}"
        );
    }
}

#[test]
fn nftables_ruleset_matches_golden_and_the_kernel_accepts_it() {
    let services = fixture();
    let text: String = [Family::V4, Family::V6]
        .iter()
        .map(|f| {
            nft::full_text(&nft::render(
                *f,
                &services,
                &opts(),
                None,
                nft::Split::Exact,
            ))
        })
        .collect();
    golden("services.nft", &text);
    if is_root() {
        match in_netns(&["nft", "-c", "-f", "-"], &text) {
            Some(r) => r.expect("nft -c refused the generated ruleset"),
            None => eprintln!("nft or ip missing: kernel check skipped"),
        }
    }
}

#[test]
fn iptables_rules_match_golden_and_the_kernel_accepts_them() {
    let services = fixture();
    for (f, name, restore) in [
        (Family::V4, "services.iptables", "iptables-restore"),
        (Family::V6, "services.ip6tables", "ip6tables-restore"),
    ] {
        let text = iptables::restore_text(&iptables::render(f, &services, &opts()), None);
        golden(name, &text);
        if is_root() {
            match in_netns(&[restore, "--test", "--noflush"], &text) {
                Some(r) => r.expect("the kernel refused the generated rules"),
                None => eprintln!("{restore} or ip missing: kernel check skipped"),
            }
        }
    }
}

#[test]
fn a_change_to_one_service_touches_only_its_pieces() {
    let mut services = fixture();
    let before = v4(&services, None, nft::Split::Exact);
    let Some(web) = services.get_mut("shop/web/tcp/http") else {
        panic!("fixture has shop/web/tcp/http");
    };
    std::sync::Arc::make_mut(web)
        .endpoints
        .retain(|e| e.ip.to_string() != "10.1.2.2");
    let after = v4(&services, Some(&before), nft::Split::KeepRules);
    let diff = nft::diff_text(&before, &after).expect("a change");
    golden("web-endpoint-removed.nft", &diff);
    // An endpoint gone keeps the rule: elements only, the split uneven...
    assert_elements_only(&diff);
    assert!(after.skewed());
    // ...until an exact rendering changes the rule (and only that service).
    let exact = v4(&services, Some(&after), nft::Split::Exact);
    assert!(!exact.skewed());
    let evened = nft::diff_text(&after, &exact).expect("a change");
    golden("web-endpoint-removed-exact.nft", &evened);
    assert!(
        evened.contains("flush chain ip bosun svc-shop/web/tcp/http"),
        "{evened}"
    );
    // The kernel takes the changes on top of the full ruleset, each in a
    // transaction of its own (nft then reads the maps back from the kernel).
    if is_root() {
        let full = std::env::temp_dir().join(format!("bsn-full-{}.nft", std::process::id()));
        let first = std::env::temp_dir().join(format!("bsn-diff-{}.nft", std::process::id()));
        std::fs::write(&full, nft::full_text(&before)).expect("write");
        std::fs::write(&first, &diff).expect("write");
        let script = format!(
            "nft -f {} && nft -f {} && nft -f -",
            full.display(),
            first.display()
        );
        let r = in_netns(&["sh", "-c", &script], &evened);
        let _ = std::fs::remove_file(&first);
        let _ = std::fs::remove_file(&full);
        if let Some(r) = r {
            r.expect("the kernel refused the partial sync");
        }
    }
    // Unchanged services keep their rendered piece (not rendered again).
    for (id, piece) in &after.pieces {
        if &**id != "shop/web/tcp/http" {
            assert!(
                before
                    .piece(id)
                    .is_some_and(|b| std::sync::Arc::ptr_eq(piece, b)),
                "{id} re-rendered"
            );
        }
    }
    assert!(nft::diff_text(&after, &v4(&services, Some(&after), nft::Split::KeepRules)).is_none());
}

#[test]
fn an_endpoint_replaced_is_an_element_change_only() {
    let mut services = fixture();
    let before = v4(&services, None, nft::Split::Exact);
    let Some(web) = services.get_mut("shop/web/tcp/http") else {
        panic!("fixture has shop/web/tcp/http");
    };
    // A pod replaced: same count, a new address.
    for e in &mut std::sync::Arc::make_mut(web).endpoints {
        if e.ip.to_string() == "10.1.2.2" {
            e.ip = "10.1.2.9".parse().expect("ip");
        }
    }
    let after = v4(&services, Some(&before), nft::Split::KeepRules);
    let diff = nft::diff_text(&before, &after).expect("a change");
    golden("web-endpoint-replaced.nft", &diff);
    // No rule or chain is touched: the kernel does not re-validate the table.
    assert_elements_only(&diff);
    // A new service takes a free block; the others keep theirs.
    let mut more = services.clone();
    let Some(mut extra) = more.get("shop/web/tcp/http").cloned() else {
        panic!("fixture has shop/web/tcp/http");
    };
    std::sync::Arc::make_mut(&mut extra).id = "aaa/first/tcp/http".into();
    more.insert(extra.id.clone(), extra);
    let grown = v4(&more, Some(&after), nft::Split::KeepRules);
    let blocks = |r: &nft::Rendered| -> Vec<u32> {
        let mut v: Vec<u32> = r
            .pieces
            .iter()
            .flat_map(|(_, p)| p.1.blocks.values().copied())
            .collect();
        v.sort();
        v
    };
    let (old, new) = (blocks(&after), blocks(&grown));
    assert_eq!(new.len(), old.len() + 1);
    assert!(old.iter().all(|b| new.contains(b)), "{old:?} {new:?}");
    let mut dedup = new.clone();
    dedup.dedup();
    assert_eq!(dedup, new, "no block is shared");
}

#[test]
fn an_endpoint_added_takes_a_slot_without_a_rule_change() {
    let mut services = fixture();
    let before = v4(&services, None, nft::Split::Exact);
    let Some(web) = services.get_mut("shop/web/tcp/http") else {
        panic!("fixture has shop/web/tcp/http");
    };
    let web = std::sync::Arc::make_mut(web);
    let mut new = web.endpoints[0].clone();
    new.ip = "10.1.3.9".parse().expect("ip");
    web.endpoints.push(new);
    web.endpoints.sort();
    let after = v4(&services, Some(&before), nft::Split::KeepRules);
    let diff = nft::diff_text(&before, &after).expect("a change");
    // Map elements only, the newcomer in a slot already...
    assert_elements_only(&diff);
    assert!(diff.contains(": 10.1.3.9 . 8080"), "{diff}");
    assert!(after.skewed());
    // ...and the exact split (one more slot) follows as a rule change.
    let exact = v4(&services, Some(&after), nft::Split::Exact);
    let evened = nft::diff_text(&after, &exact).expect("a change");
    assert!(evened.contains("numgen random mod 3 offset"), "{evened}");
    assert!(!exact.skewed());
}

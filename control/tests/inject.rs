//! `bosun inject` over Istio's bookinfo sample and every workload kind:
//! golden files (UPDATE_GOLDEN=1 rewrites them), idempotence, and the
//! webhook's JSONPatch yielding the same pod as the CLI.

use std::path::Path;

use bosun_control::inject::{InjectOptions, inject_object, inject_yaml, review};
use serde_json::{Value, json};

fn data(p: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(p);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path).expect("read golden (UPDATE_GOLDEN=1 writes it)");
    assert!(
        want == got,
        "{name} differs from the golden file; run with UPDATE_GOLDEN=1 and review the diff"
    );
}

fn docs(yaml: &str) -> Vec<Value> {
    bosun_control::load::split_documents(yaml)
        .into_iter()
        .map(|(_, d)| serde_saphyr::from_str(d).expect("yaml"))
        .collect()
}

#[test]
fn bookinfo_golden_and_idempotent() {
    let opts = InjectOptions::default();
    let once = inject_yaml(&data("bookinfo/bookinfo.yaml"), &opts).expect("inject");
    golden("bookinfo-injected.yaml", &once);
    let twice = inject_yaml(&once, &opts).expect("inject again");
    assert_eq!(once, twice, "injecting twice changes nothing");
    // Every Deployment got the proxy and the init container; the
    // Services and ServiceAccounts are untouched.
    let out = docs(&once);
    let deployments: Vec<&Value> = out.iter().filter(|d| d["kind"] == "Deployment").collect();
    assert_eq!(deployments.len(), 6);
    for d in deployments {
        let spec = &d["spec"]["template"]["spec"];
        let names: Vec<&str> = spec["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert!(names.contains(&"bosun-proxy"), "{names:?}");
        assert_eq!(spec["initContainers"][0]["name"], "bosun-init");
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["security.istio.io/tlsMode"],
            "istio"
        );
    }
    let input = docs(&data("bookinfo/bookinfo.yaml"));
    for (a, b) in input.iter().zip(&out) {
        if a["kind"] != "Deployment" {
            assert_eq!(a, b, "{} changed", a["kind"]);
        }
    }
}

#[test]
fn every_workload_kind_golden() {
    let opts = InjectOptions::default();
    let once = inject_yaml(&data("inject/workloads.yaml"), &opts).expect("inject");
    golden("workloads-injected.yaml", &once);
    assert_eq!(inject_yaml(&once, &opts).expect("again"), once);
    let out = docs(&once);
    let injected = |kind: &str, name: &str| -> bool {
        let d = out
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"));
        serde_json::to_string(d)
            .expect("json")
            .contains("\"bosun-proxy\"")
    };
    for (kind, name, want) in [
        ("Pod", "web", true),
        ("Deployment", "api", true),
        ("StatefulSet", "db", true),
        ("DaemonSet", "agent", true),
        ("DaemonSet", "host-agent", false),
        ("ReplicaSet", "worker", false),
        ("Job", "migrate", false),
        ("Job", "report", true),
        ("CronJob", "nightly", true),
        ("Deployment", "old", false),
        ("Service", "web", false),
    ] {
        assert_eq!(injected(kind, name), want, "{kind} {name}");
    }
}

#[test]
fn broken_input_is_refused_with_the_document_named() {
    let opts = InjectOptions::default();
    let e = inject_yaml(
        "kind: Pod\nmetadata: {name: x}\nspec: {containers: [\n",
        &opts,
    )
    .expect_err("truncated YAML");
    assert!(e.contains("line 1"), "{e}");
    let e = inject_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    livenessProbe: {httpGet: {port: missing}}\n",
        &opts,
    )
    .expect_err("unknown named port");
    assert!(e.contains("Pod p") && e.contains("livenessProbe"), "{e}");
}

/// Applies RFC 6902 `add` operations on object members (all the webhook sends).
fn apply_patch(doc: &mut Value, patch: &Value) {
    for op in patch.as_array().expect("ops") {
        assert_eq!(op["op"], "add");
        let path = op["path"].as_str().expect("path");
        let (parent, key) = path.rsplit_once('/').expect("path");
        let target = if parent.is_empty() {
            &mut *doc
        } else {
            doc.pointer_mut(parent).expect("parent exists")
        };
        target
            .as_object_mut()
            .expect("object")
            .insert(key.to_string(), op["value"].clone());
    }
}

#[test]
fn webhook_patch_yields_the_cli_pod() {
    use base64::Engine;
    let opts = InjectOptions::default();
    let input = docs(&data("inject/workloads.yaml"));
    let pod = input
        .iter()
        .find(|d| d["kind"] == "Pod")
        .expect("pod")
        .clone();
    let mut cli = pod.clone();
    assert!(inject_object(&mut cli, &opts, &|_| None).expect("inject"));
    let req = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "object": pod,
        }
    });
    let resp = review(&req, &opts);
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: Value = serde_json::from_slice(&patch).expect("json patch");
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);
    assert_eq!(patched, cli);
    // An injected pod, or one that opts out, gets no patch.
    let again = json!({"request": {"uid": "u2", "kind": {"kind": "Pod"}, "object": cli}});
    let r = review(&again, &opts);
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"].get("patch").is_none());
}

use super::*;
use crate::load::load_sources;

const CANARY: &str = include_str!("../../../examples/canary/canary.yaml");

/// A Service with an EndpointSlice, its Pods, and a subset on their labels.
pub(crate) const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-x, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: reviews-v1-abc, namespace: shop, uid: u1}
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: reviews-v2-def, namespace: shop, uid: u2}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, namespace: shop, labels: {app: reviews, version: v1}}
spec: {containers: [{name: app, image: reviews:1}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-def, namespace: shop, labels: {app: reviews, version: v2}}
spec: {containers: [{name: app, image: reviews:2}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"#;

fn gw_params() -> ProxyParams {
    ProxyParams {
        mode: ProxyMode::Gateway,
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        ..Default::default()
    }
}

#[test]
fn canary_translates_for_the_gateway() {
    let cfg = load_sources(&[("canary.yaml".into(), CANARY.into())]).expect("parses");
    let out = translate(&cfg, &gw_params()).expect("valid");
    assert_eq!(out.listeners.len(), 1);
    let names: Vec<_> = out.clusters.iter().map(|c| c.name.as_str()).collect();
    assert!(
        names.contains(&"outbound|8080|v1|reviews.demo.svc.cluster.local"),
        "{names:?}"
    );
    let v1 = out
        .load_assignments
        .iter()
        .find(|a| a.cluster.contains("|v1|"))
        .expect("v1 endpoints");
    assert_eq!(v1.endpoints.len(), 1);
    assert_eq!(
        v1.endpoints[0].labels.get("version").map(String::as_str),
        Some("v1")
    );
    // Same input, same version: versions are content hashes.
    let again = translate(&cfg, &gw_params()).expect("valid");
    assert_eq!(out.version, again.version);
}

#[test]
fn undefined_subset_is_an_error_naming_the_field() {
    let bad = CANARY.replace("subset: v2", "subset: v9");
    let cfg = load_sources(&[("canary.yaml".into(), bad)]).expect("parses");
    let err = translate(&cfg, &gw_params()).expect_err("v9 is undefined");
    let e = &err.0[0];
    assert!(e.resource.starts_with("VirtualService/demo/"), "{e}");
    assert!(e.field.contains("route[1].destination"), "{e}");
    assert!(e.message.contains("v9"), "{e}");
}

const POLICY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: ns}
spec:
  selector: {app: ratings}
  ports:
  - {name: http, port: 9080, targetPort: 8080}
  - {name: grpc-api, port: 9090}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-1, namespace: ns}
spec:
  address: 10.0.0.1
  labels: {app: ratings, version: v1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-2, namespace: ns}
spec:
  address: 10.0.0.2
  ports: {http: 18080}
  labels: {app: ratings, version: v2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: ns}
spec:
  address: 10.0.0.9
  labels: {app: other}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: ns}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: X-User, maglev: {tableSize: 1009}}
"#;

#[test]
fn policies_merge_subset_over_port_over_top_and_services_select_workload_entries() {
    let cfg = load_sources(&[("p.yaml".into(), POLICY.into())]).expect("parses");
    let out = translate(&cfg, &ProxyParams::default()).expect("valid");
    let cluster = |name: &str| {
        out.clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let host = "ratings.ns.svc.cluster.local";
    assert_eq!(
        cluster(&format!("outbound|9080||{host}")).lb_policy,
        pb::LbPolicy::Random as i32
    );
    assert_eq!(
        cluster(&format!("outbound|9090||{host}")).lb_policy,
        pb::LbPolicy::LeastRequest as i32
    );
    assert_eq!(
        cluster(&format!("outbound|9090||{host}")).protocol,
        pb::UpstreamProtocol::Http2 as i32
    );
    // Subsets are only built when routed to; build them through the registry.
    let params = ProxyParams {
        mode: ProxyMode::Sidecar,
        ..Default::default()
    };
    let eps = |c: &str| -> Vec<(String, u32)> {
        out.load_assignments
            .iter()
            .find(|a| a.cluster == c)
            .map(|a| {
                a.endpoints
                    .iter()
                    .map(|e| (e.address.clone(), e.port))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The Service selects the two ratings WorkloadEntries, not "other";
    // a named WorkloadEntry port wins over targetPort.
    assert_eq!(
        eps(&format!("outbound|9080||{host}")),
        vec![
            ("10.0.0.1".to_string(), 8080),
            ("10.0.0.2".to_string(), 18080)
        ]
    );
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - {destination: {host: ratings, subset: v1, port: {number: 9080}}, weight: 50}\n    - {destination: {host: ratings, subset: v2, port: {number: 9080}}, weight: 50}\n";
    let cfg = load_sources(&[
        ("p.yaml".into(), POLICY.into()),
        ("vs.yaml".into(), vs.into()),
    ])
    .expect("parses");
    let out = translate(&cfg, &params).expect("valid");
    let v2 = out
        .clusters
        .iter()
        .find(|c| c.name == format!("outbound|9080|v2|{host}"))
        .expect("v2");
    assert_eq!(v2.lb_policy, pb::LbPolicy::Maglev as i32);
    assert_eq!(v2.table_size, 1009);
    assert_eq!(
        v2.hash_policy.as_ref().and_then(|h| h.key.clone()),
        Some(pb::hash_policy::Key::HeaderName("x-user".into()))
    );
    let v1 = out
        .clusters
        .iter()
        .find(|c| c.name == format!("outbound|9080|v1|{host}"))
        .expect("v1");
    assert_eq!(
        v1.lb_policy,
        pb::LbPolicy::Random as i32,
        "top-level policy"
    );
}

#[test]
fn weights_must_sum_to_100() {
    let bad = CANARY.replace("weight: 10", "weight: 20");
    let cfg = load_sources(&[("canary.yaml".into(), bad)]).expect("parses");
    let err = translate(&cfg, &gw_params()).expect_err("110");
    assert!(err.0[0].message.contains("sum to 110"), "{}", err.0[0]);
    assert_eq!(err.0[0].field, "spec.http[0].route");
}

/// The service hosts of the clusters a sidecar in `ns` receives.
fn cluster_hosts(cfg: &Config, ns: &str) -> Vec<String> {
    let p = ProxyParams {
        namespace: ns.into(),
        ..Default::default()
    };
    let out = translate(cfg, &p).expect("valid");
    out.clusters
        .iter()
        .map(|c| c.service_host.clone())
        .collect()
}

#[test]
fn sidecar_egress_and_export_to_scope_what_a_proxy_receives() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: c}
spec:
  hosts: [private.c.internal]
  exportTo: ["."]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: a}
spec:
  egress:
  - hosts: ["./*"]
"#;
    let cfg = load_sources(&[("s.yaml".into(), y.into())]).expect("parses");
    assert_eq!(cfg.sidecars.len(), 1, "{:?}", cfg.sidecars);
    let hosts = |ns: &str| cluster_hosts(&cfg, ns);
    // Namespace a's Sidecar: only its own namespace.
    assert_eq!(hosts("a"), vec!["web.a.svc.cluster.local".to_string()]);
    // Namespace b: no Sidecar, but c's private entry is not exported to it.
    assert_eq!(
        hosts("b"),
        vec![
            "db.b.svc.cluster.local".to_string(),
            "web.a.svc.cluster.local".to_string()
        ]
    );
    assert!(hosts("c").contains(&"private.c.internal".to_string()));
}

#[test]
fn a_mesh_wide_sidecar_scopes_each_proxy_to_its_own_namespace_and_the_check_sees_all() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: b}
spec:
  hosts: [db]
  http: [{route: [{destination: {host: db, subset: v9}}]}]
"#;
    let cfg = load_sources(&[("s.yaml".into(), y.into())]).expect("parses");
    let fixed = y.replace(", subset: v9", "");
    let good = load_sources(&[("s.yaml".into(), fixed)]).expect("parses");
    let hosts = |ns: &str| cluster_hosts(&good, ns);
    // `.` in the mesh-wide Sidecar is each proxy's own namespace.
    assert_eq!(hosts("a"), vec!["web.a.svc.cluster.local".to_string()]);
    assert_eq!(hosts("b"), vec!["db.b.svc.cluster.local".to_string()]);
    // The check is not scoped: b's bad route is refused although the
    // check's proxy (namespace default) would not see db.
    let err = check(&cfg).expect_err("subset v9 is undefined");
    assert!(
        err.0.iter().any(|e| e.resource == "VirtualService/b/db"),
        "{err}"
    );
    check(&good).expect("valid");
    // Two TCP services on one port clash only where one proxy sees both:
    // scoped to their namespaces they do not; without the Sidecar they do.
    let redis = |ns: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: redis, namespace: {ns}}}\nspec: {{ports: [{{name: tcp, port: 6379}}]}}\n"
        )
    };
    let two = format!(
        "{}{}{}",
        y.replace(", subset: v9", ""),
        redis("a"),
        redis("b")
    );
    let scoped = load_sources(&[("s.yaml".into(), two.clone())]).expect("parses");
    check(&scoped).expect("each proxy sees one redis");
    // The same Sidecar in another namespace scopes nobody here.
    let unscoped_yaml = two.replace(
        "metadata: {name: default, namespace: istio-system}",
        "metadata: {name: default, namespace: elsewhere}",
    );
    let unscoped = load_sources(&[("s.yaml".into(), unscoped_yaml)]).expect("parses");
    let err = check(&unscoped).expect_err("a proxy in default sees both");
    assert!(err.to_string().contains("TCP port 6379"), "{err}");
}

#[test]
fn export_to_dot_keeps_routing_and_policies_in_their_namespace() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: b}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: b}
spec:
  host: api
  exportTo: ["."]
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: b}
spec:
  hosts: [api]
  exportTo: ["."]
  http:
  - route: [{destination: {host: api}}]
    headers: {request: {set: {x-from-b-vs: "1"}}}
"#;
    let cfg = load_sources(&[("e.yaml".into(), y.into())]).expect("parses");
    let view = |ns: &str| {
        let p = ProxyParams {
            namespace: ns.into(),
            ..Default::default()
        };
        let out = translate(&cfg, &p).expect("valid");
        let lb = out.clusters[0].lb_policy;
        let vs_applied = out.route_configurations[0].virtual_hosts[0].routes[0]
            .request_headers
            .is_some();
        (lb, vs_applied)
    };
    assert_eq!(view("b"), (pb::LbPolicy::Random as i32, true));
    assert_eq!(view("a"), (pb::LbPolicy::RoundRobin as i32, false));
}

#[test]
fn endpoint_slice_endpoints_take_their_pods_labels_for_subsets() {
    let y = SHOP;
    let cfg = load_sources(&[("p.yaml".into(), y.into())]).expect("parses");
    let p = ProxyParams {
        namespace: "shop".into(),
        ..Default::default()
    };
    let out = translate(&cfg, &p).expect("valid");
    let v2 = out
        .load_assignments
        .iter()
        .find(|a| a.cluster == "outbound|9080|v2|reviews.shop.svc.cluster.local")
        .expect("v2 subset");
    let addrs: Vec<&str> = v2.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, vec!["10.0.0.2"]);
    assert_eq!(v2.endpoints[0].workload, "reviews-v2-def");
}

#[test]
fn client_ip_affinity_hashes_on_the_source_address_unless_a_destination_rule_decides() {
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}\n  ports: [{{name: http, port: 80}}]\n---\n"
        )
    };
    let y = format!(
        "{}{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: b, namespace: shop}}\nspec: {{host: b, trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}}}\n",
        svc("a"),
        svc("b")
    );
    let cfg = load_sources(&[("p.yaml".into(), y)]).expect("parses");
    let out = translate(&cfg, &ProxyParams::default()).expect("valid");
    let cluster = |host: &str| {
        out.clusters
            .iter()
            .find(|c| c.service_host == host)
            .cloned()
            .expect("cluster")
    };
    let a = cluster("a.shop.svc.cluster.local");
    assert_eq!(a.lb_policy, pb::LbPolicy::RingHash as i32);
    assert_eq!(
        a.hash_policy.and_then(|h| h.key),
        Some(pb::hash_policy::Key::SourceIp(true))
    );
    let b = cluster("b.shop.svc.cluster.local");
    assert_eq!(b.lb_policy, pb::LbPolicy::LeastRequest as i32);
    // Anything else is refused with the field named.
    let bad = svc("c").replace("ClientIP\n", "Sticky\n");
    let cfg = load_sources(&[("p.yaml".into(), bad)]).expect("parses");
    let err = translate(&cfg, &ProxyParams::default()).expect_err("refused");
    assert!(err.to_string().contains("spec.sessionAffinity"), "{err}");
}

/// Sidecars and node mode read endpoints by the same liveness rule: ready
/// ones, or serving-terminating ones when nothing is ready.
#[test]
fn sidecars_and_node_mode_agree_on_which_endpoints_are_live() {
    let slice = |eps: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}"
        )
    };
    let terminating = "- addresses: [10.0.0.1]\n  conditions: {ready: false, serving: true, terminating: true}\n\
                       - addresses: [10.0.0.2]\n  conditions: {ready: false, serving: false, terminating: true}\n";
    let with_ready =
        format!("{terminating}- addresses: [10.0.0.3]\n  conditions: {{ready: true}}\n");
    for (eps, want) in [
        (terminating.to_string(), vec!["10.0.0.1"]),
        (with_ready, vec!["10.0.0.3"]),
    ] {
        let cfg = load_sources(&[("s.yaml".into(), slice(&eps))]).expect("parses");
        let out = translate(&cfg, &ProxyParams::default()).expect("valid");
        let sidecar: Vec<&str> = out
            .load_assignments
            .iter()
            .find(|a| a.cluster.ends_with("web.shop.svc.cluster.local"))
            .expect("cluster")
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(sidecar, want);
        let map = crate::node_services::service_map(&cfg, "n1").expect("node map");
        let node: Vec<String> = map
            .values()
            .flat_map(|sp| sp.endpoints.iter().map(|e| e.ip.to_string()))
            .collect();
        assert_eq!(node, want);
    }
}

/// A bad traffic policy is reported once, at its DestinationRule's field,
/// even where no route uses the rule.
#[test]
fn bad_traffic_policies_are_reported_at_the_destination_rule() {
    let y = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: nowhere-routed
  trafficPolicy:
    connectionPool: {http: {maxConcurrentStreams: 10}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        outlierDetection: {maxEjectionPercent: 150}
"#;
    let cfg = load_sources(&[("dr.yaml".into(), y.into())]).expect("parses");
    let err = check(&cfg).expect_err("two bad fields");
    let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].outlierDetection.maxEjectionPercent"
        ],
        "{err}"
    );
    assert!(err.0.iter().all(|e| e.resource == "DestinationRule/shop/r"));
}

/// Two TCP Services on one port, an HTTP one, an undeclared one, a TLS
/// ServiceEntry by SNI and one with `resolution: NONE`.
const CAPTURED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db-a, namespace: shop}
spec: {clusterIP: 10.96.0.5, selector: {app: db-a}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-b, namespace: shop}
spec: {clusterIP: 10.96.0.6, selector: {app: db-b}, ports: [{name: tcp, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-a-x, namespace: shop, labels: {kubernetes.io/service-name: db-a}}
addressType: IPv4
ports: [{name: tcp, port: 5432}]
endpoints:
- addresses: [10.0.1.1]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.7, selector: {app: web}, ports: [{name: http, port: 8080}, {port: 7000}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any-ext, namespace: shop}
spec:
  hosts: ["*.partner.example"]
  ports: [{number: 80, name: http, protocol: HTTP}]
"#;

/// A captured sidecar of `app: web` in `shop`.
fn captured_web() -> ProxyParams {
    ProxyParams {
        namespace: "shop".into(),
        capture: true,
        inbound: Some(("0.0.0.0".into(), 15006, 0)),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    }
}

/// The listener named `name` of a translated config.
fn listener<'a>(out: &'a pb::ProxyConfig, name: &str) -> &'a pb::Listener {
    out.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

#[test]
fn captured_sidecars_route_by_original_destination() {
    let cfg = load_sources(&[("c.yaml".into(), CAPTURED.into())]).expect("parses");
    // Without capture, two TCP services on one port clash (one listener each).
    let plain = ProxyParams {
        namespace: "shop".into(),
        ..Default::default()
    };
    let e = translate(&cfg, &plain).expect_err("clash without capture");
    assert!(e.to_string().contains("TCP port 5432"), "{e}");
    let p = captured_web();
    let out = translate(&cfg, &p).expect("no clash with capture");
    let outbound = listener(&out, "outbound_http");
    assert_eq!(
        out.listeners.len(),
        2,
        "one outbound and one inbound listener"
    );
    let cap = outbound.capture.as_ref().expect("capture");
    let target = |addr: &str, port: u32| {
        cap.targets
            .iter()
            .find(|t| t.address == addr && t.port == port)
            .unwrap_or_else(|| panic!("no target {addr}:{port}: {:#?}", cap.targets))
    };
    let cluster_of = |t: &pb::CaptureTarget| t.tcp_routes[0].clusters[0].cluster.clone();
    assert_eq!(
        cluster_of(target("10.96.0.5", 5432)),
        "outbound|5432||db-a.shop.svc.cluster.local"
    );
    assert_eq!(
        cluster_of(target("10.96.0.6", 5432)),
        "outbound|5432||db-b.shop.svc.cluster.local"
    );
    // An endpoint dialled directly: that endpoint of the service.
    assert!(target("10.0.1.1", 5432).pin_endpoint);
    // HTTP: any address on the port, by Host; the ClusterIP is a domain.
    assert_eq!(target("", 8080).protocol, pb::CaptureProtocol::Http as i32);
    // Undeclared: sniffed, with the TCP route for what is not HTTP.
    assert_eq!(
        target("10.96.0.7", 7000).protocol,
        pb::CaptureProtocol::Sniff as i32
    );
    // TLS without an address: by SNI on the port.
    let tls = target("", 443);
    assert_eq!(tls.protocol, pb::CaptureProtocol::Tls as i32);
    assert_eq!(tls.sni_routes[0].server_names, vec!["api.example.com"]);
    // ALLOW_ANY: PassthroughCluster, for TCP and for unknown Hosts.
    assert_eq!(cap.passthrough_cluster, "PassthroughCluster");
    let pc = out
        .clusters
        .iter()
        .find(|c| c.name == "PassthroughCluster")
        .expect("passthrough");
    assert!(pc.original_dst);
    // resolution NONE: an ORIGINAL_DST cluster, routed by Host.
    let none = out
        .clusters
        .iter()
        .find(|c| c.name == "outbound|80||*.partner.example")
        .expect("NONE cluster");
    assert!(none.original_dst);
    let rc = out
        .route_configurations
        .iter()
        .find(|r| r.name == "outbound")
        .expect("routes");
    let web = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "web.shop.svc.cluster.local:8080")
        .expect("web vhost");
    assert!(web.domains.contains(&"10.96.0.7:8080".to_string()));
    assert_eq!(
        rc.virtual_hosts.last().map(|v| v.name.as_str()),
        Some("allow_any")
    );
    // Inbound: the app's ports by protocol, to the dialled port.
    let inbound = listener(&out, "inbound_capture");
    let icap = inbound.capture.as_ref().expect("inbound capture");
    assert!(icap.inbound);
    assert_eq!(icap.passthrough_cluster, "InboundPassthroughCluster");

    // REGISTRY_ONLY: no passthrough; unknown Hosts get 502.
    let mut y = CAPTURED.to_string();
    y.push_str("---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  egress: [{port: {number: 8080, protocol: HTTP, name: http}, hosts: [\"./*\"]}, {hosts: [\"./db-a.shop.svc.cluster.local\"]}]\n");
    let cfg = load_sources(&[("c.yaml".into(), y)]).expect("parses");
    let out = translate(&cfg, &p).expect("valid");
    let outbound = listener(&out, "outbound_http");
    let cap = outbound.capture.as_ref().expect("capture");
    assert_eq!(cap.passthrough_cluster, "");
    // egress[].port: only web's 8080 (and db-a) are in scope.
    assert!(cap.targets.iter().any(|t| t.port == 8080));
    assert!(cap.targets.iter().any(|t| t.address == "10.96.0.5"));
    assert!(
        !cap.targets
            .iter()
            .any(|t| t.address == "10.96.0.6" || t.port == 7000)
    );
    let rc = out
        .route_configurations
        .iter()
        .find(|r| r.name == "outbound")
        .expect("routes");
    assert_eq!(
        rc.virtual_hosts.last().map(|v| v.name.as_str()),
        Some("block_all")
    );
}

#[test]
fn sidecar_ingress_sends_a_port_to_its_default_endpoint_and_unsupported_fields_are_refused() {
    let mut y = CAPTURED.to_string();
    y.push_str("---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: web, namespace: shop}\nspec:\n  workloadSelector: {labels: {app: web}}\n  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    defaultEndpoint: 127.0.0.1:8080\n");
    let cfg = load_sources(&[("c.yaml".into(), y.clone())]).expect("parses");
    let p = captured_web();
    let out = translate(&cfg, &p).expect("valid");
    let cla = out
        .load_assignments
        .iter()
        .find(|a| a.cluster == "inbound|9080||")
        .expect("ingress cluster");
    assert_eq!(
        (cla.endpoints[0].address.as_str(), cla.endpoints[0].port),
        ("127.0.0.1", 8080)
    );
    let rc = out
        .route_configurations
        .iter()
        .find(|r| r.name == "inbound")
        .expect("inbound routes");
    let routes = &rc.virtual_hosts[0].routes;
    assert_eq!(routes[0].matches[0].port, 9080);
    assert_eq!(routes.len(), 2, "the ingress port, then every other port");
    let inbound = listener(&out, "inbound_capture");
    let t = inbound
        .capture
        .as_ref()
        .expect("capture")
        .targets
        .iter()
        .find(|t| t.port == 9080)
        .expect("9080");
    assert_eq!(t.protocol, pb::CaptureProtocol::Http as i32);

    // Fields Bosun does not implement are errors with the field named.
    y.push_str("---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: other, namespace: shop}\nspec:\n  workloadSelector: {labels: {app: db-a}}\n  ingress:\n  - port: {number: 5432}\n    defaultEndpoint: unix:///var/run/db.sock\n    tls: {mode: SIMPLE}\n  egress:\n  - hosts: [\"./*\"]\n    bind: 127.0.0.2\n  outboundTrafficPolicy: {mode: BLOCK_ALL, egressProxy: {host: egress}}\n");
    let cfg = load_sources(&[("c.yaml".into(), y)]).expect("parses");
    let errors = crate::validate::validate(&cfg);
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let text = text.join("\n");
    for want in [
        "Sidecar/shop/other: spec.ingress[0].defaultEndpoint",
        "Sidecar/shop/other: spec.ingress[0].tls",
        "Sidecar/shop/other: spec.egress[0].bind",
        "Sidecar/shop/other: spec.outboundTrafficPolicy.mode",
        "Sidecar/shop/other: spec.outboundTrafficPolicy.egressProxy",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn captured_inbound_keeps_port_level_mtls() {
    let mut y = CAPTURED.to_string();
    y.push_str("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"7000\": {mode: DISABLE}\n    \"9999\": {mode: PERMISSIVE}\n");
    let cfg = load_sources(&[("c.yaml".into(), y)]).expect("parses");
    let p = captured_web();
    let out = translate(&cfg, &p).expect("valid");
    let inbound = listener(&out, "inbound_capture");
    assert_eq!(inbound.peer_mtls, pb::PeerMtls::Strict as i32);
    let targets = &inbound.capture.as_ref().expect("capture").targets;
    let mode = |port: u32| {
        targets
            .iter()
            .find(|t| t.port == port)
            .and_then(|t| t.peer_mtls)
    };
    assert_eq!(mode(7000), Some(pb::PeerMtls::Disable as i32));
    assert_eq!(mode(9999), Some(pb::PeerMtls::Permissive as i32));
    assert_eq!(mode(8080), None, "the workload's mode");
}

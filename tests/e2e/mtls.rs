//! Mutual TLS between sidecars: certificates from the control service's
//! CA (Istio's CSR API) or from files made by openssl, PeerAuthentication,
//! XFCC, rotation, and the authenticated xDS/CA port.
//!
//! The mesh: app A (the test) → sidecar A's outbound listener → Istio
//! mutual TLS → sidecar B's inbound listener → app B (an echo backend that
//! returns the headers it got).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bosun_proxy::tls;

use crate::harness::*;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const HOST: &str = "reviews.default.svc.cluster.local:9080";

/// The service `reviews`, whose one endpoint is sidecar B's inbound
/// listener, labelled for auto mTLS.
fn mesh_yaml(inbound: SocketAddr, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  resolution: STATIC
  ports:
  - {{number: 9080, name: http, protocol: HTTP}}
  endpoints:
  - address: {}
    ports: {{http: {}}}
    serviceAccount: reviews
    labels: {{app: reviews, security.istio.io/tlsMode: istio}}
---
{extra}",
        inbound.ip(),
        inbound.port()
    )
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
";

fn tokens_yaml() -> String {
    "tokens:
- {token: productpage-token-0123456789, namespace: default, serviceAccount: productpage}
- {token: reviews-token-0123456789abcdef, namespace: default, serviceAccount: reviews}
"
    .into()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write");
    path.to_path_buf()
}

/// A control service that is the CA: (control, TLS address, CA dir).
async fn control_ca(dir: &Path, yaml: &str) -> (Control, SocketAddr, PathBuf) {
    let cfg = dir.join("cfg");
    write_dir(&cfg, yaml);
    let ca = dir.join("ca");
    let tokens = write(&dir.join("tokens.yaml"), &tokens_yaml());
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let control = Control::start_args(
        &cfg,
        &[
            "--ca-dir",
            ca.to_str().expect("utf8"),
            "--ca-tokens",
            tokens.to_str().expect("utf8"),
            "--xds-tls-addr",
            &tls_addr.to_string(),
        ],
    )
    .await;
    (control, tls_addr, ca)
}

/// The mesh of [`mesh_yaml`] on a control that is the CA, and the two
/// sidecars' tokens: (control, TLS address, CA dir, token A, token B).
async fn mesh_with_ca(
    dir: &Path,
    inbound_b: SocketAddr,
) -> (Control, SocketAddr, PathBuf, PathBuf, PathBuf) {
    let (control, tls_addr, ca) = control_ca(dir, &mesh_yaml(inbound_b, "")).await;
    let tok_a = write(&dir.join("a.token"), "productpage-token-0123456789\n");
    let tok_b = write(&dir.join("b.token"), "reviews-token-0123456789abcdef\n");
    (control, tls_addr, ca, tok_a, tok_b)
}

/// A sidecar on the control's TLS port, with its token.
fn sidecar_ca(
    tls_addr: SocketAddr,
    ca: &Path,
    token: &Path,
    sa: &str,
    node: &str,
    extra: &[&str],
) -> Bosun {
    let xds = format!("https://{tls_addr}");
    let root = ca.join("root-cert.pem");
    let mut args = vec![
        "--mode",
        "sidecar",
        "--node-id",
        node,
        "--service-account",
        sa,
        "--ca-root-cert",
        root.to_str().expect("utf8"),
        "--token-file",
        token.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    Bosun::with_xds_list(&xds, &args)
}

/// Sidecar B (service account reviews) in front of `app`, inbound on `inbound`.
fn sidecar_b(
    (tls_addr, ca, token): (SocketAddr, &Path, &Path),
    app: SocketAddr,
    inbound: SocketAddr,
    extra: &[&str],
) -> Bosun {
    let (app_port, inbound) = (app.port().to_string(), inbound.to_string());
    let mut args = vec!["--app-port", &app_port, "--inbound-address", &inbound];
    args.extend_from_slice(extra);
    sidecar_ca(tls_addr, ca, token, "reviews", "sidecar-b", &args)
}

fn sock(ip: &str) -> SocketAddr {
    format!("{ip}:{}", free_port()).parse().expect("addr")
}

async fn via_a(outbound: SocketAddr) -> Reply {
    get(&client(), &format!("http://{outbound}/"), HOST).await
}

fn header(r: &Reply, name: &str) -> String {
    r.json()["headers"][name].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_speak_mutual_tls_with_certificates_from_the_control_ca() {
    let app_b = backend("reviews-v1").await;
    let (inbound_b, outbound_a, outbound_b) =
        (sock("127.0.0.2"), sock("127.0.0.3"), sock("127.0.0.2"));
    let dir = TempDir::new("mtls-ca");
    let (control, tls_addr, ca, tok_a, tok_b) = mesh_with_ca(&dir.0, inbound_b).await;
    let b = sidecar_b(
        (tls_addr, &ca, &tok_b),
        app_b.addr,
        inbound_b,
        &[
            "--outbound-address",
            &outbound_b.to_string(),
            "--labels",
            "app=reviews",
            "--workload",
            "reviews-v1",
        ],
    );
    let a = sidecar_ca(
        tls_addr,
        &ca,
        &tok_a,
        "productpage",
        "sidecar-a",
        &[
            "--outbound-address",
            &outbound_a.to_string(),
            "--labels",
            "app=productpage",
        ],
    );
    a.wait_ready().await;
    b.wait_ready().await;

    // App A's plain request reaches app B over mutual TLS; app B learns
    // who called from x-forwarded-client-cert.
    let r = via_a(outbound_a).await;
    assert_eq!(
        r.status,
        200,
        "{}\n{}\n{}",
        r.body,
        a.log_text(),
        b.log_text()
    );
    assert_eq!(r.backend(), "reviews-v1");
    let xfcc = header(&r, "x-forwarded-client-cert");
    assert!(
        xfcc.starts_with(&format!("By={REVIEWS};Hash="))
            && xfcc.ends_with(&format!(";URI={PRODUCTPAGE}")),
        "{xfcc}"
    );
    let m = b.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains(&format!("source_principal=\"{PRODUCTPAGE}\""))
            && l.contains(&format!("destination_principal=\"{REVIEWS}\""))
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{m}"
    );

    // A (reporter source) names itself and the identity B's certificate
    // was verified for.
    let m = a.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains(&format!("source_principal=\"{PRODUCTPAGE}\""))
            && l.contains(&format!("destination_principal=\"{REVIEWS}\""))),
        "{m}"
    );

    // PERMISSIVE (Istio's default): plaintext straight to B's inbound is
    // served too, and a forged XFCC does not survive.
    let (ok, out) = curl(&[
        "-H",
        &format!("x-forwarded-client-cert: URI={PRODUCTPAGE}"),
        &format!("http://{inbound_b}/"),
    ]);
    assert!(ok, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(j["headers"]["x-forwarded-client-cert"].is_null(), "{out}");

    // Both proxies are listed under the identity they proved.
    let ps = control.proxies().await;
    let ids: Vec<(&str, &str)> = ps
        .iter()
        .map(|p| {
            (
                p["node_id"].as_str().unwrap_or(""),
                p["identity"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![("sidecar-a", PRODUCTPAGE), ("sidecar-b", REVIEWS)],
        "{ps:?}"
    );

    // STRICT mesh-wide: plaintext is refused, mutual TLS still flows.
    write_dir(&dir.0.join("cfg"), &mesh_yaml(inbound_b, STRICT));
    eventually("plaintext refused under STRICT", || async {
        !curl(&[&format!("http://{inbound_b}/")]).0
    })
    .await;
    let r = via_a(outbound_a).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A client certificate naming productpage but from another root: refused.
    let rogue = OpensslPki::new(&dir.0, "rogue");
    let rogue_leaf = dir.0.join("rogue-leaf");
    rogue.leaf(PRODUCTPAGE, &rogue_leaf);
    let (ok, out) = curl(&[
        "-k",
        "--cert",
        rogue_leaf.join("cert-chain.pem").to_str().expect("utf8"),
        "--key",
        rogue_leaf.join("key.pem").to_str().expect("utf8"),
        &format!("https://{inbound_b}/"),
    ]);
    assert!(!ok, "a certificate from another root was accepted: {out}");
    let refused = metric_sum(&b.metrics().await, "bosun_inbound_mtls_refused_total", &[]);
    assert!(
        refused >= 2.0,
        "plaintext and the rogue handshake: {refused}"
    );

    // The CA signs only what the token proves.
    let root = ca.join("root-cert.pem");
    let opts = |token: &Path, spiffe: &str| tls::ca::CaOptions {
        address: format!("https://{tls_addr}"),
        server_name: "bosun-control.istio-system.svc".into(),
        root_cert: root.clone(),
        token_file: token.to_path_buf(),
        spiffe: spiffe.into(),
        ttl: Duration::from_secs(3600),
    };
    let err = tls::ca::request(&opts(&tok_a, REVIEWS))
        .await
        .expect_err("another service account's certificate");
    assert!(err.contains("PermissionDenied"), "{err}");
    let bad = write(&dir.0.join("bad.token"), "not-a-token-anyone-issued\n");
    let err = tls::ca::request(&opts(&bad, PRODUCTPAGE))
        .await
        .expect_err("unknown token");
    assert!(err.contains("Unauthenticated"), "{err}");
    // Hostile peers on the TLS port: garbage is dropped, and a silent
    // connection holds nothing up (each handshake runs in its own task).
    let _silent = tokio::net::TcpStream::connect(tls_addr)
        .await
        .expect("connect");
    let mut junk = tokio::net::TcpStream::connect(tls_addr)
        .await
        .expect("connect");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut buf))
            .await
            .expect("closed, not left hanging")
            .unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "plaintext on the TLS port got {n} bytes"
        );
    }
    let id = tls::ca::request(&opts(&tok_a, PRODUCTPAGE))
        .await
        .expect("own certificate");
    assert_eq!(id.spiffe, PRODUCTPAGE);

    // An xDS client with no credentials gets no config, and cannot take
    // a connected proxy's node id.
    let roots = tls::source::roots_file(&root).expect("roots");
    let ch = tls::ca::channel(
        &format!("https://{tls_addr}"),
        "bosun-control.istio-system.svc",
        roots,
        None,
    )
    .await
    .expect("TLS channel");
    let err = xds_first_response(ch, "sidecar-a")
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // With a token, a different identity still cannot use sidecar-b's node id.
    let roots = tls::source::roots_file(&root).expect("roots");
    let store = tls::Store::new();
    store.set(id);
    let ch = tls::ca::channel(
        &format!("https://{tls_addr}"),
        "bosun-control.istio-system.svc",
        roots,
        Some(&store),
    )
    .await
    .expect("TLS channel");
    let err = xds_first_response(ch, "sidecar-b")
        .await
        .expect_err("node id taken");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let ps = control.proxies().await;
    assert_eq!(ps.len(), 2, "{ps:?}");
}

/// Opens a delta ADS stream as `node_id`; the first response, or the error.
async fn xds_first_response(
    ch: tonic::transport::Channel,
    node_id: &str,
) -> Result<(), tonic::Status> {
    use bosun_xds_proto::discovery::DeltaDiscoveryRequest;
    use bosun_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let req = DeltaDiscoveryRequest {
        node: Some(bosun_xds_proto::core::Node {
            id: node_id.into(),
            ..Default::default()
        }),
        type_url: bosun_xds_proto::type_url::LISTENER.into(),
        ..Default::default()
    };
    let mut c = AggregatedDiscoveryServiceClient::new(ch);
    let mut s = c
        .delta_aggregated_resources(tokio_stream::iter(vec![req]).chain(tokio_stream::pending()))
        .await?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(tonic::Status::unknown("stream ended")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(tonic::Status::deadline_exceeded("no response")),
    }
}

use tokio_stream::StreamExt as _;

/// openssl: a CA (another PKI than Bosun's) and leaf certificates with
/// SPIFFE URI SANs, in Istio's file-mounted layout.
pub struct OpensslPki {
    pub dir: PathBuf,
}

impl OpensslPki {
    pub fn new(dir: &Path, name: &str) -> OpensslPki {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        run_openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/O={name}/CN=root"),
            ],
            &dir,
        );
        OpensslPki { dir }
    }

    /// A leaf for `spiffe`, written as cert-chain.pem, key.pem, root-cert.pem in `out`.
    pub fn leaf(&self, spiffe: &str, out: &Path) {
        self.issue(&format!("URI:{spiffe}"), out)
    }

    /// A leaf with `sans` (openssl's syntax: `DNS:a.example.com,URI:...`).
    pub fn issue(&self, sans: &str, out: &Path) {
        std::fs::create_dir_all(out).expect("mkdir");
        let ext = self.dir.join("ext.cnf");
        std::fs::write(
            &ext,
            format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"),
        )
        .expect("ext");
        let key = out.join("key.pem.new");
        let csr = self.dir.join("leaf.csr");
        let cert = out.join("cert-chain.pem.new");
        run_openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key.to_str().expect("utf8"),
                "-out",
                csr.to_str().expect("utf8"),
                "-subj",
                "/CN=workload",
            ],
            &self.dir,
        );
        run_openssl(
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().expect("utf8"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                cert.to_str().expect("utf8"),
                "-days",
                "1",
                "-extfile",
                ext.to_str().expect("utf8"),
            ],
            &self.dir,
        );
        std::fs::copy(self.dir.join("ca.pem"), out.join("root-cert.pem")).expect("root");
        // Key first, then the certificate: a reader between the two sees a
        // mismatch and keeps the old pair.
        std::fs::rename(&key, out.join("key.pem")).expect("key");
        std::fs::rename(&cert, out.join("cert-chain.pem")).expect("cert");
    }
}

pub fn run_openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The serial of the certificate `addr` presents to a mesh client holding `store`'s identity.
async fn server_serial(store: &Arc<tls::Store>, addr: SocketAddr) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let cfg = tls::mesh_client_config(store, Arc::from(Vec::new()), tls::Alpn::Http1);
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("reviews").expect("name");
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no cert")?;
    Ok(tls::leaf_info(leaf)?.serial)
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_speak_mutual_tls_with_certificate_files_from_openssl() {
    let app_b = backend("reviews-v1").await;
    let (inbound_b, outbound_a) = (sock("127.0.0.2"), sock("127.0.0.3"));
    let dir = TempDir::new("mtls-files");
    let pki = OpensslPki::new(&dir.0, "mesh");
    let (certs_a, certs_b) = (dir.0.join("a"), dir.0.join("b"));
    pki.leaf(PRODUCTPAGE, &certs_a);
    pki.leaf(REVIEWS, &certs_b);
    let yaml = mesh_yaml(inbound_b, STRICT);
    let b = Bosun::start(
        &[
            "--mode",
            "sidecar",
            "--cert-dir",
            certs_b.to_str().expect("utf8"),
            "--app-port",
            &app_b.addr.port().to_string(),
            "--inbound-address",
            &inbound_b.to_string(),
            "--outbound-address",
            &sock("127.0.0.2").to_string(),
            "--request-head-timeout",
            "1s",
        ],
        &yaml,
    )
    .await;
    let a = Bosun::start(
        &[
            "--mode",
            "sidecar",
            "--cert-dir",
            certs_a.to_str().expect("utf8"),
            "--outbound-address",
            &outbound_a.to_string(),
        ],
        &yaml,
    )
    .await;
    let r = via_a(outbound_a).await;
    assert_eq!(
        r.status,
        200,
        "{}\n{}\n{}",
        r.body,
        a.log_text(),
        b.log_text()
    );
    let xfcc = header(&r, "x-forwarded-client-cert");
    assert!(
        xfcc.contains(&format!("URI={PRODUCTPAGE}")) && xfcc.starts_with(&format!("By={REVIEWS}")),
        "{xfcc}"
    );

    // STRICT: plaintext refused; a client certificate from another root refused;
    // one from the mesh root accepted.
    assert!(!curl(&[&format!("http://{inbound_b}/")]).0);
    let rogue = OpensslPki::new(&dir.0, "rogue");
    let rogue_leaf = dir.0.join("rogue-leaf");
    rogue.leaf(PRODUCTPAGE, &rogue_leaf);
    let url = format!("https://{inbound_b}/");
    let with = |d: &Path| {
        curl(&[
            "-k",
            "--cert",
            d.join("cert-chain.pem").to_str().expect("utf8"),
            "--key",
            d.join("key.pem").to_str().expect("utf8"),
            &url,
        ])
    };
    let (ok, out) = with(&rogue_leaf);
    assert!(!ok, "a certificate from another root was accepted: {out}");
    let (ok, out) = with(&certs_a);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("URI={PRODUCTPAGE}")), "{out}");

    // New files are picked up: later handshakes show the new certificate,
    // and the mesh keeps flowing.
    let client = tls::Store::new();
    client.set(tls::source::load(&certs_a).expect("client identity"));
    let before = server_serial(&client, inbound_b).await.expect("handshake");
    pki.leaf(REVIEWS, &certs_b);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = server_serial(&client, inbound_b).await.expect("handshake");
        if now != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(via_a(outbound_a).await.status, 200);

    // A ClientHello's first byte and then silence: closed at the head
    // timeout (1 s here), so a slow handshake holds no slot for long.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut slow = tokio::net::TcpStream::connect(inbound_b)
            .await
            .expect("connect");
        slow.write_all(&[0x16]).await.expect("write");
        let t = Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("the proxy closed a silent handshake")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    // A broken file is refused and the identity in use stays.
    std::fs::write(
        certs_b.join("cert-chain.pem"),
        "-----BEGIN CERTIFICATE-----\ntrunc",
    )
    .expect("write");
    eventually("the broken file is reported", || async {
        b.log_text().contains("certificate files refused")
    })
    .await;
    assert_eq!(via_a(outbound_a).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_certificate_keeps_open_connections_and_new_handshakes_use_it() {
    let app_b = backend("reviews-v1").await;
    let inbound_b = sock("127.0.0.2");
    let dir = TempDir::new("mtls-rotate");
    let (_control, tls_addr, ca, tok_a, tok_b) = mesh_with_ca(&dir.0, inbound_b).await;
    let b = sidecar_b(
        (tls_addr, &ca, &tok_b),
        app_b.addr,
        inbound_b,
        &[
            "--outbound-address",
            &sock("127.0.0.2").to_string(),
            "--cert-ttl",
            "60s",
        ],
    );
    b.wait_ready().await;
    // A mesh client: a certificate from the same CA.
    let client = tls::Store::new();
    client.set(
        tls::ca::request(&tls::ca::CaOptions {
            address: format!("https://{tls_addr}"),
            server_name: "bosun-control.istio-system.svc".into(),
            root_cert: ca.join("root-cert.pem"),
            token_file: tok_a,
            spiffe: PRODUCTPAGE.into(),
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("client certificate"),
    );
    let mut first = server_serial(&client, inbound_b).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while first.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        first = server_serial(&client, inbound_b).await;
    }
    let first = first.expect("handshake with sidecar B");

    // One connection held open across the rotation.
    let tcp = tokio::net::TcpStream::connect(inbound_b)
        .await
        .expect("connect");
    let cfg = tls::mesh_client_config(&client, Arc::from(Vec::new()), tls::Alpn::Http1);
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("reviews").expect("name");
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("tls");
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await
    .expect("h1");
    tokio::spawn(conn);
    let req = || {
        http::Request::builder()
            .uri("/")
            .header("host", "reviews")
            .body(http_body_util::Empty::new())
            .expect("req")
    };
    assert_eq!(
        send.send_request(req()).await.expect("before").status(),
        200
    );

    // Renewal at 40-60% of 60 s: within 40 s a new handshake shows a new serial.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            send.send_request(req())
                .await
                .expect("held connection")
                .status(),
            200
        );
        if server_serial(&client, inbound_b).await.expect("handshake") != first {
            break;
        }
        assert!(Instant::now() < deadline, "no rotation: {}", b.log_text());
    }
    assert_eq!(
        send.send_request(req())
            .await
            .expect("after rotation")
            .status(),
        200
    );
}

//! TLS at the gateway (Gateway servers HTTPS and TLS, certificates from
//! Secrets by SNI, MUTUAL, PASSTHROUGH, httpsRedirect, a Secret rotated
//! under load) and TLS origination to upstreams (DestinationRule SIMPLE
//! and MUTUAL), with curl and wrk against the real binary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;

use crate::harness::*;
use crate::mtls::OpensslPki;

fn b64(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).expect("read pem"))
}

/// A kubernetes.io/tls Secret in istio-system from a directory holding
/// cert-chain.pem and key.pem (and root-cert.pem as ca.crt when `ca`).
fn tls_secret(name: &str, dir: &Path, ca: Option<&Path>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&dir.join("cert-chain.pem")),
        b64(&dir.join("key.pem"))
    );
    if let Some(ca) = ca {
        y.push_str(&format!("  ca.crt: {}\n", b64(ca)));
    }
    y.push_str("---\n");
    y
}

fn p(path: &Path) -> String {
    path.to_str().expect("utf8").to_string()
}

/// Gateway `gw` in istio-system with `servers` (YAML list items), a
/// service `site` on `be`, and a VirtualService for `hosts`.
fn gateway_yaml(servers: &str, be: SocketAddr, hosts: &str) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{servers}---\n"
    );
    y.push_str(&service_entry(
        "site",
        "web",
        80,
        "HTTP",
        &[(be, "app=site")],
    ));
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: site, namespace: web}}\nspec:\n  hosts: [{hosts}]\n  gateways: [istio-system/gw]\n  http:\n  - route: [{{destination: {{host: site.web.svc.cluster.local}}}}]\n---\n"
    ));
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn https_gateway_picks_certificates_by_sni_speaks_h2_and_redirects_http() {
    let be = backend("site").await;
    let dir = TempDir::new("gw-tls");
    let (pki_a, pki_b) = (
        OpensslPki::new(&dir.0, "pki-a"),
        OpensslPki::new(&dir.0, "pki-b"),
    );
    let (cert_a, cert_b) = (dir.0.join("a"), dir.0.join("b"));
    pki_a.issue("DNS:a.example.com", &cert_a);
    pki_b.issue("DNS:b.example.com", &cert_b);
    let (https, http) = (free_port(), free_port());
    let servers = format!(
        "  - port: {{number: {https}, name: https-a, protocol: HTTPS}}\n    hosts: [a.example.com]\n    tls: {{mode: SIMPLE, credentialName: cert-a}}\n\
         \x20 - port: {{number: {https}, name: https-b, protocol: HTTPS}}\n    hosts: [b.example.com]\n    tls: {{mode: SIMPLE, credentialName: cert-b}}\n\
         \x20 - port: {{number: {http}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n    tls: {{httpsRedirect: true}}\n"
    );
    let mut yaml = gateway_yaml(&servers, be.addr, "a.example.com, b.example.com");
    yaml.push_str(&tls_secret("cert-a", &cert_a, None));
    yaml.push_str(&tls_secret("cert-b", &cert_b, None));
    let gw = Bosun::gateway(&yaml).await;

    let resolve = |h: &str| format!("{h}:{https}:127.0.0.1");
    let ca_a = p(&pki_a.dir.join("ca.pem"));
    let ca_b = p(&pki_b.dir.join("ca.pem"));
    // SIMPLE: the client checks the gateway's certificate for a.example.com.
    let (ok, out) = curl(&[
        "--resolve",
        &resolve("a.example.com"),
        "--cacert",
        &ca_a,
        &format!("https://a.example.com:{https}/"),
    ]);
    assert!(ok, "{out}\n{}", gw.log_text());
    assert!(out.contains("\"backend\":\"site\""), "{out}");
    // The other name on the same port gets the other certificate.
    let (ok, out) = curl(&[
        "--resolve",
        &resolve("b.example.com"),
        "--cacert",
        &ca_b,
        &format!("https://b.example.com:{https}/"),
    ]);
    assert!(ok, "{out}");
    let (ok, _) = curl(&[
        "--resolve",
        &resolve("b.example.com"),
        "--cacert",
        &ca_a,
        &format!("https://b.example.com:{https}/"),
    ]);
    assert!(
        !ok,
        "b.example.com must not be served a.example.com's certificate"
    );
    // HTTP/2 over ALPN.
    let (ok, out) = curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        "--resolve",
        &resolve("a.example.com"),
        "--cacert",
        &ca_a,
        &format!("https://a.example.com:{https}/"),
    ]);
    assert!(ok && out.trim() == "2", "{out}");
    // httpsRedirect: plaintext gets a 301 to https.
    let (ok, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: a.example.com",
        &format!("http://127.0.0.1:{http}/x?y=1"),
    ]);
    assert!(ok && out.starts_with("301 https://a.example.com"), "{out}");
    assert!(out.contains("/x?y=1"), "{out}");
    // No SNI that any server takes: the handshake is refused.
    let (ok, _) = curl(&["-k", &format!("https://127.0.0.1:{https}/")]);
    assert!(!ok, "a connection without a matching SNI was served");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_at_the_gateway_refuses_clients_without_a_certificate() {
    let be = backend("site").await;
    let dir = TempDir::new("gw-mtls");
    let server = OpensslPki::new(&dir.0, "server-pki");
    let clients = OpensslPki::new(&dir.0, "client-pki");
    let (cert, client) = (dir.0.join("srv"), dir.0.join("cli"));
    server.issue("DNS:secure.example.com", &cert);
    clients.issue("DNS:client.example.com", &client);
    let port = free_port();
    let servers = format!(
        "  - port: {{number: {port}, name: https, protocol: HTTPS}}\n    hosts: [secure.example.com]\n    tls: {{mode: MUTUAL, credentialName: secure}}\n"
    );
    let mut yaml = gateway_yaml(&servers, be.addr, "secure.example.com");
    yaml.push_str(&tls_secret(
        "secure",
        &cert,
        Some(&clients.dir.join("ca.pem")),
    ));
    let gw = Bosun::gateway(&yaml).await;
    let base = [
        "--resolve".to_string(),
        format!("secure.example.com:{port}:127.0.0.1"),
        "--cacert".to_string(),
        p(&server.dir.join("ca.pem")),
    ];
    let url = format!("https://secure.example.com:{port}/");
    let mut without: Vec<&str> = base.iter().map(String::as_str).collect();
    without.push(&url);
    let (ok, out) = curl(&without);
    assert!(!ok, "served a client without a certificate: {out}");
    let (cc, ck) = (
        p(&client.join("cert-chain.pem")),
        p(&client.join("key.pem")),
    );
    let mut with: Vec<&str> = base.iter().map(String::as_str).collect();
    with.extend(["--cert", &cc, "--key", &ck, &url]);
    let (ok, out) = curl(&with);
    assert!(ok, "{out}\n{}", gw.log_text());
    assert!(out.contains("\"backend\":\"site\""), "{out}");

    // TLS 1.3 only, and only a client certificate with another hash: the
    // same client is refused.
    let mutual = "tls: {mode: MUTUAL, credentialName: secure}";
    gw.reconfigure(&yaml.replace(
        mutual,
        "tls: {mode: MUTUAL, credentialName: secure, minProtocolVersion: TLSV1_3, verifyCertificateHash: [\"00:11\"]}",
    ))
    .await;
    let (ok, _) = curl(&with);
    assert!(!ok, "a client certificate with another hash was accepted");
    let fingerprint = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in", &cc])
        .output()
        .expect("openssl");
    let hash = String::from_utf8_lossy(&fingerprint.stdout)
        .trim()
        .rsplit('=')
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(hash.len(), 95, "{hash}");
    gw.reconfigure(&yaml.replace(
        mutual,
        &format!("tls: {{mode: MUTUAL, credentialName: secure, minProtocolVersion: TLSV1_3, verifyCertificateHash: [\"{hash}\"]}}"),
    ))
    .await;
    let (ok, out) = curl(&with);
    assert!(ok, "its own hash refused: {out}");
    let mut tls12 = vec!["--tls-max", "1.2"];
    tls12.extend(with.iter().copied());
    let (ok, _) = curl(&tls12);
    assert!(!ok, "TLS 1.2 was accepted with minProtocolVersion TLSV1_3");

    // verifyCertificateSpki: the key's hash, as Envoy takes it.
    let spki = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -pubkey -noout -in {cc} | openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary | base64"
        ))
        .output()
        .expect("openssl");
    let spki = String::from_utf8_lossy(&spki.stdout).trim().to_string();
    for (pin, accepted) in [("AAAA", false), (spki.as_str(), true)] {
        gw.reconfigure(&yaml.replace(
            mutual,
            &format!(
                "tls: {{mode: MUTUAL, credentialName: secure, verifyCertificateSpki: [\"{pin}\"]}}"
            ),
        ))
        .await;
        assert_eq!(curl(&with).0, accepted, "SPKI pin {pin}");
    }
    // cipherSuites (TLS 1.2): only the listed suite is offered.
    gw.reconfigure(&yaml.replace(
        mutual,
        "tls: {mode: MUTUAL, credentialName: secure, maxProtocolVersion: TLSV1_2, cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]}",
    ))
    .await;
    for (suite, accepted) in [
        ("ECDHE-ECDSA-AES256-GCM-SHA384", false),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", true),
    ] {
        let mut args = vec!["--ciphers", suite];
        args.extend(with.iter().copied());
        assert_eq!(curl(&args).0, accepted, "cipher {suite}");
    }

    // OPTIONAL_MUTUAL: no certificate is fine, one from another root is not.
    gw.reconfigure(&yaml.replace(
        mutual,
        "tls: {mode: OPTIONAL_MUTUAL, credentialName: secure}",
    ))
    .await;
    let (ok, out) = curl(&without);
    assert!(
        ok,
        "OPTIONAL_MUTUAL refused a client without a certificate: {out}"
    );
    let rogue = OpensslPki::new(&dir.0, "rogue-pki");
    let rogue_leaf = dir.0.join("rogue");
    rogue.issue("DNS:client.example.com", &rogue_leaf);
    let (rc, rk) = (
        p(&rogue_leaf.join("cert-chain.pem")),
        p(&rogue_leaf.join("key.pem")),
    );
    let mut rogue_args: Vec<&str> = base.iter().map(String::as_str).collect();
    rogue_args.extend(["--cert", &rc, "--key", &rk, &url]);
    let (ok, _) = curl(&rogue_args);
    assert!(!ok, "OPTIONAL_MUTUAL took a certificate from another root");
}

/// A TLS server on 127.0.0.1 with the certificate in `dir` that answers
/// every request with `name`; with `client_ca`, a client certificate
/// from it is required.
async fn tls_backend(name: &'static str, dir: &Path, client_ca: Option<&Path>) -> SocketAddr {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("cert-chain.pem"))
            .expect("chain")
            .collect::<Result<_, _>>()
            .expect("chain");
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key");
    let b = rustls::ServerConfig::builder();
    let b = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("ca") {
                roots.add(c.expect("ca")).expect("add");
            }
            b.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .expect("verifier"),
            )
        }
        None => b.with_no_client_auth(),
    };
    let mut cfg = b.with_single_cert(chain, key).expect("cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(name)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_routes_by_sni_to_a_tls_backend_whose_certificate_the_client_sees() {
    let dir = TempDir::new("gw-pass");
    let pki = OpensslPki::new(&dir.0, "backend-pki");
    let cert = dir.0.join("be");
    pki.issue("DNS:pass.example.com", &cert);
    let be = tls_backend("tls-backend", &cert, None).await;
    let port = free_port();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {port}, name: tls, protocol: TLS}}\n    hosts: [pass.example.com]\n    tls: {{mode: PASSTHROUGH}}\n---\n{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: pass, namespace: web}}\nspec:\n  hosts: [pass.example.com]\n  gateways: [istio-system/gw]\n  tls:\n  - match: [{{port: {port}, sniHosts: [pass.example.com]}}]\n    route: [{{destination: {{host: tlsbe.web.svc.cluster.local}}}}]\n",
        service_entry("tlsbe", "web", 443, "TCP", &[(be, "app=tlsbe")])
    );
    let gw = Bosun::gateway(&yaml).await;
    // The client verifies the backend's own certificate through the gateway.
    let (ok, out) = curl(&[
        "--resolve",
        &format!("pass.example.com:{port}:127.0.0.1"),
        "--cacert",
        &p(&pki.dir.join("ca.pem")),
        &format!("https://pass.example.com:{port}/"),
    ]);
    assert!(ok, "{out}\n{}", gw.log_text());
    assert_eq!(out, "tls-backend");
    // Another SNI is not routed.
    let (ok, _) = curl(&[
        "-k",
        "--resolve",
        &format!("other.example.com:{port}:127.0.0.1"),
        &format!("https://other.example.com:{port}/"),
    ]);
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_secret_serves_new_handshakes_under_load_and_a_bad_one_is_refused() {
    let be = backend("site").await;
    let dir = TempDir::new("gw-rotate");
    let (old_pki, new_pki) = (
        OpensslPki::new(&dir.0, "old"),
        OpensslPki::new(&dir.0, "new"),
    );
    let (old, new) = (dir.0.join("old-cert"), dir.0.join("new-cert"));
    old_pki.issue("DNS:localhost", &old);
    new_pki.issue("DNS:localhost", &new);
    let port = free_port();
    let servers = format!(
        "  - port: {{number: {port}, name: https, protocol: HTTPS}}\n    hosts: [\"*\"]\n    tls: {{mode: SIMPLE, credentialName: site-cert}}\n"
    );
    let base = gateway_yaml(&servers, be.addr, "\"*\"");
    let gw = Bosun::gateway(&format!("{base}{}", tls_secret("site-cert", &old, None))).await;
    let url = format!("https://localhost:{port}/");
    let check = |ca: &Path| curl(&["--cacert", &p(ca), &url]).0;
    assert!(check(&old_pki.dir.join("ca.pem")));

    // wrk keeps new connections coming (-H Connection: close) while the
    // Secret changes.
    let wrk = std::thread::spawn({
        let url = url.clone();
        move || {
            Command::new("wrk")
                .args(["-t1", "-c4", "-d3s", "-H", "Connection: close", &url])
                .output()
                .expect("wrk")
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    gw.reconfigure(&format!("{base}{}", tls_secret("site-cert", &new, None)))
        .await;
    let out = wrk.join().expect("wrk thread");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Socket errors") && !text.contains("Non-2xx"),
        "{text}"
    );
    let done: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .map(|(n, _)| n.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    assert!(done > 50, "{text}");
    assert!(
        check(&new_pki.dir.join("ca.pem")),
        "the new certificate is not served"
    );
    assert!(!check(&old_pki.dir.join("ca.pem")));

    // A key that does not match the certificate: refused, named, the
    // last good one keeps serving.
    let mismatched = dir.0.join("mismatch");
    std::fs::create_dir_all(&mismatched).expect("mkdir");
    std::fs::copy(
        old.join("cert-chain.pem"),
        mismatched.join("cert-chain.pem"),
    )
    .expect("cp");
    std::fs::copy(new.join("key.pem"), mismatched.join("key.pem")).expect("cp");
    gw.write_config(&format!(
        "{base}{}",
        tls_secret("site-cert", &mismatched, None)
    ));
    eventually("the bad Secret is refused", || async {
        gw.log_text().contains("Secret/istio-system/site-cert")
            && gw.log_text().contains("tls.key does not match tls.crt")
    })
    .await;
    assert!(check(&new_pki.dir.join("ca.pem")));
}

#[tokio::test(flavor = "multi_thread")]
async fn destination_rules_originate_simple_and_mutual_tls_to_upstreams() {
    let dir = TempDir::new("dr-tls");
    let server = OpensslPki::new(&dir.0, "upstream-pki");
    let clients = OpensslPki::new(&dir.0, "client-pki");
    let (cert, client_dir) = (dir.0.join("up"), dir.0.join("client"));
    server.issue(
        "DNS:simple.web.svc.cluster.local,DNS:mutual.web.svc.cluster.local",
        &cert,
    );
    clients.issue("DNS:gateway.example.com", &client_dir);
    let simple = tls_backend("simple-upstream", &cert, None).await;
    let mutual = tls_backend("mutual-upstream", &cert, Some(&clients.dir.join("ca.pem"))).await;
    let port = free_port();
    let ca = p(&server.dir.join("ca.pem"));
    let (cc, ck) = (
        p(&client_dir.join("cert-chain.pem")),
        p(&client_dir.join("key.pem")),
    );
    let mut yaml = gateway("web", port);
    yaml.push_str(&service_entry(
        "simple",
        "web",
        80,
        "HTTP",
        &[(simple, "app=simple")],
    ));
    yaml.push_str(&service_entry(
        "mutual",
        "web",
        80,
        "HTTP",
        &[(mutual, "app=mutual")],
    ));
    yaml.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: simple, namespace: web}}\nspec:\n  host: simple.web.svc.cluster.local\n  trafficPolicy:\n    tls: {{mode: SIMPLE, caCertificates: {ca}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: mutual, namespace: web}}\nspec:\n  host: mutual.web.svc.cluster.local\n  trafficPolicy:\n    tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cc}, privateKey: {ck}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: web}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{{uri: {{prefix: /simple}}}}]\n    route: [{{destination: {{host: simple.web.svc.cluster.local}}}}]\n  - route: [{{destination: {{host: mutual.web.svc.cluster.local}}}}]\n"
    ));
    let gw = Bosun::gateway(&yaml).await;
    let c = client();
    let r = get(&c, &format!("http://127.0.0.1:{port}/simple"), "x").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "simple-upstream"),
        "{}",
        gw.log_text()
    );
    let r = get(&c, &format!("http://127.0.0.1:{port}/mutual"), "x").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "mutual-upstream"),
        "{}",
        gw.log_text()
    );

    // Without the client certificate the mutual upstream refuses: 503 UF.
    gw.reconfigure(&yaml.replace(
        &format!(
            "tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cc}, privateKey: {ck}}}"
        ),
        &format!("tls: {{mode: SIMPLE, caCertificates: {ca}}}"),
    ))
    .await;
    let r = get(&c, &format!("http://127.0.0.1:{port}/mutual"), "x").await;
    assert_eq!(r.status, 503, "{}", r.body);
}

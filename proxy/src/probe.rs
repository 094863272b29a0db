//! The app's health probes, run by the sidecar: the injector rewrites a
//! container's httpGet, tcpSocket and grpc probes to the proxy's health
//! port (`/app-health/<container>/livez|readyz|startupz` on 15020) and
//! passes the originals in `ISTIO_KUBE_APP_PROBERS` (Istio's format). The
//! kubelet's probe then reaches the proxy in plaintext (the health port is
//! not captured), and the proxy probes the app on this host, so probes
//! pass under STRICT mutual TLS. HTTP answers are passed on with the app's
//! status; TCP and gRPC ones as 200 or 503.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Http {
        path: String,
        port: u16,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prober {
    pub check: Check,
    pub timeout: Duration,
}

/// Parses `ISTIO_KUBE_APP_PROBERS`: `{"/app-health/c/livez": {"httpGet":
/// {...}, "timeoutSeconds": 1}, ...}`.
pub fn parse(json: &str) -> Result<HashMap<String, Prober>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("app probers: {e}"))?;
    let Some(map) = v.as_object() else {
        return Err("app probers: want a JSON object of path to prober".into());
    };
    let mut out = HashMap::new();
    for (path, p) in map {
        if !path.starts_with("/app-health/") {
            return Err(format!("app probers: {path:?} is not under /app-health/"));
        }
        let port = |h: &Value| -> Result<u16, String> {
            h["port"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("app probers: {path}: port must be a number (1-65535)"))
        };
        let check = if let Some(h) = p.get("httpGet") {
            match h["scheme"].as_str() {
                None | Some("HTTP" | "http") => {}
                Some(s) => {
                    return Err(format!(
                        "app probers: {path}: scheme {s} is not supported (HTTP only yet)"
                    ));
                }
            }
            let headers = h["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| {
                    Some((
                        x["name"].as_str()?.to_string(),
                        x["value"].as_str()?.to_string(),
                    ))
                })
                .collect();
            Check::Http {
                path: h["path"].as_str().unwrap_or("/").to_string(),
                port: port(h)?,
                headers,
            }
        } else if let Some(h) = p.get("tcpSocket") {
            Check::Tcp { port: port(h)? }
        } else if let Some(h) = p.get("grpc") {
            Check::Grpc {
                port: port(h)?,
                service: h["service"].as_str().unwrap_or("").to_string(),
            }
        } else {
            return Err(format!(
                "app probers: {path}: want httpGet, tcpSocket or grpc"
            ));
        };
        let timeout = Duration::from_secs(p["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
        out.insert(path.clone(), Prober { check, timeout });
    }
    Ok(out)
}

impl Prober {
    /// Probes the app on 127.0.0.1: the status to answer the kubelet with.
    pub async fn run(&self) -> StatusCode {
        match tokio::time::timeout(self.timeout, self.check()).await {
            Ok(s) => s,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    async fn check(&self) -> StatusCode {
        match &self.check {
            Check::Tcp { port } => match TcpStream::connect(("127.0.0.1", *port)).await {
                Ok(_) => StatusCode::OK,
                Err(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            Check::Http {
                path,
                port,
                headers,
            } => http_get(*port, path, headers)
                .await
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            Check::Grpc { port, service } => grpc_check(*port, service)
                .await
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        }
    }
}

/// One HTTP/1.1 GET; the status line's code.
async fn http_get(port: u16, path: &str, headers: &[(String, String)]) -> Option<StatusCode> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut req =
        format!("GET {path} HTTP/1.1\r\nUser-Agent: kube-probe/bosun\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (n, v) in headers {
        if n.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            return None;
        }
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    if !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
        return None;
    }
    let code = std::str::from_utf8(&head[9..12])
        .ok()?
        .parse::<u16>()
        .ok()?;
    StatusCode::from_u16(code).ok()
}

/// `grpc.health.v1.Health/Check` over h2c: 200 when SERVING.
async fn grpc_check(port: u16, service: &str) -> Option<StatusCode> {
    let s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(s))
            .await
            .ok()?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; }, in one gRPC frame.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        msg.push(u8::try_from(service.len()).ok()?);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).ok()?.to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post(format!(
        "http://127.0.0.1:{port}/grpc.health.v1.Health/Check"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(frame)))
    .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let collected = resp.into_body().collect().await.ok()?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    if trailers.get("grpc-status").is_some_and(|v| v != "0") {
        return Some(StatusCode::SERVICE_UNAVAILABLE);
    }
    let body = collected.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; } SERVING = 1.
    let serving = body.len() >= 7 && body[5..].windows(2).any(|w| w == [0x08, 0x01]);
    Some(if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_probers_and_refuses_the_rest() {
        let p = parse(r#"{"/app-health/web/livez":{"httpGet":{"path":"/live","port":8080,"scheme":"HTTP"},"timeoutSeconds":3},"/app-health/web/readyz":{"tcpSocket":{"port":8080}},"/app-health/web/startupz":{"grpc":{"port":9090,"service":"x"}}}"#)
            .expect("valid");
        assert_eq!(p["/app-health/web/livez"].timeout, Duration::from_secs(3));
        assert_eq!(p["/app-health/web/readyz"].check, Check::Tcp { port: 8080 });
        assert!(parse("[]").is_err());
        assert!(parse(r#"{"/other":{"tcpSocket":{"port":1}}}"#).is_err());
        assert!(parse(r#"{"/app-health/a/livez":{"tcpSocket":{"port":"http"}}}"#).is_err());
        assert!(parse(r#"{"/app-health/a/livez":{"exec":{}}}"#).is_err());
    }
}

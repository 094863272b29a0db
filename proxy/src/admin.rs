//! The admin listener: `/ready`, `/healthz`, `/stats/prometheus`,
//! `/config_dump`, and `POST /quitquitquit` (drain and exit, as Envoy's and
//! Istio's). It has its own connection limit, apart from the data plane's, so
//! it answers while the listeners are full; a connection waiting for a head
//! (new or kept alive) is closed after the shorter of the head and idle
//! timeouts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::Shared;

/// Admin connections at once: enough for probes and scrapers, small enough
/// that an admin flood cannot take the data plane's descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    serve_with(shared, listener, None).await
}

/// The app's probes by path (`/app-health/...`).
pub type Probers = Arc<std::collections::HashMap<String, crate::probe::Prober>>;

/// The status listener (Istio's 15020 and 15021), reachable from outside
/// the pod (capture leaves it alone) so it serves only what the kubelet and
/// scrapers need: `/healthz/ready`, the app's probes under `/app-health/`,
/// and `/stats/prometheus`. Never `/quitquitquit` or `/config_dump`.
pub async fn serve_status(shared: Arc<Shared>, listener: TcpListener, probers: Probers) {
    serve_with(shared, listener, Some(probers)).await
}

async fn serve_with(shared: Arc<Shared>, listener: TcpListener, status: Option<Probers>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let limit = shared
                .limits
                .request_head_timeout
                .min(shared.limits.idle_timeout);
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let status = status.clone();
                async move {
                    Ok::<_, Infallible>(match status {
                        Some(probers) => status_route(&shared, &probers, req).await,
                        None => route(&shared, req),
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limit)
                .max_header_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            // hyper's head timer runs whenever it waits for a head: a silent
            // peer and an idle keep-alive connection are both closed by it.
            let _ = conn.await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn text(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

async fn status_route(
    shared: &Shared,
    probers: &Probers,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path.starts_with("/app-health/") {
        return match probers.get(path) {
            Some(p) => {
                let code = p.run().await;
                text(code, "text/plain", format!("{}\n", code.as_u16()))
            }
            None => text(StatusCode::NOT_FOUND, "text/plain", "no such app probe\n"),
        };
    }
    match path {
        "/healthz/ready" | "/stats/prometheus" => route(shared, req),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "status: /healthz/ready /app-health/... /stats/prometheus\n",
        ),
    }
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/quitquitquit" if req.method() == http::Method::POST => {
            tracing::info!("drain requested on the admin listener");
            shared.drain.start();
            text(StatusCode::OK, "text/plain", "OK\n")
        }
        "/quitquitquit" => text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        "/ready" | "/healthz/ready" => {
            if shared.drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no config applied yet\n",
                )
            }
        }
        "/stats/prometheus" | "/metrics" | "/stats" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared
                .metrics
                .render(&shared.tls.spiffe().unwrap_or_default()),
        ),
        "/config_dump" => {
            let snap = shared.snapshot.load();
            let body = serde_json::json!({
                "version": snap.version,
                "config": snap.source,
            });
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "admin: /ready /healthz /stats/prometheus /config_dump, POST /quitquitquit\n",
        ),
    }
}

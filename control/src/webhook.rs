//! The sidecar injector as a Kubernetes mutating admission webhook:
//! `POST /inject` with an `AdmissionReview` (v1), answered with one whose
//! response carries the JSONPatch that injects the pod (the same code as
//! `bosun inject`). Served over TLS with a certificate from Bosun's CA;
//! the MutatingWebhookConfiguration's `caBundle` is the mesh root.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::inject::{InjectOptions, review};

/// Larger than any object the API server sends (etcd's limit is 1.5 MiB).
const MAX_BODY: usize = 4 << 20;
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, opts: InjectOptions) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let opts = Arc::new(opts);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(handle(req, &opts).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

async fn handle(req: Request<Incoming>, opts: &InjectOptions) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => {}
        (_, "/inject") => return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n"),
        (_, "/ready") => return reply(StatusCode::OK, "text/plain", "ready\n"),
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "webhook: POST /inject\n",
            );
        }
    }
    let body = match tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("body: {e}\n"),
            );
        }
        Err(_) => return reply(StatusCode::REQUEST_TIMEOUT, "text/plain", "body too slow\n"),
    };
    let request: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("not an AdmissionReview: {e}\n"),
            );
        }
    };
    if request["kind"] != "AdmissionReview" || !request["request"]["uid"].is_string() {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "not an AdmissionReview (kind AdmissionReview with request.uid)\n",
        );
    }
    let resp = review(&request, opts);
    reply(StatusCode::OK, "application/json", resp.to_string())
}

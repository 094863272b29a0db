//! *forward*: carries out a [`Plan`]. The upstream stack, in order:
//!
//! ```text
//! (timeout → retry → fault → mirror: the places Istio's policies go)
//! pick      endpoint by the cluster's LB (later: circuit breaker, outlier state)
//! prepare   upstream URI and headers (hop-by-hop, Host, x-forwarded-*, request id)
//! send      the endpoint's pool: HTTP/1.1 in this task, HTTP/2 multiplexed,
//!           upgrades on a fresh connection; every connection from `connect`
//! respond   hop-by-hop stripped, route response headers, hash cookie, drain
//! ```

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::Shared;
use crate::error::ForwardError;
use crate::flags::Flags;
use crate::h1;
use crate::http::body::{ActiveGuard, ReqBody, RespBody, RespKind};
use crate::http::decide::{ConnContext, LocalReply, Plan};
use crate::http::headers::{request_id, strip_hop_by_hop};
use crate::http::serve::Recorder;

pub async fn forward(
    shared: &Arc<Shared>,
    conn: &ConnContext,
    plan: Plan<'_>,
    mut parts: http::request::Parts,
    body: Incoming,
    downstream_upgrade: Option<OnUpgrade>,
    mut rec: Recorder,
) -> Response<RespBody> {
    let Some(endpoint) = plan.cluster.pick(plan.hash) else {
        return rec.local(LocalReply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: bytes::Bytes::from_static(b"no healthy upstream"),
            flags: Flags::NoHealthyUpstream,
            location: None,
            labels: plan.cluster.no_endpoint_labels.clone(),
            response_ops: None,
        });
    };
    let endpoint = endpoint.clone();
    rec.set_upstream_host(&endpoint.addr_str);
    let active = ActiveGuard::new(&endpoint);

    // The upstream URI: the endpoint's address as authority, the planned path.
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(http::uri::Scheme::HTTP);
    uri_parts.authority = Some(endpoint.authority.clone());
    uri_parts.path_and_query = Some(plan.path_and_query);
    let Ok(uri) = Uri::from_parts(uri_parts) else {
        return rec.local(LocalReply {
            status: StatusCode::BAD_REQUEST,
            body: bytes::Bytes::from_static(b"bad path"),
            flags: Flags::DownstreamProtocolError,
            location: None,
            labels: endpoint.labels.clone(),
            response_ops: None,
        });
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, plan.upgrade);
    headers.insert(header::HOST, plan.host);
    let xff = HeaderName::from_static("x-forwarded-for");
    let new_xff = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            HeaderValue::try_from(format!("{prev}, {}", conn.peer_ip.to_str().unwrap_or(""))).ok()
        }
        None => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = new_xff {
        headers.insert(xff, v);
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&xfp) {
        headers.insert(xfp, HeaderValue::from_static("http"));
    }
    let rid = HeaderName::from_static("x-request-id");
    if !headers.contains_key(&rid) {
        let id = request_id();
        rec.set_request_id(&id);
        headers.insert(rid, id);
    }
    plan.route.request_ops.apply(headers);
    let downstream_version = parts.version;
    parts.version = if plan.use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    parts.uri = uri;
    let mut req_body = ReqBody::new(body, rec.request_bytes());

    let sent = if plan.use_h2 {
        send_h2(&endpoint.pool, parts, req_body).await
    } else if plan.upgrade {
        send_upgrade(shared, &endpoint.pool, parts, req_body, downstream_upgrade).await
    } else {
        let t = h1::Timeouts {
            stream_idle: shared.limits.stream_idle_timeout,
        };
        // A body's first frame is read before anything goes upstream: a
        // malformed chunked body is refused without reaching an upstream.
        let ahead = if http_body::Body::is_end_stream(&req_body) {
            Ok(())
        } else {
            match tokio::time::timeout(t.stream_idle, req_body.read_ahead()).await {
                Ok(r) => r.map_err(|e| ForwardError::downstream(&e)),
                Err(_) => Err(ForwardError::StreamIdle(t.stream_idle)),
            }
        };
        match ahead {
            Err(e) => Err(e),
            Ok(()) => {
                let pool = endpoint.pool.clone();
                h1::send(&pool.h1, || pool.connect(), parts, req_body, t)
                    .await
                    .map(|r| r.map(RespKind::H1))
            }
        }
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let (status, flags, msg) = e.reply();
            tracing::debug!(cluster = %plan.cluster.name, endpoint = %endpoint.addr, error = %e, %flags, "upstream request failed");
            return rec.local_with(
                LocalReply {
                    status,
                    body: bytes::Bytes::from_static(msg.as_bytes()),
                    flags,
                    location: None,
                    labels: endpoint.labels.clone(),
                    response_ops: None,
                },
                Some(active),
            );
        }
    };
    let (mut parts, kind) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
        parts.version = downstream_version;
    }
    plan.route.response_ops.apply(&mut parts.headers);
    if let Some(c) = plan.set_cookie {
        parts.headers.append(header::SET_COOKIE, c);
    }
    if shared.drain.is_draining() && downstream_version == Version::HTTP_11 {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    rec.upstream(parts, kind, endpoint.labels.clone(), active)
}

async fn send_h2(
    pool: &crate::pool::Pool,
    parts: http::request::Parts,
    body: ReqBody,
) -> Result<Response<RespKind>, ForwardError> {
    let mut tx = pool.h2().await?;
    tx.ready().await?;
    let resp = tx.send_request(Request::from_parts(parts, body)).await?;
    Ok(resp.map(RespKind::Upstream))
}

/// An HTTP/1.1 upgrade (WebSocket): a fresh connection, never pooled; once
/// both sides switch, bytes are copied both ways in a tracked task.
async fn send_upgrade(
    shared: &Arc<Shared>,
    pool: &crate::pool::Pool,
    parts: http::request::Parts,
    body: ReqBody,
    downstream: Option<OnUpgrade>,
) -> Result<Response<RespKind>, ForwardError> {
    let stream = pool.connect().await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = tx.send_request(Request::from_parts(parts, body)).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream
    {
        let up = hyper::upgrade::on(&mut resp);
        let tracked = shared.drain.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let mut d = TokioIo::new(d);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(RespKind::Upstream))
}

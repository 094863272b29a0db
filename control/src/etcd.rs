//! The etcd source: resources under a key prefix, watched.
//!
//! Keys are `<prefix>/<kind>/<namespace>/<name>`; each value is one
//! resource document, YAML or JSON, exactly as it would be in a file.
//! Bosun speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/watch`), which
//! every etcd 3.4+ serves next to gRPC: no generated etcd client, no protoc.
//! Any change under the prefix re-reads the whole prefix at one revision, so
//! a reading is always a consistent cut; two control replicas reading the
//! same revision produce the same proxy versions.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::load::ParseCache;
use crate::source::Reading;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The key range end that covers every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole keyspace
}

async fn post(
    client: &HttpClient,
    url: &str,
    body: serde_json::Value,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    Ok(resp)
}

/// Reads every key under the prefix: (revision, [(key, value)]).
async fn range(
    client: &HttpClient,
    endpoint: &str,
    prefix: &str,
) -> Result<(i64, Vec<(String, String)>), String> {
    let body = serde_json::json!({
        "key": B64.encode(prefix),
        "range_end": B64.encode(prefix_end(prefix.as_bytes())),
    });
    let resp = post(client, &format!("{endpoint}/v3/kv/range"), body).await?;
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("etcd range: {e}"))?;
    let revision = v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let mut out = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let decode = |f: &str| -> Result<String, String> {
            let raw = B64
                .decode(kv[f].as_str().unwrap_or(""))
                .map_err(|e| format!("etcd {f}: {e}"))?;
            String::from_utf8(raw).map_err(|_| format!("etcd {f}: not UTF-8"))
        };
        let key = decode("key")?;
        let value = decode("value")?;
        out.push((format!("etcd:{key}"), value));
    }
    out.sort();
    Ok((revision, out))
}

/// Watches `prefix` on the etcd at `endpoint` (`http://host:port`) and sends
/// a [`Reading`] each time the resources under it change (the first at once).
pub fn watch(endpoint: String, prefix: String) -> mpsc::Receiver<Reading> {
    let (tx, rx) = mpsc::channel(4);
    let endpoint = endpoint.trim_end_matches('/').to_string();
    tokio::spawn(async move {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let mut last: Option<Vec<(String, String)>> = None;
        let mut cache = ParseCache::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            match session(&client, &endpoint, &prefix, &tx, &mut last, &mut cache).await {
                Ok(()) => return, // the receiver is gone
                Err(e) => {
                    tracing::warn!(%endpoint, error = %e, "etcd unavailable; keeping the last good config")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    rx
}

/// Reads, then watches from the next revision; re-reads on every event.
async fn session(
    client: &HttpClient,
    endpoint: &str,
    prefix: &str,
    tx: &mpsc::Sender<Reading>,
    last: &mut Option<Vec<(String, String)>>,
    cache: &mut ParseCache,
) -> Result<(), String> {
    let (revision, sources) = range(client, endpoint, prefix).await?;
    if last.as_ref() != Some(&sources) {
        if tx.send(cache.load(&sources)).await.is_err() {
            return Ok(());
        }
        *last = Some(sources);
    }
    let body = serde_json::json!({
        "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix.as_bytes())),
            "start_revision": (revision + 1).to_string(),
        }
    });
    let resp = post(client, &format!("{endpoint}/v3/watch"), body).await?;
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(format!("etcd watch: {e}")),
            None => return Err("etcd closed the watch".into()),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        let mut changed = false;
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
            if v["result"]["events"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
            {
                changed = true;
            }
            if v["error"].is_object() || v["result"]["canceled"] == true {
                return Err(format!(
                    "etcd watch: {}",
                    String::from_utf8_lossy(&line).trim()
                ));
            }
        }
        if changed {
            // Let a burst of writes settle, then read one consistent cut.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (_, sources) = range(client, endpoint, prefix).await?;
            if last.as_ref() != Some(&sources) {
                if tx.send(cache.load(&sources)).await.is_err() {
                    return Ok(());
                }
                *last = Some(sources);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/bosun/"), b"/bosun0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}

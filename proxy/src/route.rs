//! Request routing: virtual host by authority, then the first route whose
//! match holds (match blocks OR, fields within a block AND), then a weighted
//! pick among the route's clusters.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::{Rng, RngExt};

use crate::cluster::Cluster;

#[derive(Debug)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl StrMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == e,
            StrMatch::Prefix(p) => s.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(s),
        }
    }
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: String,
    /// Parsed once; `None` for query parameters (any string is a valid name).
    pub header: Option<HeaderName>,
    /// `None`: presence is enough.
    pub value: Option<StrMatch>,
}

#[derive(Debug)]
pub struct RouteMatch {
    pub uri: Option<StrMatch>,
    pub ignore_uri_case: bool,
    pub authority: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub scheme: Option<StrMatch>,
    pub headers: Vec<HeaderMatch>,
    pub without_headers: Vec<HeaderMatch>,
    pub query_params: Vec<HeaderMatch>,
    pub port: u16,
}

#[derive(Debug, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<(Arc<Cluster>, u32)>,
    pub total: u32,
}

impl WeightedClusters {
    /// Weighted random pick (the canary split), with the caller's rng.
    pub fn pick_with<R: Rng + ?Sized>(&self, rng: &mut R) -> &Arc<Cluster> {
        if self.clusters.len() == 1 {
            return &self.clusters[0].0;
        }
        let mut n = rng.random_range(0..self.total);
        for (c, w) in &self.clusters {
            if n < *w {
                return c;
            }
            n -= w;
        }
        &self.clusters[self.clusters.len() - 1].0
    }
}

#[derive(Debug)]
pub struct RouteAction {
    pub clusters: WeightedClusters,
    pub policy: Box<crate::policy::RoutePolicy>,
    pub uri_rewrite: Option<String>,
    pub authority_rewrite: Option<HeaderValue>,
}

#[derive(Debug)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

#[derive(Debug)]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    Direct { status: StatusCode, body: Bytes },
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    pub request_ops: HeaderOps,
    pub response_ops: HeaderOps,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

/// Virtual hosts indexed by domain: exact names in a map, `*.suffix`
/// wildcards longest first, `*` last.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub vhosts: Vec<VirtualHost>,
    exact: crate::fxhash::FxMap<String, usize>,
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl RouteTable {
    pub fn new(name: String, vhosts: Vec<VirtualHost>) -> Self {
        let mut exact = crate::fxhash::FxMap::default();
        let mut suffixes = Vec::new();
        let mut any = None;
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    any.get_or_insert(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    suffixes.push((s.to_string(), i));
                } else {
                    exact.entry(d).or_insert(i);
                }
            }
        }
        suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        RouteTable {
            name,
            vhosts,
            exact,
            suffixes,
            any,
        }
    }

    /// The virtual host for an authority (`host` or `host:port`).
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let lower;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = authority.to_ascii_lowercase();
            lower.as_str()
        } else {
            authority
        };
        if let Some(i) = self.exact.get(authority) {
            return Some(&self.vhosts[*i]);
        }
        let host = strip_port(authority);
        if host.len() != authority.len()
            && let Some(i) = self.exact.get(host)
        {
            return Some(&self.vhosts[*i]);
        }
        for (s, i) in &self.suffixes {
            if host.ends_with(s.as_str()) {
                return Some(&self.vhosts[*i]);
            }
        }
        self.any.map(|i| &self.vhosts[i])
    }
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`; anything else as it is.
/// Byte scans: this runs for every request's authority.
pub fn strip_port(authority: &str) -> &str {
    let b = authority.as_bytes();
    if b.first() == Some(&b'[') {
        return match b.iter().position(|&c| c == b']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match b.iter().rposition(|&c| c == b':') {
        Some(i) if b[i + 1..].iter().all(u8::is_ascii_digit) => &authority[..i],
        _ => authority,
    }
}

/// What a route match looks at, borrowed from the request.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub method: &'a Method,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    pub port: u16,
}

impl RequestView<'_> {
    fn header_holds(&self, h: &HeaderMatch) -> bool {
        let Some(name) = &h.header else { return false };
        let mut values = self.headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            return false;
        }
        match &h.value {
            None => true,
            Some(m) => values.any(|v| v.to_str().is_ok_and(|s| m.matches(s))),
        }
    }

    fn query_holds(&self, h: &HeaderMatch) -> bool {
        let Some(q) = self.query else { return false };
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k == h.name && h.value.as_ref().is_none_or(|m| m.matches(v))
        })
    }
}

impl RouteMatch {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(m) = &self.uri {
            let ok = if self.ignore_uri_case && !matches!(m, StrMatch::Regex(_)) {
                m.matches(&r.path.to_ascii_lowercase())
            } else {
                m.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if self.port != 0 && self.port != r.port {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(r.method.as_str())
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !m.matches(r.authority)
        {
            return false;
        }
        if let Some(m) = &self.scheme
            && !m.matches(r.scheme)
        {
            return false;
        }
        self.headers.iter().all(|h| r.header_holds(h))
            && !self.without_headers.iter().any(|h| r.header_holds(h))
            && self.query_params.iter().all(|h| r.query_holds(h))
    }
}

impl VirtualHost {
    /// First route that matches, and the match block that held (for prefix rewrites).
    pub fn route(&self, r: &RequestView<'_>) -> Option<(&Route, Option<&RouteMatch>)> {
        for route in &self.routes {
            if route.matches.is_empty() {
                return Some((route, None));
            }
            if let Some(m) = route.matches.iter().find(|m| m.matches(r)) {
                return Some((route, Some(m)));
            }
        }
        None
    }
}

/// Applies a `rewrite.uri`: a prefix match swaps the prefix, others the whole path.
pub fn rewrite_path(path: &str, matched: Option<&RouteMatch>, rewrite: &str) -> String {
    match matched.and_then(|m| m.uri.as_ref()) {
        Some(StrMatch::Prefix(p)) if path.len() >= p.len() => {
            let rest = &path[p.len()..];
            if rewrite.ends_with('/') && rest.starts_with('/') {
                format!("{rewrite}{}", &rest[1..])
            } else {
                format!("{rewrite}{rest}")
            }
        }
        _ => rewrite.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_lookup_prefers_exact_then_suffix_then_any() {
        let vh = |n: &str, d: &[&str]| VirtualHost {
            name: n.into(),
            domains: d.iter().map(|s| s.to_string()).collect(),
            routes: vec![],
        };
        let t = RouteTable::new(
            "t".into(),
            vec![
                vh("a", &["a.example.com"]),
                vh("w", &["*.example.com"]),
                vh("any", &["*"]),
            ],
        );
        assert_eq!(
            t.virtual_host("a.example.com:8080")
                .map(|v| v.name.as_str()),
            Some("a")
        );
        assert_eq!(
            t.virtual_host("B.example.com").map(|v| v.name.as_str()),
            Some("w")
        );
        assert_eq!(
            t.virtual_host("other").map(|v| v.name.as_str()),
            Some("any")
        );
    }

    #[test]
    fn prefix_rewrite_keeps_the_rest() {
        let m = RouteMatch {
            uri: Some(StrMatch::Prefix("/api/".into())),
            ignore_uri_case: false,
            authority: None,
            method: None,
            scheme: None,
            headers: vec![],
            without_headers: vec![],
            query_params: vec![],
            port: 0,
        };
        assert_eq!(rewrite_path("/api/users", Some(&m), "/v2/"), "/v2/users");
        assert_eq!(rewrite_path("/x", None, "/y"), "/y");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("a"), "a");
        assert_eq!(strip_port("a:b"), "a:b");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("[::1"), "[::1");
        assert_eq!(strip_port("1.2.3.4:8080"), "1.2.3.4");
    }
}

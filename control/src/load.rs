//! Reading YAML files and directories into the typed [`Config`].
//!
//! Each file may hold several documents separated by `---`. Each document is
//! read twice: first only its `apiVersion`/`kind`/`metadata` (to name it in
//! errors), then as its typed resource with the path of any bad field.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::model::{
    Config, DestinationRule, EndpointSlice, Gateway, Origin, PeerAuthentication, Pod, Refused,
    Secret, Service, ServiceEntry, Sidecar, Sourced, TypeHeader, VirtualService, WorkloadEntry,
};

pub use crate::error::{ConfigError, ConfigErrors, no_config};

/// The files a config path stands for: the file itself, or every `*.yaml`,
/// `*.yml` and `*.json` in the directory (not recursive), sorted by name.
pub fn config_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if p.is_file() && !hidden && matches!(ext, "yaml" | "yml" | "json") {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Reads a file or directory into a [`Config`]; every error is reported.
pub fn load_path(path: &Path) -> Result<Config, ConfigErrors> {
    let (config, errors) = load_path_partial(path);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// As [`load_path`], but returns what could be read beside the errors.
pub fn load_path_partial(path: &Path) -> (Config, Vec<ConfigError>) {
    let files = match config_files(path) {
        Ok(f) => f,
        Err(e) => {
            return (
                Config::default(),
                vec![ConfigError::unreadable(path.display().to_string(), &e)],
            );
        }
    };
    let mut sources = Vec::new();
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((name, text)),
            Err(e) => return (Config::default(), vec![ConfigError::unreadable(name, &e)]),
        }
    }
    ParseCache::default().load_partial(&sources)
}

/// Parses named YAML texts (file name, content) into one [`Config`].
pub fn load_sources(sources: &[(String, String)]) -> Result<Config, ConfigErrors> {
    ParseCache::default().load(sources)
}

/// One file's resources, or its errors.
pub fn parse_file(file: &str, text: &str) -> (Config, Vec<ConfigError>) {
    let mut config = Config::default();
    let mut errors = Vec::new();
    let docs = split_documents(text);
    if docs.is_empty() {
        // A file caught mid-write (`>` truncates first) or emptied by
        // mistake must not remove the mesh's config.
        errors.push(ConfigError {
            file: file.to_string(),
            line: 0,
            column: 0,
            resource: String::new(),
            field: String::new(),
            message: "no resources: the file is empty (or only comments); an empty file is \
                      refused, delete it to remove its resources"
                .into(),
        });
    }
    for (first_line, doc) in docs {
        if let Err(e) = parse_document(file, first_line, doc, &mut config) {
            errors.extend(e);
        }
    }
    (config, errors)
}

/// One file parsed: its resources and its errors.
pub type Parsed = Arc<(Config, Vec<ConfigError>)>;

/// Parsed files by name and content hash: a watched source re-parses only
/// the files that changed (YAML parsing is most of the cost of a reload).
#[derive(Default)]
pub struct ParseCache {
    files: HashMap<String, (u64, Parsed)>,
}

impl ParseCache {
    pub fn load(&mut self, sources: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let (config, errors) = self.load_partial(sources);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every resource that could be read, and every error: `bosun
    /// validate` checks what was read across resources too.
    pub fn load_partial(&mut self, sources: &[(String, String)]) -> (Config, Vec<ConfigError>) {
        if sources.is_empty() {
            return (Config::default(), no_config("the source").0);
        }
        let mut config = Config::default();
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        for (file, text) in sources {
            let hash = {
                let mut h = DefaultHasher::new();
                text.hash(&mut h);
                h.finish()
            };
            seen.insert(file.clone());
            let parsed = match self.files.get(file) {
                Some((h, p)) if *h == hash => p.clone(),
                _ => {
                    let p = Arc::new(parse_file(file, text));
                    self.files.insert(file.clone(), (hash, p.clone()));
                    p
                }
            };
            config.extend_from(&parsed.0);
            errors.extend(parsed.1.iter().cloned());
        }
        self.files.retain(|f, _| seen.contains(f));
        (config, errors)
    }
}

/// Splits a YAML stream on `---` lines; returns (1-based line of the first
/// line of the document, its text). Empty documents are skipped.
pub fn split_documents(text: &str) -> Vec<(u32, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1u32;
    let mut offset = 0usize;
    for (line_no, line) in (1u32..).zip(text.split_inclusive('\n')) {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = line_no + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

fn parse_document(
    file: &str,
    first_line: u32,
    doc: &str,
    config: &mut Config,
) -> Result<(), Vec<ConfigError>> {
    let header: TypeHeader = parse_typed(file, first_line, doc, "")?;
    let resource = format!(
        "{}/{}/{}",
        header.kind,
        header.metadata.namespace.as_deref().unwrap_or("default"),
        header.metadata.name
    );
    let err = |field: &str, message: String| ConfigError {
        file: file.to_string(),
        line: first_line,
        column: 1,
        resource: resource.clone(),
        field: field.to_string(),
        message,
    };
    if header.metadata.name.is_empty() {
        return Err(vec![err("metadata.name", "is required".into())]);
    }
    let group = header
        .api_version
        .rsplit_once('/')
        .map_or("", |(g, _)| g)
        .to_string();
    let origin = Origin {
        file: file.to_string(),
        line: first_line,
    };
    let ns = header
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    macro_rules! push {
        ($field:ident, $ty:ty) => {{
            match parse_typed::<$ty>(file, first_line, doc, &resource) {
                Ok(value) => config.$field.push(Sourced {
                    origin,
                    value: Arc::new(value),
                }),
                Err(e) => {
                    for host in refused_hosts(&header.kind, &header.metadata.name, &ns, doc) {
                        config.refused.push(Refused {
                            kind: header.kind.clone(),
                            host,
                            namespace: ns.clone(),
                            id: resource.clone(),
                        });
                    }
                    return Err(e);
                }
            }
        }};
    }
    let istio_networking = group == "networking.istio.io"
        && matches!(
            header.api_version.as_str(),
            "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3"
        );
    match (header.kind.as_str(), istio_networking) {
        ("VirtualService", true) => push!(virtual_services, VirtualService),
        ("DestinationRule", true) => push!(destination_rules, DestinationRule),
        ("Gateway", true) => push!(gateways, Gateway),
        ("ServiceEntry", true) => push!(service_entries, ServiceEntry),
        ("WorkloadEntry", true) => push!(workload_entries, WorkloadEntry),
        ("Sidecar", true) => push!(sidecars, Sidecar),
        ("PeerAuthentication", _)
            if matches!(
                header.api_version.as_str(),
                "security.istio.io/v1" | "security.istio.io/v1beta1"
            ) =>
        {
            push!(peer_authentications, PeerAuthentication)
        }
        ("Service", _) if header.api_version == "v1" => push!(services, Service),
        ("Pod", _) if header.api_version == "v1" => push!(pods, Pod),
        ("Secret", _) if header.api_version == "v1" => push!(secrets, Secret),
        ("EndpointSlice", _) if header.api_version == "discovery.k8s.io/v1" => {
            push!(endpoint_slices, EndpointSlice)
        }
        _ => {
            return Err(vec![err(
                "kind",
                format!(
                    "Bosun does not support {} {} (supported: networking.istio.io/v1 \
                     VirtualService, DestinationRule, Gateway, ServiceEntry, WorkloadEntry, \
                     Sidecar; security.istio.io/v1 PeerAuthentication; v1 Service, Pod \
                     (labels and service account only), Secret (TLS credentials); \
                     discovery.k8s.io/v1 EndpointSlice)",
                    header.api_version, header.kind
                ),
            )]);
        }
    }
    Ok(())
}

/// Parses a document as `T`, reporting every unsupported field of it in one
/// pass: each unknown key (with its value) is blanked out and the document
/// parsed again, so line numbers stay true. Stops at any other error.
fn parse_typed<T: DeserializeOwned>(
    file: &str,
    first_line: u32,
    doc: &str,
    resource: &str,
) -> Result<T, Vec<ConfigError>> {
    const MAX_ERRORS: usize = 32;
    let mut text = std::borrow::Cow::Borrowed(doc);
    let mut errors: Vec<ConfigError> = Vec::new();
    while errors.len() < MAX_ERRORS {
        match parse_once::<T>(file, first_line, &text, resource) {
            Ok(v) if errors.is_empty() => return Ok(v),
            Ok(_) => break,
            Err(b) => {
                let (e, unknown_at) = *b;
                if errors
                    .iter()
                    .any(|x| x.line == e.line && x.field == e.field)
                {
                    break;
                }
                errors.push(e);
                match unknown_at.and_then(|(l, c)| blank_key(&text, l, c)) {
                    Some(t) => text = std::borrow::Cow::Owned(t),
                    None => break,
                }
            }
        }
    }
    Err(errors)
}

/// Blanks the block-style key at (1-based) `line`, `column` and the more
/// indented lines of its value, keeping every line (and so every line
/// number). `None` where that cannot be done safely (a flow mapping).
fn blank_key(text: &str, line: usize, column: usize) -> Option<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let idx = line.checked_sub(1)?;
    let l = lines.get(idx)?;
    let key_at = column.checked_sub(1)?;
    let prefix = l.get(..key_at)?;
    if prefix.contains(['{', '[', '#', ':']) || !l[key_at..].contains(':') {
        return None;
    }
    let mut out: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    out[idx] = prefix.to_string();
    for (j, next) in lines.iter().enumerate().skip(idx + 1) {
        let indent = next.len() - next.trim_start().len();
        if next.trim().is_empty() || indent > key_at {
            out[j] = String::new();
        } else {
            break;
        }
    }
    Some(out.join("\n"))
}

/// A parse error and, for an unknown field, where its key is (line, column).
type ParseFailure = (ConfigError, Option<(usize, usize)>);

/// One parse: the value, or the error and, for an unknown field, where its
/// key is in `doc` (line, column; 1-based).
fn parse_once<T: DeserializeOwned>(
    file: &str,
    first_line: u32,
    doc: &str,
    resource: &str,
) -> Result<T, Box<ParseFailure>> {
    // The path of the bad field is kept aside: the YAML error itself must go
    // back to serde-saphyr so that it attaches the location.
    let mut field = String::new();
    let result = serde_saphyr::with_deserializer_from_str(doc, |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    let inner = match result {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let (line, column) = inner
        .location()
        .map_or((0, 0), |l| (l.line() as u32, l.column() as u32));
    let raw = first_message_line(&inner.to_string());
    let unknown = raw.contains("unknown field `");
    let (field, message) = explain(field, &raw);
    Err(Box::new((
        ConfigError {
            file: file.to_string(),
            line: line.saturating_sub(1) + first_line,
            column,
            resource: resource.to_string(),
            field,
            message,
        },
        (unknown && line > 0).then_some((line as usize, column as usize)),
    )))
}

/// The hosts a refused resource would have defined, read leniently (every
/// other field ignored), so that references to them can say it was refused.
fn refused_hosts(kind: &str, name: &str, ns: &str, doc: &str) -> Vec<String> {
    #[derive(serde::Deserialize, Default)]
    struct Spec {
        #[serde(default)]
        hosts: Vec<String>,
        #[serde(default)]
        host: Option<String>,
    }
    #[derive(serde::Deserialize, Default)]
    struct Doc {
        #[serde(default)]
        spec: Spec,
    }
    match kind {
        "Service" => vec![format!("{name}.{ns}.svc.cluster.local")],
        "ServiceEntry" | "DestinationRule" => {
            let d: Doc = serde_saphyr::from_str(doc).unwrap_or_default();
            d.spec.hosts.into_iter().chain(d.spec.host).collect()
        }
        _ => Vec::new(),
    }
}

fn first_message_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Serde says "unknown field `x`"; users need "`x` is not supported by Bosun".
fn explain(path: String, raw: &str) -> (String, String) {
    let field = if path == "." { String::new() } else { path };
    if let Some(rest) = raw.split("unknown field `").nth(1) {
        let name = rest.split('`').next().unwrap_or("");
        let full = if field.is_empty() {
            name.to_string()
        } else if field.ends_with(name) {
            field.clone()
        } else {
            format!("{field}.{name}")
        };
        return (
            full,
            format!(
                "field `{name}` is not supported by Bosun yet (remove it, or see README: supported fields)"
            ),
        );
    }
    // Strip saphyr's own " at line X column Y" suffix: we print the location first.
    let msg = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw.to_string(),
    };
    (field, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        load_sources(&[("test.yaml".into(), text.into())])
    }

    #[test]
    fn reads_several_documents() {
        let cfg = load(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec:\n  ports: [{port: 80, name: http}]\n",
        )
        .expect("valid");
        assert_eq!(cfg.virtual_services.len(), 1);
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(cfg.services[0].origin.line, 7);
    }

    #[test]
    fn unknown_field_is_refused_with_file_resource_and_field() {
        let err = load(
            "# comment\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec:\n  hosts: [a]\n  http:\n  - mirrorPercent: 5\n    route: [{destination: {host: a}}]\n",
        )
        .expect_err("mirrorPercent is not implemented");
        let e = &err.0[0];
        assert_eq!(e.file, "test.yaml");
        assert_eq!(e.resource, "VirtualService/ns/a");
        assert_eq!(e.field, "spec.http[0].mirrorPercent");
        assert!(e.message.contains("not supported"), "{e}");
        assert_eq!(e.line, 8, "{e}");
    }

    #[test]
    fn every_unknown_field_of_a_document_is_reported_at_once() {
        let err = load(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: ns}\nspec:\n  hosts: [a]\n  delegate:\n    name: x\n  http:\n  - mirrorPercent: 5\n    route: [{destination: {host: a}}]\n  - name: b\n    bogus:\n      deep: 1\n    route: [{destination: {host: a}}]\n",
        )
        .expect_err("three unknown fields");
        let fields: Vec<(&str, u32)> = err.0.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            vec![
                ("spec.delegate", 6),
                ("spec.http[0].mirrorPercent", 9),
                ("spec.http[1].bogus", 12)
            ],
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        let err = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n")
            .expect_err("not supported yet");
        assert_eq!(err.0[0].field, "kind");
    }

    #[test]
    fn type_errors_name_the_field() {
        let err = load("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a\n  subsets: [{name: v1, labels: [x]}]\n")
            .expect_err("labels must be a map");
        assert_eq!(err.0[0].field, "spec.subsets[0].labels", "{}", err.0[0]);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn the_cache_reparses_only_changed_files_and_forgets_removed_ones() {
        let svc = |n: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec:\n  ports: [{{port: 80, name: http}}]\n"
            )
        };
        let mut cache = ParseCache::default();
        let a = ("a.yaml".to_string(), svc("a"));
        let b = ("b.yaml".to_string(), svc("b"));
        let cfg = cache.load(&[a.clone(), b.clone()]).expect("valid");
        assert_eq!(cfg.services.len(), 2);
        let before = cache.files["a.yaml"].1.clone();
        let b2 = ("b.yaml".to_string(), svc("b2"));
        let cfg = cache.load(&[a.clone(), b2]).expect("valid");
        assert!(
            Arc::ptr_eq(&before, &cache.files["a.yaml"].1),
            "a.yaml was not parsed again"
        );
        assert_eq!(cfg.services[1].value.metadata.name, "b2");
        let cfg = cache.load(&[a]).expect("valid");
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(cache.files.len(), 1);
    }
}

//! The config errors every source, the loader and the translation report,
//! naming file, line, resource and field.

use crate::model::Origin;

/// A config error that names what to fix: file, line, column, resource, field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    /// `Kind/namespace/name`, empty when the document could not be named.
    pub resource: String,
    /// Dotted path of the field, e.g. `spec.http[0].timeout`.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut s = format!("{}:{}:{}: ", self.file, self.line, self.column);
        if !self.resource.is_empty() {
            s.push_str(&self.resource);
            s.push_str(": ");
        }
        if !self.field.is_empty() {
            s.push_str(&self.field);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }

    /// An error found after parsing, at a resource's origin.
    pub fn at(origin: &Origin, resource: String, field: &str, message: String) -> Self {
        ConfigError {
            file: origin.file.clone(),
            line: origin.line,
            column: 1,
            resource,
            field: field.to_string(),
            message,
        }
    }
}

/// All errors found in one pass, so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// A source with nothing in it (a directory gone or emptied, an etcd prefix
/// with no keys) is refused: what is more likely is a mistake or a moment
/// mid-update, and the last good config keeps serving.
pub fn no_config(what: &str) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: what.to_string(),
        line: 0,
        column: 0,
        resource: String::new(),
        field: String::new(),
        message: "no config files or resources (missing, emptied, or nothing ending in \
                  .yaml/.yml/.json); refused, the last good config keeps serving"
            .into(),
    }])
}

impl ConfigError {
    /// A file or directory that could not be read (named, with why).
    pub fn unreadable(file: String, e: &std::io::Error) -> ConfigError {
        ConfigError {
            file,
            line: 0,
            column: 0,
            resource: String::new(),
            field: String::new(),
            message: format!("cannot read: {e}"),
        }
    }
}

/// Why a reference from one resource to another (a route destination, a
/// subset, a policy) cannot be resolved. Rendered into a [`ConfigError`] at
/// the field that holds the reference.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RefError {
    #[error("host {0} is not a known Service or ServiceEntry")]
    UnknownHost(String),
    #[error("host {host} is defined by {by}, which was refused (see its error)")]
    RefusedHost { host: String, by: String },
    #[error("{0} has several ports: set destination.port.number")]
    SeveralPorts(String),
    #[error("{host} has no port {port}")]
    NoPort { host: String, port: u32 },
    #[error("subset {subset}: no DestinationRule for {host}")]
    NoRule { subset: String, host: String },
    #[error("subset {subset}: the DestinationRule for {host} ({by}) was refused (see its error)")]
    RefusedRule {
        subset: String,
        host: String,
        by: String,
    },
    #[error("subset {subset} is not defined in DestinationRule {rule}")]
    NoSubset { subset: String, rule: String },
    /// A traffic policy field of the host's DestinationRule.
    #[error("DestinationRule for {host}: trafficPolicy.{field}: {message}")]
    Policy {
        host: String,
        field: String,
        message: String,
    },
}

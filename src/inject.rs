//! `bosun inject` (Istio's `istioctl kube-inject`) and `bosun wait` (the
//! injected postStart hook, Istio's `pilot-agent wait`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bosun_control::inject::{InjectOptions, inject_yaml};

#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// The YAML to inject (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Write here instead of stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// The image of the init and proxy containers.
    #[arg(long, default_value = "ghcr.io/bosun-mesh/bosun:0.1.0")]
    image: String,
    /// The control service's xDS and CA address.
    #[arg(long, default_value = "https://bosun-control.istio-system.svc:15012")]
    control_address: String,
    /// The DNS name the control's certificate is checked for.
    #[arg(long, default_value = "bosun-control.istio-system.svc")]
    control_name: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Start the proxy before the app containers (Istio's
    /// holdApplicationUntilProxyStarts); a pod's proxy.istio.io/config overrides it.
    #[arg(long)]
    hold_application: bool,
}

impl InjectArgs {
    pub fn options(&self) -> InjectOptions {
        InjectOptions {
            image: self.image.clone(),
            control_address: self.control_address.clone(),
            control_name: self.control_name.clone(),
            trust_domain: self.trust_domain.clone(),
            hold_application: self.hold_application,
        }
    }
}

pub fn run(args: &InjectArgs) -> anyhow::Result<ExitCode> {
    let input = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
    };
    let out = inject_yaml(&input, &args.options())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    match &args.output {
        Some(p) => std::fs::write(p, out)?,
        None => print!("{out}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls `url` (plain http://host:port/path) until it answers 200.
pub async fn wait(url: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{url}: want http://host:port/path"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if get_ok(authority, path).await {
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("bosun wait: {url} not ready after {timeout:?}");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn get_ok(authority: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

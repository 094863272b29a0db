//! The file source: a YAML file or directory, watched.
//!
//! inotify (through `notify`) wakes the watcher at once; a slow poll backs it
//! up where inotify is unavailable or misses an editor's rename dance. A
//! change is only reported when the bytes of the config files changed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

use crate::load::{ConfigErrors, ParseCache, config_files};
use crate::model::Config;

/// What a file looked like when it was last read: a change of size,
/// modification time or inode (a file renamed over it) means it is read again.
type Stamp = (std::time::SystemTime, u64, u64);

/// Reads every file of the config path: (name, content). A file whose
/// size and modification time did not change since `cache` was filled is
/// not read again (at 1000 files, reading them all was ~12 ms a change).
fn read_all(
    path: &Path,
    cache: &mut std::collections::HashMap<PathBuf, (Stamp, String)>,
) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let files = config_files(path)?;
    let mut seen = std::collections::HashSet::new();
    for f in files {
        let meta = std::fs::metadata(&f)?;
        let stamp = (
            meta.modified()?,
            meta.len(),
            std::os::unix::fs::MetadataExt::ino(&meta),
        );
        let text = match cache.get(&f) {
            Some((s, text)) if *s == stamp => text.clone(),
            _ => {
                let text = std::fs::read_to_string(&f)?;
                cache.insert(f.clone(), (stamp, text.clone()));
                text
            }
        };
        out.push((f.display().to_string(), text));
        seen.insert(f);
    }
    cache.retain(|f, _| seen.contains(f));
    Ok(out)
}

fn digest(sources: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sources.hash(&mut h);
    h.finish()
}

/// How long after a file event the directory is read: long enough to take
/// an editor's write-and-rename or a `cp` of several files as one change,
/// short enough not to dominate propagation (Istio waits 100 ms).
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// One reading of the source: parsed, or refused with every error.
pub type Reading = Result<Config, ConfigErrors>;

/// Watches `path` and sends a [`Reading`] each time its content changes
/// (the first reading is sent at once). Changes are debounced by [`DEBOUNCE`].
pub fn watch(path: PathBuf) -> mpsc::Receiver<Reading> {
    let (tx, rx) = mpsc::channel(4);
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let watch_dir = if path.is_dir() {
        path.clone()
    } else {
        path.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let watcher = notify::recommended_watcher(move |_ev: notify::Result<notify::Event>| {
        let _ = wake_tx.try_send(());
    });
    let watcher = match watcher {
        Ok(mut w) => match w.watch(&watch_dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %watch_dir.display(), error = %e, "cannot watch config; polling every second");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; polling every second");
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut last: Option<u64> = None;
        let mut cache = ParseCache::default();
        let mut file_cache = std::collections::HashMap::new();
        loop {
            // File reads block: keep them off the event loop, which may be
            // the proxy's only thread (`--workers 1`).
            let p = path.clone();
            let t = std::time::Instant::now();
            let mut files = std::mem::take(&mut file_cache);
            let read = tokio::task::spawn_blocking(move || {
                let r = read_all(&p, &mut files);
                (r, files)
            })
            .await;
            let read = match read {
                Ok((r, files)) => {
                    file_cache = files;
                    r
                }
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let reading = match read {
                Ok(sources) => {
                    let d = digest(&sources);
                    if last == Some(d) {
                        None
                    } else {
                        last = Some(d);
                        let read_ms = t.elapsed().as_millis() as u64;
                        let r = cache.load(&sources);
                        tracing::debug!(
                            read_ms,
                            parse_ms = t.elapsed().as_millis() as u64 - read_ms,
                            files = sources.len(),
                            "config read"
                        );
                        Some(r)
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read config");
                    None
                }
            };
            if let Some(r) = reading
                && tx.send(r).await.is_err()
            {
                return;
            }
            tokio::select! {
                _ = wake_rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while wake_rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    rx
}

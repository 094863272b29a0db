//! The file source: a YAML file or directory, watched.
//!
//! inotify (read on the caller's runtime: no thread of its own) wakes the
//! watcher at once and names the files that changed: only those are looked
//! at again (stat, read, parse), so one change costs the same with ten
//! files or ten thousand. Anything the events cannot pin to a config file
//! (a queue overflow, a change beside config files that are symlinks, as in
//! a Kubernetes ConfigMap mount) rescans the whole directory, and so does a
//! slow timer, as a backstop; a directory moved away or removed is watched
//! again when it is back. A change is only reported when the bytes of a
//! config file changed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::error::ConfigErrors;
use crate::load::{Parsed, config_files, parse_file};
use crate::model::Config;

/// What a file looked like when it was last read: a change of size,
/// modification time or inode (a file renamed over it) means it is read again.
type Stamp = (std::time::SystemTime, u64, u64);

struct File {
    stamp: Stamp,
    text: String,
    parsed: Parsed,
    symlink: bool,
}

/// The config path's files as last read, by name (sorted: the order of
/// resources is the order of files, as `bosun validate` reads them).
#[derive(Default)]
struct Files {
    files: BTreeMap<PathBuf, File>,
    /// A refresh that failed part way had already changed some files:
    /// the next one reports a change even if it finds nothing new.
    dirty: bool,
}

/// Which files to look at again.
enum Scan {
    All,
    Only(HashSet<PathBuf>),
}

impl Files {
    /// Looks at the files `scan` names again; true when any config file's
    /// content changed, appeared or went away.
    fn refresh(&mut self, root: &Path, scan: Scan) -> std::io::Result<bool> {
        let mut changed = std::mem::take(&mut self.dirty);
        let r = self.refresh_into(root, scan, &mut changed);
        if r.is_err() {
            self.dirty = changed;
        }
        r.map(|()| changed)
    }

    fn refresh_into(&mut self, root: &Path, scan: Scan, changed: &mut bool) -> std::io::Result<()> {
        let paths: Vec<PathBuf> = match scan {
            Scan::All => {
                let listed = config_files(root)?;
                let keep: HashSet<&PathBuf> = listed.iter().collect();
                let before = self.files.len();
                self.files.retain(|p, _| keep.contains(p));
                *changed |= self.files.len() != before;
                listed
            }
            Scan::Only(paths) => paths.into_iter().collect(),
        };
        for p in paths {
            let meta = match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => m,
                // Gone (or not a file any more): its resources go with it.
                Ok(_) => {
                    *changed |= self.files.remove(&p).is_some();
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    *changed |= self.files.remove(&p).is_some();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let stamp = (
                meta.modified()?,
                meta.len(),
                std::os::unix::fs::MetadataExt::ino(&meta),
            );
            if self.files.get(&p).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                // Gone between the stat and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    *changed |= self.files.remove(&p).is_some();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let symlink = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_symlink());
            match self.files.get_mut(&p) {
                Some(f) if f.text == text => {
                    f.stamp = stamp;
                    f.symlink = symlink;
                }
                _ => {
                    let parsed = Arc::new(parse_file(&p.display().to_string(), &text));
                    self.files.insert(
                        p,
                        File {
                            stamp,
                            text,
                            parsed,
                            symlink,
                        },
                    );
                    *changed = true;
                }
            }
        }
        Ok(())
    }

    /// The whole config: every file's resources (shared, not copied).
    fn assemble(&self, root: &Path) -> Reading {
        if self.files.is_empty() {
            return Err(crate::error::no_config(&root.display().to_string()));
        }
        let mut config = Config::default();
        let mut errors = Vec::new();
        for f in self.files.values() {
            config.extend_from(&f.parsed.0);
            errors.extend(f.parsed.1.iter().cloned());
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn has_symlinks(&self) -> bool {
        self.files.values().any(|f| f.symlink)
    }
}

/// How long after a file event the directory is read: long enough to take
/// an editor's write-and-rename or a `cp` of several files as one change,
/// short enough not to dominate propagation (Istio waits 100 ms).
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// The backstop rescan of every file: often when there is no inotify, less
/// often when there is (a rescan stats every file: ~125 ms at 10,000 files),
/// for what inotify does not see (a file symlinked from elsewhere changing,
/// network filesystems).
const POLL: Duration = Duration::from_secs(1);
const RESCAN: Duration = Duration::from_secs(10);

/// One reading of the source: parsed, or refused with every error.
pub type Reading = Result<Config, ConfigErrors>;

/// What the watcher saw since the last look: the config files named by
/// events, and whether something else happened that needs a full rescan.
#[derive(Default)]
struct Pending {
    paths: HashSet<PathBuf>,
    other: bool,
    rescan: bool,
    /// The watch is gone (its directory moved or was removed).
    lost: bool,
}

/// Is `name` (a file name in the watched directory) a config file name?
fn is_config_name(name: &str) -> bool {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json")
}

/// inotify on the watched directory, read on the caller's runtime (no
/// thread of its own: with `--workers 1` the proxy stays one thread, and
/// the kernel then takes and drops no reference on a socket per syscall).
fn inotify_events(dir: &Path) -> std::io::Result<inotify::EventStream<Vec<u8>>> {
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::ATTRIB
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF,
    )?;
    inotify.into_event_stream(vec![0u8; 16 * 1024])
}

impl Pending {
    /// Notes one event on the watched directory. `root` is the config
    /// path (the directory, or the one file in it that is watched).
    fn note(&mut self, ev: &inotify::Event<std::ffi::OsString>, root: &Path, is_dir: bool) {
        use inotify::EventMask;
        if ev
            .mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
        {
            // The directory itself moved or went: watched again when it is back.
            self.rescan = true;
            self.lost = true;
            return;
        }
        let Some(name) = ev
            .name
            .as_ref()
            .filter(|_| !ev.mask.contains(EventMask::Q_OVERFLOW))
        else {
            // Events were lost.
            self.rescan = true;
            return;
        };
        let name = name.to_str().unwrap_or("");
        if is_dir && is_config_name(name) {
            self.paths.insert(root.join(name));
        } else if !is_dir && root.file_name().is_some_and(|f| f == name) {
            self.paths.insert(root.to_path_buf());
        } else {
            self.other = true;
        }
    }
}

/// Watches `path` and sends a [`Reading`] each time its content changes
/// (the first reading is sent at once). Changes are debounced by [`DEBOUNCE`].
pub fn watch(path: PathBuf) -> mpsc::Receiver<Reading> {
    let (tx, rx) = mpsc::channel(4);
    let is_dir = path.is_dir();
    let watch_dir = if is_dir {
        path.clone()
    } else {
        path.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let mut events = match inotify_events(&watch_dir) {
        Ok(ev) => Some(ev),
        Err(e) => {
            tracing::warn!(dir = %watch_dir.display(), error = %e, "cannot watch config; polling every second");
            None
        }
    };
    tokio::spawn(async move {
        let mut files = Files::default();
        let mut scan = Scan::All;
        let mut first = true;
        loop {
            // File reads block: keep them off the event loop, which may be
            // the proxy's only thread (`--workers 1`).
            let p = path.clone();
            let t = std::time::Instant::now();
            let read = tokio::task::spawn_blocking(move || {
                let r = files.refresh(&p, scan);
                let reading = match r {
                    // The first reading is sent even when it is empty (and
                    // so refused): the proxy says why it is not ready.
                    Ok(changed) if changed || first => Some(files.assemble(&p)),
                    Ok(_) => None,
                    // Unreadable: refused (and counted) like any invalid config.
                    Err(e) => Some(Err(crate::error::ConfigErrors(vec![
                        crate::error::ConfigError::unreadable(p.display().to_string(), &e),
                    ]))),
                };
                (reading, files)
            })
            .await;
            let reading = match read {
                Ok((reading, f)) => {
                    files = f;
                    reading
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reader failed");
                    return;
                }
            };
            if let Some(r) = reading {
                first = false;
                tracing::debug!(
                    read_ms = t.elapsed().as_millis() as u64,
                    files = files.files.len(),
                    "config read"
                );
                if tx.send(r).await.is_err() {
                    return;
                }
            }
            if events.is_none() {
                // Polling: the directory may be back. Watched again, it is
                // read whole at once (a change just before the watch began
                // would not be an event).
                events = inotify_events(&watch_dir).ok();
                if events.is_some() {
                    tracing::info!(dir = %watch_dir.display(), "config directory watched again");
                    scan = Scan::All;
                    continue;
                }
            }
            let backstop = if events.is_some() { RESCAN } else { POLL };
            let event = async {
                match events.as_mut() {
                    Some(ev) => ev.next().await,
                    None => std::future::pending().await,
                }
            };
            scan = tokio::select! {
                first = event => {
                    let mut p = Pending::default();
                    match first {
                        Some(Ok(ev)) => {
                            p.note(&ev, &path, is_dir);
                            tokio::time::sleep(DEBOUNCE).await;
                            // What came during the debounce, without waiting.
                            while let Some(Some(ev)) = events.as_mut().and_then(|e| e.next().now_or_never()) {
                                match ev {
                                    Ok(ev) => p.note(&ev, &path, is_dir),
                                    Err(_) => p.rescan = true,
                                }
                            }
                        }
                        other => {
                            // The watch is broken: poll from now on.
                            if let Some(Err(e)) = other {
                                tracing::warn!(error = %e, "config watch failed; polling every second");
                            }
                            events = None;
                            p.rescan = true;
                        }
                    }
                    if p.lost {
                        events = None;
                    }
                    if p.rescan || (p.other && files.has_symlinks()) {
                        Scan::All
                    } else {
                        Scan::Only(p.paths)
                    }
                }
                _ = tokio::time::sleep(backstop) => Scan::All,
            };
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const SE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: NAME, namespace: t}\nspec:\n  hosts: [NAME.example]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.0.0.1}]\n";

    fn entry(name: &str) -> String {
        SE.replace("NAME", name)
    }

    fn names(r: &Reading) -> Vec<String> {
        let Ok(cfg) = r else {
            return vec!["<invalid>".into()];
        };
        cfg.service_entries
            .iter()
            .map(|s| s.value.metadata.name.clone())
            .collect()
    }

    async fn next(rx: &mut mpsc::Receiver<Reading>) -> Reading {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a reading within 10 s")
            .expect("source alive")
    }

    /// Waits for a reading with these ServiceEntries (a write may be seen
    /// half done first, when the debounce ends between create and write).
    async fn until(rx: &mut mpsc::Receiver<Reading>, want: &[&str]) {
        loop {
            if names(&next(rx).await) == want {
                return;
            }
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bosun-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[tokio::test]
    async fn events_reread_the_files_they_name_and_renames_over_a_file_count() {
        let dir = tempdir("events");
        std::fs::write(dir.join("a.yaml"), entry("a")).expect("write");
        std::fs::write(dir.join("notes.txt"), "not config").expect("write");
        let mut rx = watch(dir.clone());
        until(&mut rx, &["a"]).await;
        // A new file, then an editor-style write of a temp file renamed over
        // an existing one: each is one reading with the new content.
        std::fs::write(dir.join("b.yaml"), entry("b")).expect("write");
        until(&mut rx, &["a", "b"]).await;
        std::fs::write(dir.join(".a.yaml.tmp"), entry("a2")).expect("write");
        std::fs::rename(dir.join(".a.yaml.tmp"), dir.join("a.yaml")).expect("rename");
        until(&mut rx, &["a2", "b"]).await;
        // Removing a file removes its resources; a non-config file is ignored.
        std::fs::remove_file(dir.join("b.yaml")).expect("remove");
        until(&mut rx, &["a2"]).await;
        std::fs::write(dir.join("notes.txt"), "still not config").expect("write");
        std::fs::write(dir.join("c.yml"), entry("c")).expect("write");
        until(&mut rx, &["a2", "c"]).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_configmap_style_symlink_swap_is_seen() {
        // What the kubelet does to a ConfigMap volume: files are symlinks
        // through `..data`, and an update swaps `..data` to a new directory.
        let dir = tempdir("configmap");
        std::fs::create_dir(dir.join("..v1")).expect("mkdir");
        std::fs::write(dir.join("..v1/a.yaml"), entry("a")).expect("write");
        std::os::unix::fs::symlink("..v1", dir.join("..data")).expect("symlink");
        std::os::unix::fs::symlink("..data/a.yaml", dir.join("a.yaml")).expect("symlink");
        let mut rx = watch(dir.clone());
        until(&mut rx, &["a"]).await;
        std::fs::create_dir(dir.join("..v2")).expect("mkdir");
        std::fs::write(dir.join("..v2/a.yaml"), entry("a2")).expect("write");
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).expect("symlink");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        until(&mut rx, &["a2"]).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

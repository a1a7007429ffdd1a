//! Atomic file writes: a temporary file beside the target, flushed and synced, then renamed
//! over it. A process killed mid-write leaves at most a `.tmp` file, never a half file under
//! the real name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    // Unique per write: threads of one process may write the same file at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `path` atomically through `fill`, creating parent folders.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::new(f);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Copies a file, writing the copy atomically.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    write_bytes_atomic(dst, &bytes)
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    s.push('\n');
    write_bytes_atomic(path, s.as_bytes())
}

/// Removes a file or a folder with everything in it; one that is not there is no error.
pub fn remove_if_present(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// An exclusive claim of a folder by one process: `<dir>/.lock` holds the owner's process
/// id and host, is created only if absent, and is removed when the claim is dropped. While
/// held, a thread of the owner touches it every [`DirLock::HEARTBEAT`]. A lock left by a
/// process of this host that no longer runs (killed) is taken over with a warning; so is a
/// lock of another host (whose processes cannot be seen from here: a cluster's nodes sharing
/// the folder) whose heartbeat is older than [`DirLock::STALE`]. A live owner holds it.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    /// Dropping it ends the heartbeat thread.
    _heartbeat: std::sync::mpsc::Sender<()>,
}

/// The outcome of [`DirLock::try_acquire`].
#[derive(Debug)]
pub enum Claim {
    /// This process holds the folder until the lock is dropped.
    Mine(DirLock),
    /// Another process holds it.
    Held { pid: String, host: String },
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl DirLock {
    /// The lock file's name inside the folder.
    pub const FILE: &'static str = ".lock";
    /// How often the owner touches its lock.
    pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(30);
    /// Another host's lock untouched for this long is taken over: its owner was killed
    /// (a cancelled or timed-out cluster job). Generous, for clocks that differ between
    /// hosts.
    pub const STALE: std::time::Duration = std::time::Duration::from_secs(600);

    fn held(path: PathBuf) -> DirLock {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let beat = path.clone();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Self::HEARTBEAT)
            {
                let touched = File::options()
                    .write(true)
                    .open(&beat)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                if touched.is_err() {
                    break;
                }
            }
        });
        DirLock {
            path,
            _heartbeat: tx,
        }
    }

    /// How long ago the lock at `path` was last touched (zero if in the future).
    fn age(path: &Path) -> Option<std::time::Duration> {
        let m = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        Some(
            std::time::SystemTime::now()
                .duration_since(m)
                .unwrap_or_default(),
        )
    }

    /// Claims `dir` (which must exist), or names the process that holds it.
    pub fn try_acquire(dir: &Path) -> Result<Claim> {
        let path = dir.join(Self::FILE);
        let me = format!("{} {}", std::process::id(), host_name());
        let owner = || {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            let mut it = owner.split_whitespace();
            (
                it.next().unwrap_or("?").to_string(),
                it.next().unwrap_or("?").to_string(),
            )
        };
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(Claim::Mine(DirLock::held(path)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let (pid, host) = owner();
                    let here = host == host_name() && host != "unknown";
                    let dead = if here {
                        !Path::new("/proc").join(&pid).exists()
                    } else {
                        Self::age(&path).is_some_and(|a| a > Self::STALE)
                    };
                    if dead {
                        tracing::warn!(
                            "{}: taking over the lock of process {pid} on {host}, which {}",
                            dir.display(),
                            if here {
                                "no longer runs".to_string()
                            } else {
                                format!("has not touched it for over {} s", Self::STALE.as_secs())
                            }
                        );
                        match std::fs::remove_file(&path) {
                            Ok(()) => continue,
                            // Another process took it over first.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(Error::io(&path, e)),
                        }
                    }
                    return Ok(Claim::Held { pid, host });
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        let (pid, host) = owner();
        Ok(Claim::Held { pid, host })
    }

    /// Claims `dir` (which must exist); a folder held by another process is an error that
    /// names it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        match Self::try_acquire(dir)? {
            Claim::Mine(lock) => Ok(lock),
            Claim::Held { pid, host } => Err(Error::config(
                "out",
                dir.display(),
                format!(
                    "in use by process {pid} on {host} (its lock: {}); wait for it to \
                     finish, or remove the lock if that process is gone (a lock of another \
                     host is taken over once untouched for {} s)",
                    dir.join(Self::FILE).display(),
                    Self::STALE.as_secs()
                ),
            )),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

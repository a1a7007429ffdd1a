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

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// An exclusive claim of a folder by one process: `<dir>/.lock` holds the owner's process
/// id and host, is created only if absent, and is removed when the claim is dropped. A lock
/// left by a process of this host that no longer runs (killed) is taken over with a
/// warning; a live owner, or one on another host (whose liveness cannot be seen from here),
/// holds it.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
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
                    return Ok(Claim::Mine(DirLock { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let (pid, host) = owner();
                    let here = host == host_name() && host != "unknown";
                    let alive = Path::new("/proc").join(&pid).exists();
                    if here && !alive {
                        tracing::warn!(
                            "{}: taking over the lock of process {pid}, which no longer runs",
                            dir.display()
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
                     finish, or remove the lock if that process is gone",
                    dir.join(Self::FILE).display()
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

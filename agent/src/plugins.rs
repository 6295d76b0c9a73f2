//! Plugins from the gateway's catalog, kept in the agent's plugin directory.
//!
//! Content-addressed: a plugin is written only after its SHA-256 matches what the config
//! named, and it is run only while the file still has that hash (checked before every
//! run, so a file changed behind the agent's back is refused, not run). Names are confined
//! to the directory (no `/`, no `..`, no leading dot), symlinks are never followed, and
//! files are written atomically (temp file, fsync, mode 0755, rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use outpost_protocol::{valid_check_name, PluginRef, MAX_PLUGIN_BYTES};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    #[error("plugin name {0:?} is not allowed (letters, digits, _ - . only; no paths)")]
    BadName(String),
    #[error("plugin {name} is not available yet (it is being fetched from the gateway)")]
    Missing { name: String },
    #[error("plugin {name} is a symlink or not a regular file; refusing to run it")]
    NotRegular { name: String },
    #[error(
        "plugin {name} on disk does not match sha256 {want} (found {got}); refusing to run it"
    )]
    HashMismatch {
        name: String,
        want: String,
        got: String,
    },
    #[error("plugin {name} is {size} bytes, over the {MAX_PLUGIN_BYTES}-byte limit")]
    TooBig { name: String, size: u64 },
    #[error("cannot store plugin {name}: {error}")]
    Io { name: String, error: String },
}

#[derive(Debug)]
pub struct PluginStore {
    dir: PathBuf,
}

impl PluginStore {
    pub fn new(dir: &Path) -> PluginStore {
        PluginStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, PluginError> {
        if !valid_check_name(name) || name.starts_with('.') {
            return Err(PluginError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    /// The path of the plugin if the file there has the expected hash.
    pub fn verified_path(&self, plugin: &PluginRef) -> Result<PathBuf, PluginError> {
        let path = self.path(&plugin.name)?;
        let name = plugin.name.clone();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) => return Err(PluginError::Missing { name }),
        };
        if !meta.is_file() {
            return Err(PluginError::NotRegular { name });
        }
        if meta.len() != plugin.size || meta.len() > MAX_PLUGIN_BYTES {
            // Cheaper than hashing, and bounds what is read.
            return Err(PluginError::HashMismatch {
                name,
                want: plugin.sha256.clone(),
                got: format!("a file of {} bytes instead of {}", meta.len(), plugin.size),
            });
        }
        let bytes =
            std::fs::read(&path).map_err(|_| PluginError::Missing { name: name.clone() })?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != plugin.sha256 {
            return Err(PluginError::HashMismatch {
                name,
                want: plugin.sha256.clone(),
                got,
            });
        }
        Ok(path)
    }

    /// Write `content` as `plugin` after checking its size and hash.
    pub fn install(&self, plugin: &PluginRef, content: &[u8]) -> Result<PathBuf, PluginError> {
        let path = self.path(&plugin.name)?;
        let name = plugin.name.clone();
        if content.len() as u64 > MAX_PLUGIN_BYTES {
            return Err(PluginError::TooBig {
                name,
                size: content.len() as u64,
            });
        }
        let got = hex::encode(Sha256::digest(content));
        if got != plugin.sha256 {
            return Err(PluginError::HashMismatch {
                name,
                want: plugin.sha256.clone(),
                got,
            });
        }
        let io = |e: std::io::Error| PluginError::Io {
            name: plugin.name.clone(),
            error: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", plugin.name, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o755).custom_flags(libc::O_NOFOLLOW);
        }
        // On Windows create_new does not follow a symlink at `tmp` either (CREATE_NEW
        // fails on any existing name).
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(content).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        // rename replaces a symlink at `path` itself, never what it points to.
        std::fs::rename(&tmp, &path).map_err(io)?;
        #[cfg(unix)]
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn r(name: &str, content: &[u8]) -> PluginRef {
        PluginRef {
            name: name.into(),
            sha256: hex::encode(Sha256::digest(content)),
            size: content.len() as u64,
        }
    }

    #[test]
    fn installs_only_matching_content_and_verifies_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::new(&dir.path().join("plugins"));
        let body = b"#!/bin/sh\necho OK\n";
        let p = r("check_x", body);
        assert_eq!(
            store.verified_path(&p),
            Err(PluginError::Missing {
                name: "check_x".into()
            })
        );
        let err = store.install(&p, b"#!/bin/sh\nrm -rf /\n").unwrap_err();
        assert!(matches!(err, PluginError::HashMismatch { .. }), "{err}");
        assert!(
            !dir.path().join("plugins/check_x").exists(),
            "nothing written on mismatch"
        );
        let path = store.install(&p, body).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(store.verified_path(&p).unwrap(), path);
        // Tampered afterwards: refused.
        std::fs::write(&path, b"#!/bin/sh\necho pwned\n").unwrap();
        assert!(matches!(
            store.verified_path(&p),
            Err(PluginError::HashMismatch { .. })
        ));
    }

    #[test]
    fn names_are_confined_and_symlinks_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::new(dir.path());
        for bad in ["../evil", "/etc/passwd", "..", ".hidden", "a/b", ""] {
            assert_eq!(
                store.install(&r(bad, b"x"), b"x"),
                Err(PluginError::BadName(bad.into())),
                "{bad}"
            );
        }
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("linked")).unwrap();
        assert_eq!(
            store.verified_path(&r("linked", b"x")),
            Err(PluginError::NotRegular {
                name: "linked".into()
            })
        );
        // Installing over the symlink replaces the link, not the file it points to.
        store.install(&r("linked", b"new"), b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
        assert_eq!(std::fs::read(dir.path().join("linked")).unwrap(), b"new");
    }
}

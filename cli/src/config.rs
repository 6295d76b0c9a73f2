//! Contexts: named gateways (URL, token, and how to trust its certificate) in a TOML file,
//! one of them current.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// `https://HOST:PORT` of a gateway.
    pub url: String,
    /// An API token of the tenant.
    pub token: String,
    /// A CA certificate file (PEM) to trust, instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The gateway certificate's SHA-256 pin (hex), for a self-signed gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

/// Where the file is: `--config`, else `$OUTPOST_CONFIG`, else
/// `$XDG_CONFIG_HOME/outpost/config.toml`, else `~/.config/outpost/config.toml`.
pub fn path(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => bail!("no HOME to keep the contexts in: give --config FILE"),
        },
    };
    Ok(base.join("outpost").join("config.toml"))
}

pub fn load(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid contexts file; fix it or remove it and add contexts again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Write the file, readable by its owner only (it holds tokens).
pub fn save(path: &Path, config: &Config) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    let text = toml::to_string(config)?;
    {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

impl Config {
    /// The context to use: `named`, else the current one.
    pub fn pick(&self, named: Option<&str>) -> Result<(String, Context)> {
        let name = match named.or(self.current.as_deref()) {
            Some(n) => n.to_string(),
            None => bail!(
                "no context: add one with `outpost context set NAME --url https://GATEWAY:PORT --token TOKEN [--pin HEX | --ca FILE]`"
            ),
        };
        match self.contexts.get(&name) {
            Some(c) => Ok((name, c.clone())),
            None => bail!(
                "no context named {name:?} (have: {}); add it with `outpost context set {name} --url … --token …`",
                self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

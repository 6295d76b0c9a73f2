//! From a collector's declaration to what the agent runs: the argv, the environment and
//! the configuration file. Pure functions; writing the file is the supervisor's job.
//!
//! - collectd: `collectd.conf` with the declared plugins, `logfile` to stdout (loaded
//!   first, so the agent's log gets every message) and `write_graphite` pointing at the
//!   agent's Graphite listener with the prefix `NAME@SECRET.`; run as `COMMAND -f -C FILE`.
//! - fluentd: `fluent.conf` with the declared sources and a `<match **>` that posts the
//!   records as JSON arrays to `http://127.0.0.1:PORT/collector/NAME/TAG`, as the HTTP user
//!   NAME with the password SECRET; run as `COMMAND -c FILE`.
//! - program: the declared `config` (if any) becomes `collector.conf`; `command` runs as is.
//!
//! SECRET is the collector's [`super::secret::Secret`]: it goes into the file (mode 0600)
//! and the environment, never into the command line, which every local user can read.
//!
//! Placeholders `{{graphite_host}}`, `{{graphite_port}}`, `{{graphite_prefix}}`,
//! `{{http_url}}`, `{{secret}}`, `{{hostname}}`, `{{config_file}}` and `{{work_dir}}` are
//! replaced in `config` and in `env`'s values, and all but the three that hold the secret
//! (`graphite_prefix`, `http_url`, `secret`) in `command`'s arguments; any other `{{…}}`
//! is an error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use outpost_protocol::{CollectorKind, CollectorSpec};

/// The program collectd runs as when the declaration names none.
pub const DEFAULT_COLLECTD: &str = "/usr/sbin/collectd";
/// The program fluentd runs as when the declaration names none (found on `PATH`).
pub const DEFAULT_FLUENTD: &str = "fluentd";
/// The types collectd's plugins report, as Debian installs them.
pub const COLLECTD_TYPES_DB: &str = "/usr/share/collectd/types.db";
/// Where the listeners are: only this host can reach them.
pub const LISTEN_HOST: &str = "127.0.0.1";
/// Longest configuration the agent renders.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// What rendering needs besides the declaration.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The agent's host name, given to collectd as its `Hostname`.
    pub hostname: &'a str,
    /// The collector's own directory (under the agent's collectors work dir).
    pub dir: &'a Path,
    pub graphite_port: u16,
    pub http_port: u16,
    /// The collector's secret ([`super::secret::Secret::expose`]).
    pub secret: &'a str,
}

/// What the supervisor runs. Two renderings that compare equal run the same way, so a
/// changed declaration that renders equal does not restart the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub argv: Vec<String>,
    /// Set on top of the cleared environment every plugin gets.
    pub env: BTreeMap<String, String>,
    /// The configuration file and what it must hold (program collectors without `config`
    /// have none).
    pub file: Option<(PathBuf, String)>,
}

/// Why a declaration could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("the declaration is not valid: {0}")]
    Invalid(String),
    #[error("unknown placeholder {{{{{found}}}}} in {field} (known: {known})", known = known_list())]
    UnknownPlaceholder { field: String, found: String },
    #[error("{field} has a {{{{ without its closing }}}}")]
    Unclosed { field: String },
    #[error("{{{{{found}}}}} in {field} would show the collector's secret to every local user (in ps); use it in config or env instead")]
    SecretInCommand { field: String, found: String },
    #[error("the <Plugin {plugin}> lines open or close more sections than they close or open; the block must stand on its own")]
    Unbalanced { plugin: String },
    #[error("collectd plugin {0} is listed twice")]
    Duplicate(String),
    #[error("the rendered configuration is {0} bytes, more than the {MAX_CONFIG_BYTES} allowed")]
    TooLarge(usize),
}

const PLACEHOLDERS: [&str; 8] = [
    "graphite_host",
    "graphite_port",
    "graphite_prefix",
    "http_url",
    "secret",
    "hostname",
    "config_file",
    "work_dir",
];

/// The placeholders whose value holds the collector's secret.
const SECRET_PLACEHOLDERS: [&str; 3] = ["graphite_prefix", "http_url", "secret"];

fn known_list() -> String {
    PLACEHOLDERS.join(", ")
}

/// The start of every Graphite path a collector sends: its name, an `@` (which no
/// collector name contains, so two collectors never mix), its secret and a dot. (Not `/`:
/// collectd's `write_graphite` turns `/`, `:`, `!`, `(`, `)`, quotes and white space into
/// its `EscapeCharacter`, in the prefix too; the secret is hex.)
pub fn graphite_prefix(name: &str, secret: &str) -> String {
    format!("{name}@{secret}.")
}

/// The URL path under which the HTTP listener takes a collector's records.
pub fn http_path(name: &str) -> String {
    format!("/collector/{name}")
}

/// The configuration file of a collector of `kind`, in its directory `dir`.
pub fn config_file(kind: CollectorKind, dir: &Path) -> PathBuf {
    dir.join(match kind {
        CollectorKind::Collectd => "collectd.conf",
        CollectorKind::Fluentd => "fluent.conf",
        CollectorKind::Program => "collector.conf",
    })
}

/// Render `spec`.
pub fn render(spec: &CollectorSpec, ctx: &Context) -> Result<Rendered, RenderError> {
    spec.validate().map_err(RenderError::Invalid)?;
    let file = config_file(spec.kind, ctx.dir);
    let vars = [
        ("graphite_host", LISTEN_HOST.to_string()),
        ("graphite_port", ctx.graphite_port.to_string()),
        ("graphite_prefix", graphite_prefix(&spec.name, ctx.secret)),
        (
            "http_url",
            format!(
                "http://{}:{}@{LISTEN_HOST}:{}{}",
                spec.name,
                ctx.secret,
                ctx.http_port,
                http_path(&spec.name)
            ),
        ),
        ("secret", ctx.secret.to_string()),
        ("hostname", ctx.hostname.to_string()),
        ("config_file", file.display().to_string()),
        ("work_dir", ctx.dir.display().to_string()),
    ];
    let public: Vec<_> = vars
        .iter()
        .filter(|(k, _)| !SECRET_PLACEHOLDERS.contains(k))
        .cloned()
        .collect();
    let mut argv = spec
        .command
        .iter()
        .enumerate()
        .map(|(i, a)| substitute(a, &public, &format!("command argument {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| Ok((k.clone(), substitute(v, &vars, &format!("env {k}"))?)))
        .collect::<Result<BTreeMap<_, _>, RenderError>>()?;
    let text = match spec.kind {
        CollectorKind::Collectd => {
            if argv.is_empty() {
                argv.push(DEFAULT_COLLECTD.into());
            }
            argv.extend(["-f".into(), "-C".into(), file.display().to_string()]);
            Some(collectd_conf(spec, ctx)?)
        }
        CollectorKind::Fluentd => {
            if argv.is_empty() {
                argv.push(DEFAULT_FLUENTD.into());
            }
            argv.extend(["-c".into(), file.display().to_string()]);
            let sources = match &spec.config {
                Some(c) => substitute(c, &vars, "config")?,
                None => String::new(),
            };
            Some(fluent_conf(spec, ctx, &sources))
        }
        CollectorKind::Program => spec
            .config
            .as_deref()
            .map(|c| substitute(c, &vars, "config"))
            .transpose()?,
    };
    if let Some(t) = &text {
        if t.len() > MAX_CONFIG_BYTES {
            return Err(RenderError::TooLarge(t.len()));
        }
    }
    Ok(Rendered {
        argv,
        env,
        file: text.map(|t| (file, t)),
    })
}

/// `text` with every `{{name}}` replaced by its value in `vars`.
fn substitute(text: &str, vars: &[(&str, String)], field: &str) -> Result<String, RenderError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err(RenderError::Unclosed {
                field: field.into(),
            });
        };
        let key = after[..close].trim();
        match vars.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => out.push_str(v),
            None if SECRET_PLACEHOLDERS.contains(&key) => {
                return Err(RenderError::SecretInCommand {
                    field: field.into(),
                    found: key.into(),
                })
            }
            None => {
                let mut found = key.to_string();
                crate::util::truncate_utf8(&mut found, 64);
                return Err(RenderError::UnknownPlaceholder {
                    field: field.into(),
                    found,
                });
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string as collectd's configuration reads it: double quotes, with `"` and `\`
/// escaped; control characters (which it cannot hold) become `_`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether a `<Plugin>` block's lines close every section they open, and no more: so a
/// block cannot end the `<Plugin>` early and add configuration of its own after it.
fn balanced(lines: &str) -> bool {
    let mut depth = 0usize;
    for line in lines.lines().map(str::trim) {
        if line.starts_with("</") {
            match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            }
        } else if line.starts_with('<') {
            depth += 1;
        }
    }
    depth == 0
}

fn collectd_conf(spec: &CollectorSpec, ctx: &Context) -> Result<String, RenderError> {
    let dir = ctx.dir.display().to_string();
    let interval = spec.interval_secs;
    let mut c = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        c,
        "# Rendered by the Outpost agent for the collector {:?}; changes here are overwritten.",
        spec.name
    );
    let _ = writeln!(c, "Hostname {}", quote(ctx.hostname));
    c.push_str("FQDNLookup false\n");
    let _ = writeln!(c, "BaseDir {}", quote(&dir));
    let _ = writeln!(
        c,
        "PIDFile {}",
        quote(&ctx.dir.join("collectd.pid").display().to_string())
    );
    let _ = writeln!(c, "TypesDB {}", quote(COLLECTD_TYPES_DB));
    let _ = writeln!(c, "Interval {interval}");
    c.push_str(
        "\n# First, so that every later message reaches the agent's log (it reads stdout).\n\
         LoadPlugin logfile\n\
         <Plugin logfile>\n  LogLevel \"info\"\n  File STDOUT\n  Timestamp false\n  PrintSeverity true\n</Plugin>\n\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    for p in &spec.plugins {
        if !seen.insert(p.name.as_str()) {
            return Err(RenderError::Duplicate(p.name.clone()));
        }
        let _ = writeln!(c, "LoadPlugin {}", p.name);
        if let Some(lines) = p.config.as_deref().filter(|l| !l.trim().is_empty()) {
            if !balanced(lines) {
                return Err(RenderError::Unbalanced {
                    plugin: p.name.clone(),
                });
            }
            let _ = writeln!(c, "<Plugin {}>", p.name);
            for line in lines.lines() {
                let _ = writeln!(c, "  {}", line.trim_end());
            }
            c.push_str("</Plugin>\n");
        }
    }
    let _ = write!(
        c,
        "\n# Where the values go: the agent's Graphite listener, flushed every interval.\n\
         <LoadPlugin write_graphite>\n  FlushInterval {interval}\n</LoadPlugin>\n\
         <Plugin write_graphite>\n  <Node \"outpost\">\n    Host {host}\n    Port \"{port}\"\n    Protocol \"tcp\"\n    \
         Prefix {prefix}\n    StoreRates true\n    AlwaysAppendDS false\n    EscapeCharacter \"_\"\n    \
         SeparateInstances false\n    LogSendErrors true\n  </Node>\n</Plugin>\n",
        host = quote(LISTEN_HOST),
        port = ctx.graphite_port,
        prefix = quote(&graphite_prefix(&spec.name, ctx.secret)),
    );
    Ok(c)
}

fn fluent_conf(spec: &CollectorSpec, ctx: &Context, sources: &str) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Rendered by the Outpost agent for the collector {:?}; changes here are overwritten.\n",
        spec.name
    );
    if !sources.trim().is_empty() {
        c.push_str(sources.trim_end());
        c.push_str("\n\n");
    }
    let _ = write!(
        c,
        "# fluentd's own events stay out of the data (its log still goes to stdout).\n\
         <label @FLUENT_LOG>\n  <match **>\n    @type null\n  </match>\n</label>\n\n\
         # Every record goes to the agent's HTTP listener, one JSON array per tag and flush.\n\
         <match **>\n  @type http\n  endpoint http://{LISTEN_HOST}:{port}{path}/${{tag}}\n  http_method post\n  \
         open_timeout 2\n  read_timeout 10\n  json_array true\n  \
         <auth>\n    method basic\n    username {name}\n    password {secret}\n  </auth>\n  \
         <format>\n    @type json\n  </format>\n  \
         <buffer tag>\n    flush_interval {interval}s\n    chunk_limit_size 1m\n    total_limit_size 16m\n    \
         retry_max_interval 30s\n  </buffer>\n</match>\n",
        port = ctx.http_port,
        path = http_path(&spec.name),
        name = spec.name,
        secret = ctx.secret,
        interval = spec.interval_secs,
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::CollectdPlugin;

    fn ctx(dir: &Path) -> Context<'_> {
        Context {
            hostname: "web-1.example.com",
            dir,
            graphite_port: 40001,
            http_port: 40002,
            secret: SECRET,
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn collectd(plugins: Vec<CollectdPlugin>) -> CollectorSpec {
        CollectorSpec {
            name: "sys".into(),
            kind: CollectorKind::Collectd,
            command: vec![],
            env: BTreeMap::new(),
            plugins,
            interval_secs: 2,
            config: None,
        }
    }

    fn plugin(name: &str, config: Option<&str>) -> CollectdPlugin {
        CollectdPlugin {
            name: name.into(),
            config: config.map(str::to_string),
        }
    }

    #[test]
    fn collectd_conf_loads_logfile_first_then_the_plugins_then_write_graphite() {
        let dir = Path::new("/state/collectors/sys");
        let r = render(
            &collectd(vec![
                plugin("cpu", None),
                plugin("memory", None),
                plugin("df", Some("MountPoint \"/\"\nIgnoreSelected false")),
            ]),
            &ctx(dir),
        )
        .unwrap();
        assert_eq!(
            r.argv,
            [
                "/usr/sbin/collectd",
                "-f",
                "-C",
                "/state/collectors/sys/collectd.conf"
            ]
        );
        let (path, text) = r.file.unwrap();
        assert_eq!(path, dir.join("collectd.conf"));
        for want in [
            "Hostname \"web-1.example.com\"\n",
            "FQDNLookup false\n",
            "BaseDir \"/state/collectors/sys\"\n",
            "PIDFile \"/state/collectors/sys/collectd.pid\"\n",
            "TypesDB \"/usr/share/collectd/types.db\"\n",
            "Interval 2\n",
            "  File STDOUT\n",
            "<Plugin df>\n  MountPoint \"/\"\n  IgnoreSelected false\n</Plugin>\n",
            "  FlushInterval 2\n",
            "    Host \"127.0.0.1\"\n    Port \"40001\"\n    Protocol \"tcp\"\n    Prefix \"sys@0123456789abcdef0123456789abcdef.\"\n",
            "    StoreRates true\n",
            "    SeparateInstances false\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let at = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s} missing"));
        assert!(at("LoadPlugin logfile") < at("LoadPlugin cpu"));
        assert!(at("LoadPlugin cpu") < at("LoadPlugin memory"));
        assert!(at("LoadPlugin df") < at("<Plugin df>"));
        assert!(at("</Plugin>\n\n# Where") < at("<LoadPlugin write_graphite>"));
        assert!(!text.contains("<Plugin cpu>"), "no block without lines");
    }

    #[test]
    fn collectd_strings_are_escaped_and_blocks_cannot_break_out() {
        let odd = Context {
            hostname: "a\"b\\c\nd",
            ..ctx(Path::new("/tmp/x \"y\""))
        };
        let (_, text) = render(&collectd(vec![plugin("cpu", None)]), &odd)
            .unwrap()
            .file
            .unwrap();
        assert!(text.contains("Hostname \"a\\\"b\\\\c_d\"\n"), "{text}");
        assert!(text.contains("BaseDir \"/tmp/x \\\"y\\\"\"\n"), "{text}");
        let escape = collectd(vec![plugin(
            "df",
            Some("MountPoint \"/\"\n</Plugin>\nLoadPlugin exec\n<Plugin df>"),
        )]);
        assert_eq!(
            render(&escape, &ctx(Path::new("/d"))).unwrap_err(),
            RenderError::Unbalanced {
                plugin: "df".into()
            }
        );
        let nested = collectd(vec![plugin(
            "curl_json",
            Some(
                "<URL \"http://localhost/x\">\n  <Key \"a\">\n    Type \"gauge\"\n  </Key>\n</URL>",
            ),
        )]);
        render(&nested, &ctx(Path::new("/d"))).unwrap();
        let twice = collectd(vec![plugin("cpu", None), plugin("cpu", None)]);
        assert_eq!(
            render(&twice, &ctx(Path::new("/d"))).unwrap_err(),
            RenderError::Duplicate("cpu".into())
        );
        let invalid = collectd(vec![plugin("cpu\"; LoadPlugin exec", None)]);
        assert!(matches!(
            render(&invalid, &ctx(Path::new("/d"))),
            Err(RenderError::Invalid(_))
        ));
    }

    #[test]
    fn a_changed_interval_changes_the_collectd_file() {
        let dir = Path::new("/d");
        let a = render(&collectd(vec![plugin("cpu", None)]), &ctx(dir)).unwrap();
        let b = render(
            &CollectorSpec {
                interval_secs: 5,
                ..collectd(vec![plugin("cpu", None)])
            },
            &ctx(dir),
        )
        .unwrap();
        assert_ne!(a, b);
        assert_eq!(a.argv, b.argv);
        assert_eq!(
            a,
            render(&collectd(vec![plugin("cpu", None)]), &ctx(dir)).unwrap()
        );
    }

    #[test]
    fn fluentd_conf_has_the_sources_then_the_http_output() {
        let spec = CollectorSpec {
            name: "logs".into(),
            kind: CollectorKind::Fluentd,
            command: vec!["/opt/fluent/bin/fluentd".into(), "--no-supervisor".into()],
            env: BTreeMap::new(),
            plugins: vec![],
            interval_secs: 10,
            config: Some("<source>\n  @type dummy\n  tag app.{{hostname}}\n</source>\n".into()),
        };
        let r = render(&spec, &ctx(Path::new("/s/logs"))).unwrap();
        assert_eq!(
            r.argv,
            [
                "/opt/fluent/bin/fluentd",
                "--no-supervisor",
                "-c",
                "/s/logs/fluent.conf"
            ]
        );
        let (path, text) = r.file.unwrap();
        assert_eq!(path, Path::new("/s/logs/fluent.conf"));
        assert!(
            text.contains("<source>\n  @type dummy\n  tag app.web-1.example.com\n</source>\n"),
            "{text}"
        );
        for want in [
            "<match **>\n  @type http\n",
            "endpoint http://127.0.0.1:40002/collector/logs/${tag}\n",
            "json_array true\n",
            "<auth>\n    method basic\n    username logs\n    password 0123456789abcdef0123456789abcdef\n  </auth>\n",
            "<buffer tag>\n    flush_interval 10s\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(text.find("<source>").unwrap() < text.find("@type http").unwrap());
        assert!(
            !r.argv.iter().any(|a| a.contains(SECRET)),
            "the secret is not on the command line"
        );
        let default = CollectorSpec {
            command: vec![],
            config: None,
            ..spec
        };
        assert_eq!(
            render(&default, &ctx(Path::new("/s/logs"))).unwrap().argv[0],
            "fluentd"
        );
    }

    #[test]
    fn program_placeholders_are_replaced_and_unknown_ones_refused() {
        let spec = CollectorSpec {
            name: "shipper".into(),
            kind: CollectorKind::Program,
            command: vec![
                "/usr/local/bin/shipper".into(),
                "--config".into(),
                "{{config_file}}".into(),
            ],
            env: BTreeMap::from([("TARGET".into(), "{{ http_url }}".into())]),
            plugins: vec![],
            interval_secs: 10,
            config: Some(
                "graphite {{graphite_host}}:{{graphite_port}}\nprefix {{graphite_prefix}}\nsecret {{secret}}\nhost {{hostname}}\ndir {{work_dir}}\n"
                    .into(),
            ),
        };
        let r = render(&spec, &ctx(Path::new("/s/shipper"))).unwrap();
        assert_eq!(
            r.argv,
            [
                "/usr/local/bin/shipper",
                "--config",
                "/s/shipper/collector.conf"
            ]
        );
        assert_eq!(
            r.env["TARGET"],
            format!("http://shipper:{SECRET}@127.0.0.1:40002/collector/shipper")
        );
        assert_eq!(
            r.file,
            Some((
                PathBuf::from("/s/shipper/collector.conf"),
                format!("graphite 127.0.0.1:40001\nprefix shipper@{SECRET}.\nsecret {SECRET}\nhost web-1.example.com\ndir /s/shipper\n")
            ))
        );
        let unknown = CollectorSpec {
            config: Some("x {{graphite_path}}".into()),
            ..spec.clone()
        };
        let e = render(&unknown, &ctx(Path::new("/s"))).unwrap_err();
        assert_eq!(
            e,
            RenderError::UnknownPlaceholder {
                field: "config".into(),
                found: "graphite_path".into()
            }
        );
        assert!(e.to_string().contains("{{graphite_path}}"), "{e}");
        assert!(e.to_string().contains("http_url"), "{e}");
        // The secret never goes on the command line, where every local user can read it.
        for secret in ["graphite_prefix", "http_url", "secret"] {
            let in_argv = CollectorSpec {
                command: vec!["/bin/x".into(), format!("--to={{{{{secret}}}}}")],
                ..spec.clone()
            };
            let e = render(&in_argv, &ctx(Path::new("/s"))).unwrap_err();
            assert_eq!(
                e,
                RenderError::SecretInCommand {
                    field: "command argument 2".into(),
                    found: secret.into()
                }
            );
            assert!(e.to_string().contains("use it in config or env"), "{e}");
        }
        let in_command = CollectorSpec {
            command: vec!["/bin/x".into(), "{{nope}}".into()],
            ..spec.clone()
        };
        assert!(matches!(
            render(&in_command, &ctx(Path::new("/s"))),
            Err(RenderError::UnknownPlaceholder { field, .. }) if field == "command argument 2"
        ));
        let unclosed = CollectorSpec {
            config: Some("x {{hostname".into()),
            ..spec.clone()
        };
        assert!(matches!(
            render(&unclosed, &ctx(Path::new("/s"))),
            Err(RenderError::Unclosed { .. })
        ));
        let no_file = CollectorSpec {
            config: None,
            ..spec
        };
        assert_eq!(render(&no_file, &ctx(Path::new("/s"))).unwrap().file, None);
    }
}

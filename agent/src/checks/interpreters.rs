//! Windows has no shebang: a plugin's file extension picks the program that runs it
//! (`.ps1` → PowerShell, `.py` → Python, `.vbs` → cscript; `.exe` runs directly, and so do
//! `.bat`/`.cmd`: the standard library starts those through `cmd.exe` with the escaping
//! that keeps arguments from being read as commands, which `cmd /c FILE ARGS` would not).
//! On Unix the executable bit and the shebang rule and the map starts empty, but either
//! platform's map can be changed in the agent's configuration (docs/WINDOWS.md lists the
//! Windows map):
//!
//! ```toml
//! [interpreters]
//! py = ["/usr/bin/python3"]
//! ps1 = ["pwsh", "-NoProfile", "-NonInteractive", "-File"]
//! ```

use std::collections::BTreeMap;

/// Extension (lowercase, without the dot) → the argv put in front of the plugin's path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interpreters(BTreeMap<String, Vec<String>>);

impl Interpreters {
    /// The built-in map for Windows.
    pub fn windows_defaults() -> Interpreters {
        let map = [
            (
                "ps1",
                &[
                    "powershell.exe",
                    "-NoLogo",
                    "-NoProfile",
                    "-NonInteractive",
                    "-ExecutionPolicy",
                    "Bypass",
                    "-File",
                ][..],
            ),
            ("py", &["python.exe"][..]),
            ("vbs", &["cscript.exe", "//nologo"][..]),
        ];
        Interpreters(
            map.iter()
                .map(|(ext, argv)| {
                    (
                        ext.to_string(),
                        argv.iter().map(|a| a.to_string()).collect(),
                    )
                })
                .collect(),
        )
    }

    /// This platform's built-in map, with `overrides` on top. An override with an empty
    /// argv removes the extension (the file then runs directly).
    pub fn for_platform(overrides: &BTreeMap<String, Vec<String>>) -> Interpreters {
        let mut map = if cfg!(windows) {
            Interpreters::windows_defaults().0
        } else {
            BTreeMap::new()
        };
        for (ext, argv) in overrides {
            let ext = ext.trim_start_matches('.').to_ascii_lowercase();
            if argv.is_empty() {
                map.remove(&ext);
            } else {
                map.insert(ext, argv.clone());
            }
        }
        Interpreters(map)
    }

    /// `argv` with the interpreter for its program's extension in front, if any.
    pub fn wrap(&self, argv: Vec<String>) -> Vec<String> {
        let Some(ext) = argv.first().and_then(|p| extension(p)) else {
            return argv;
        };
        match self.0.get(&ext) {
            Some(interp) => interp.iter().cloned().chain(argv).collect(),
            None => argv,
        }
    }
}

/// The lowercase extension of the file part of `program`, either separator.
fn extension(program: &str) -> Option<String> {
    let file = program.rsplit(['/', '\\']).next()?;
    let (stem, ext) = file.rsplit_once('.')?;
    (!stem.is_empty() && !ext.is_empty()).then(|| ext.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn windows_extensions_pick_their_interpreter() {
        let w = Interpreters::windows_defaults();
        assert_eq!(
            w.wrap(v(&[
                r"C:\ProgramData\Outpost\plugins\check_disk.PS1",
                "-w",
                "80"
            ])),
            v(&[
                "powershell.exe",
                "-NoLogo",
                "-NoProfile",
                "-NonInteractive",
                "-ExecutionPolicy",
                "Bypass",
                "-File",
                r"C:\ProgramData\Outpost\plugins\check_disk.PS1",
                "-w",
                "80"
            ])
        );
        assert_eq!(
            w.wrap(v(&["check.bat", "a&b"])),
            v(&["check.bat", "a&b"]),
            "no cmd /c"
        );
        assert_eq!(
            w.wrap(v(&["check.py", "x"])),
            v(&["python.exe", "check.py", "x"])
        );
        assert_eq!(
            w.wrap(v(&["check.exe"])),
            v(&["check.exe"]),
            ".exe runs directly"
        );
        assert_eq!(
            w.wrap(v(&[r"C:\x.d\check"])),
            v(&[r"C:\x.d\check"]),
            "dot in a directory"
        );
        assert_eq!(
            w.wrap(v(&[".py"])),
            v(&[".py"]),
            "a dotfile has no extension"
        );
    }

    #[test]
    fn configuration_overrides_and_removes() {
        let overrides: BTreeMap<String, Vec<String>> = [
            (".PY".to_string(), v(&["/usr/bin/python3", "-I"])),
            ("rb".to_string(), v(&["ruby"])),
        ]
        .into();
        let i = Interpreters::for_platform(&overrides);
        assert_eq!(
            i.wrap(v(&["/opt/p/check_x.py", "-v"])),
            v(&["/usr/bin/python3", "-I", "/opt/p/check_x.py", "-v"])
        );
        assert_eq!(
            i.wrap(v(&["/opt/p/check.rb"])),
            v(&["ruby", "/opt/p/check.rb"])
        );
        if cfg!(unix) {
            assert_eq!(
                i.wrap(v(&["/opt/p/check.sh"])),
                v(&["/opt/p/check.sh"]),
                "shebang rules on Unix"
            );
        }
        let removed: BTreeMap<String, Vec<String>> = [("ps1".to_string(), vec![])].into();
        assert_eq!(
            Interpreters::for_platform(&removed).wrap(v(&["a.ps1"])),
            v(&["a.ps1"])
        );
    }
}

//! Running the Windows agent under Wine (Debian's wine64) for the end-to-end suite: a
//! throwaway prefix inside the test's directory, the cross-compiled artifacts from the dist
//! directory, paths translated to Wine's `Z:` drive, every wait with a deadline, and the
//! prefix's wineserver shut down when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{spawn_reading, Proc};

/// How long a fresh prefix may take to be made (the first start is slow: ~30 s).
pub const PREFIX_INIT: Duration = Duration::from_secs(240);

/// A file of `ci/dist`'s output: from `OUTPOST_DIST_DIR`, else `<workspace>/dist`.
pub fn dist_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("OUTPOST_DIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run ci/dist first (or point OUTPOST_DIST_DIR at its output)",
        path.display()
    );
    path
}

/// `/tmp/x/y` as Wine's `Z:\tmp\x\y` (Z: is the Unix root in a default prefix).
pub fn win_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// Run `cmd` to its end within `timeout`; returns (exit code, stdout, stderr).
/// Panics (naming `what`) when it runs longer.
pub fn run_with_deadline(
    mut cmd: Command,
    what: &str,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    (status.code(), read(&out), read(&err))
}

/// Rust's standard library (1.78 and later) takes its random numbers from `ProcessPrng`
/// in `bcryptprimitives.dll`, which every Windows since 10 has and Wine 8 (Debian 12)
/// lacks: without it no Rust program starts ("bcryptprimitives.dll not found"). The test
/// prefix gets a stand-in that exports `ProcessPrng` over `RtlGenRandom`
/// (`SystemFunction036`), built here with mingw-w64. Not shipped: the MSI and the agent do
/// not carry it; real Windows has the DLL.
const BCRYPTPRIMITIVES_C: &str = r#"#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID, ULONG);
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
"#;

fn build_bcryptprimitives(dir: &Path, system32: &Path) {
    let src = dir.join("bcryptprimitives.c");
    let def = dir.join("bcryptprimitives.def");
    std::fs::write(&src, BCRYPTPRIMITIVES_C).unwrap();
    std::fs::write(&def, "LIBRARY bcryptprimitives\nEXPORTS\n    ProcessPrng\n").unwrap();
    let mut cc = Command::new("x86_64-w64-mingw32-gcc");
    cc.args(["-shared", "-O2", "-o"])
        .arg(system32.join("bcryptprimitives.dll"))
        .arg(&src)
        .arg(&def)
        .arg("-ladvapi32");
    let (code, _, err) = run_with_deadline(
        cc,
        "x86_64-w64-mingw32-gcc (gcc-mingw-w64-x86-64)",
        Duration::from_secs(60),
    );
    assert_eq!(
        code,
        Some(0),
        "cannot build the bcryptprimitives.dll stand-in:\n{err}"
    );
}

/// A Wine prefix of its own; its wineserver (and every Windows process in it) is killed
/// when this is dropped.
pub struct Wine {
    pub prefix: PathBuf,
}

impl Wine {
    /// Make a fresh prefix under `dir` (slow: see [`PREFIX_INIT`]).
    pub fn new(dir: &Path) -> Wine {
        let wine = Wine {
            prefix: dir.join("wineprefix"),
        };
        let (code, _, err) = run_with_deadline(
            wine.command("wineboot", &["--init"]),
            "wineboot --init",
            PREFIX_INIT,
        );
        assert_eq!(code, Some(0), "wineboot --init failed:\n{err}");
        // Let the session that made the prefix end. Services created while the services.exe
        // that wineboot started is still up cannot be opened (Wine 8: CreateService
        // succeeds, OpenService says 1060 until a new session), which fails an MSI's
        // StartServices.
        let mut wait = Command::new("wineserver");
        wait.arg("-w").env("WINEPREFIX", &wine.prefix);
        run_with_deadline(wait, "wineserver -w", Duration::from_secs(60));
        // A program started while that server is going away can end at once with exit 0
        // and no output: wait until the new session really runs programs.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, out, err) = run_with_deadline(
                wine.command("cmd", &["/c", "echo", "outpost-wine-ready"]),
                "wine cmd /c echo",
                Duration::from_secs(60),
            );
            if out.contains("outpost-wine-ready") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Wine prefix does not run programs: {err}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let system32 = wine.drive_c().join("windows/system32");
        assert!(
            system32.is_dir(),
            "no C:\\windows\\system32 in the new prefix {}",
            wine.prefix.display()
        );
        if !system32.join("bcryptprimitives.dll").exists() {
            build_bcryptprimitives(dir, &system32);
        }
        wine
    }

    /// `C:` of the prefix, on the Unix side.
    pub fn drive_c(&self) -> PathBuf {
        self.prefix.join("drive_c")
    }

    /// `wine PROGRAM ARGS` in this prefix, quiet, without the Mono and Gecko installers.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new("wine");
        cmd.arg(program)
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            .env("WINEDLLOVERRIDES", "mscoree=;mshtml=")
            .env_remove("DISPLAY")
            .env_remove("OUTPOST_GATEWAY_URL")
            .env_remove("OUTPOST_ENROLL_KEY")
            .env_remove("OUTPOST_PIN_SHA256")
            .env_remove("OUTPOST_CA_FILE");
        cmd
    }

    /// Start `exe ARGS` under Wine with its stderr in `log`, and wait (20 s at most) for a
    /// stdout line starting with `first_line`; returns the process and that line.
    pub fn spawn(&self, exe: &Path, args: &[&str], log: &Path, first_line: &str) -> (Proc, String) {
        let mut cmd = self.command(exe, args);
        cmd.env("RUST_LOG", "info,outpost_agent=debug");
        let want = first_line.to_string();
        let (proc, lines) = spawn_reading(cmd, log, 1, move |l| l.starts_with(&want));
        (proc, lines[0].clone())
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let mut kill = Command::new("wineserver");
        kill.arg("-k").env("WINEPREFIX", &self.prefix);
        if let Ok(mut child) = kill
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! A check plugin the alerting tests turn CRITICAL and OK on cue: its exit code, and so
//! its status, is the number in a state file the test rewrites.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A plugin whose exit code (and so status) is the number in `DIR/state` (0 to begin
/// with); it prints `flip is N`. Returns its path.
pub fn flip_plugin(dir: &Path) -> String {
    let state = dir.join("state");
    std::fs::write(&state, "0\n").unwrap();
    let path = dir.join("check_flip");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ns=$(cat {state:?})\necho \"flip is $s\"\nexit $s\n",
            state = state.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// Make every run of the plugin in `dir` from now on exit with `code` (replaced whole, so
/// no run reads a half-written file).
pub fn set_state(dir: &Path, code: u8) {
    let tmp = dir.join("state.tmp");
    std::fs::write(&tmp, format!("{code}\n")).unwrap();
    std::fs::rename(&tmp, dir.join("state")).unwrap();
}

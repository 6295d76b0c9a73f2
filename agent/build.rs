//! Tell the agent which target it is built for (self-update picks its release by it),
//! and rebuild when the version override changes.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=OUTPOST_TARGET={target}");
    println!("cargo:rerun-if-env-changed=OUTPOST_VERSION");
    println!("cargo:rerun-if-changed=build.rs");
}

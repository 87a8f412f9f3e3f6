//! Build metadata for `switchyard --version` and `switchyard_build_info`: the git commit the
//! binary was built from (or `SWITCHYARD_GIT_COMMIT` when building outside a checkout, as a
//! container build from a source archive does) and the cargo profile.

use std::process::Command;

fn main() {
    let commit = std::env::var("SWITCHYARD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let commit = if dirty {
        format!("{commit}-modified")
    } else {
        commit
    };
    // The profile's directory name (`debug`, `release`, `dist`): OUT_DIR is
    // target/<profile>/build/<pkg>/out.
    let profile = std::env::var("OUT_DIR")
        .ok()
        .and_then(|o| {
            let p = std::path::PathBuf::from(o);
            p.ancestors()
                .nth(3)
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| std::env::var("PROFILE").unwrap_or_default());
    println!("cargo:rustc-env=SWITCHYARD_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=SWITCHYARD_BUILD_PROFILE={profile}");
    println!("cargo:rerun-if-env-changed=SWITCHYARD_GIT_COMMIT");
    if let Ok(out) = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/index");
            if let Ok(head) = std::fs::read_to_string(format!("{dir}/HEAD")) {
                if let Some(r) = head.strip_prefix("ref: ") {
                    println!("cargo:rerun-if-changed={dir}/{}", r.trim());
                }
            }
        }
    }
}

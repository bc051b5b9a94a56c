//! The guest image built by images/build.sh: where it is, and building it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors about the guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image where we looked.
    #[error("guest image not found (looked in {0}); run ./setup.sh or `enilab image build`")]
    Missing(String),
    /// The build script is not where the binary expects it.
    #[error("images/build.sh not found (looked in {0}); run from the enilab checkout")]
    NoBuildScript(String),
    /// The build failed.
    #[error("images/build.sh failed with {0}")]
    BuildFailed(String),
    #[error("cannot run images/build.sh")]
    Spawn(#[source] std::io::Error),
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub dir: PathBuf,
}

impl Image {
    pub fn in_dir(dir: &Path) -> Option<Image> {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.img");
        (kernel.is_file() && initrd.is_file()).then(|| Image {
            kernel,
            initrd,
            dir: dir.to_path_buf(),
        })
    }

    /// Find images/out: $ENILAB_IMAGE_DIR, else next to the checkout the
    /// binary was built in, else under the current directory.
    pub fn locate() -> Result<Image, ImageError> {
        let dirs = candidate_dirs();
        for d in &dirs {
            if let Some(i) = Image::in_dir(d) {
                return Ok(i);
            }
        }
        Err(ImageError::Missing(join(&dirs)))
    }

    /// Run images/build.sh (cached: quick when nothing changed).
    pub fn build(force: bool) -> Result<Image, ImageError> {
        let roots = checkout_roots();
        let script = roots
            .iter()
            .map(|r| r.join("images/build.sh"))
            .find(|p| p.is_file())
            .ok_or_else(|| ImageError::NoBuildScript(join(&roots)))?;
        let mut cmd = Command::new("bash");
        cmd.arg(&script);
        if force {
            cmd.arg("--force");
        }
        let status = cmd.status().map_err(ImageError::Spawn)?;
        if !status.success() {
            return Err(ImageError::BuildFailed(status.to_string()));
        }
        let out = script
            .parent()
            .map(|p| p.join("out"))
            .unwrap_or_else(|| PathBuf::from("images/out"));
        Image::in_dir(&out).ok_or_else(|| ImageError::Missing(out.display().to_string()))
    }
}

fn join(v: &[PathBuf]) -> String {
    v.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checkout roots to look in: the current directory and the one the binary
/// sits in (target/release/enilab -> ../..).
fn checkout_roots() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        v.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1).take(4) {
            if anc.join("images").is_dir() {
                v.push(anc.to_path_buf());
                break;
            }
        }
    }
    // Tests run with the crate directory as cwd.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if let Some(root) = manifest.parent() {
        v.push(root.to_path_buf());
    }
    v.dedup();
    v
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("ENILAB_IMAGE_DIR") {
        v.push(PathBuf::from(d));
    }
    v.extend(checkout_roots().into_iter().map(|r| r.join("images/out")));
    v
}

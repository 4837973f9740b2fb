//! The worker's side of `chroot=input-root` (the action init does the
//! rest, see `action_init::chroot`): the mount points the init needs in the
//! input root, made before the run and removed after it, so that outputs
//! (the whole root, with `output_paths: "."`) hold only what the input root
//! and the action made.

use std::io;
use std::path::{Path, PathBuf};

use super::RunFailure;

/// The mount points this worker made in an input root; removed when it is
/// dropped (each only if still empty: the sandbox's mounts never wrote to
/// them on the host's side).
#[derive(Debug)]
pub(super) struct MountPoints {
    made: Vec<PathBuf>,
    /// The input root's `tmp` is absent or an empty directory (a mount
    /// point, as BuildStream stages it): the sandbox mounts a fresh tmpfs
    /// there.
    pub tmp: bool,
}

impl MountPoints {
    /// Makes `dev`, `proc` and `tmp` in `root` where they are absent. An
    /// input root's own `tmp` with something in it (or that is not a
    /// directory) stays as it is: the action writes into it, as into the rest
    /// of its root. Its own `dev` or `proc` must be a directory (a symlink
    /// would send the mount elsewhere): FAILED_PRECONDITION otherwise.
    pub fn make(root: &Path) -> io::Result<MountPoints> {
        let mut points = MountPoints { made: Vec::new(), tmp: false };
        for name in ["dev", "proc", "tmp"] {
            let path = root.join(name);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if name == "tmp" => points.tmp = m.is_dir() && std::fs::read_dir(&path)?.next().is_none(),
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(RunFailure {
                        code: tonic::Code::FailedPrecondition,
                        message: format!(
                            "the input root's /{name} is not a directory: with chroot=input-root the sandbox \
                             mounts its own /{name} there"
                        ),
                    }
                    .into_io());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&path)?;
                    points.made.push(path);
                    points.tmp |= name == "tmp";
                }
                Err(e) => return Err(e),
            }
        }
        Ok(points)
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for path in &self.made {
            if let Err(e) = std::fs::remove_dir(path) {
                tracing::debug!(path = %path.display(), error = %e, "removing a chroot mount point");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_made_where_absent_and_removed_after() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("proc")).unwrap();
        std::fs::write(r.join("proc/keep"), "").unwrap();
        let points = MountPoints::make(r).unwrap();
        assert!(points.tmp);
        assert!(r.join("dev").is_dir() && r.join("tmp").is_dir());
        drop(points);
        let mut left: Vec<String> =
            std::fs::read_dir(r).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["proc"], "only the input root's own directory stays");
        assert!(r.join("proc/keep").exists());

        // The input root's empty tmp (a mount point) gets a fresh tmpfs; one
        // with something in it, or a link, is the root's own.
        std::fs::create_dir(r.join("tmp")).unwrap();
        assert!(MountPoints::make(r).unwrap().tmp);
        assert!(r.join("tmp").is_dir(), "the input root's own is kept");
        std::fs::write(r.join("tmp/file"), "").unwrap();
        assert!(!MountPoints::make(r).unwrap().tmp);
        std::fs::remove_file(r.join("tmp/file")).unwrap();
        std::fs::remove_dir(r.join("tmp")).unwrap();
        std::os::unix::fs::symlink("/var/tmp", r.join("tmp")).unwrap();
        let points = MountPoints::make(r).unwrap();
        assert!(!points.tmp);
        drop(points);
        assert!(r.join("tmp").symlink_metadata().unwrap().is_symlink());

        // A dev that is a link would move the sandbox's mount elsewhere.
        std::os::unix::fs::symlink("/etc", r.join("dev")).unwrap();
        let e = MountPoints::make(r).unwrap_err();
        let failure = RunFailure::of(&e).expect("a RunFailure");
        assert_eq!(failure.code, tonic::Code::FailedPrecondition);
        assert!(failure.message.contains("/dev is not a directory"), "{}", failure.message);
    }
}

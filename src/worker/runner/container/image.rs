//! Image references (`container-image` values) and the images a worker
//! keeps: pulled on first use, a small LRU of what this worker pulled.

use std::fmt;

/// The platform property naming an action's image, as Bazel's
/// `exec_properties` and other farms write it.
pub const PROPERTY: &str = "container-image";

/// A parsed `container-image` value: `docker://NAME[:TAG][@sha256:HEX]`
/// (the scheme may be left out). Without a tag or digest it is `:latest`,
/// as the Docker CLI reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef(String);

impl ImageRef {
    /// Parses a property value; the error says what is wrong with it.
    pub fn parse(value: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("platform property {PROPERTY}={value:?}: {why}");
        let name = match value.split_once("://") {
            Some(("docker", rest)) => rest,
            Some((scheme, _)) => return Err(bad(&format!("{scheme}:// images are not supported; use docker://"))),
            None => value,
        };
        if name.is_empty() {
            return Err(bad("no image name"));
        }
        if name.len() > 512 {
            return Err(bad("longer than 512 bytes"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
        if let Some(c) = name.chars().find(|&c| !allowed(c)) {
            return Err(bad(&format!("{c:?} cannot be part of an image reference")));
        }
        let (repository, digest) = match name.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (name, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| bad("a digest is sha256:<64 hex digits>"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Err(bad("a digest is sha256:<64 lowercase hex digits>"));
            }
        }
        // A tag is what follows the last ':' after the last '/' (a ':'
        // before a '/' is a registry's port).
        let last = repository.rsplit('/').next().unwrap_or(repository);
        let (path, tag) = match last.split_once(':') {
            Some((_, tag)) => (&repository[..repository.len() - tag.len() - 1], Some(tag)),
            None => (repository, None),
        };
        if path.is_empty() || path.starts_with('/') || path.ends_with('/') || path.contains("//") {
            return Err(bad("not a repository name"));
        }
        if let Some(t) = tag
            && (t.is_empty() || t.len() > 128 || t.starts_with(['.', '-']) || t.contains(['/', ':']))
        {
            return Err(bad("not a tag"));
        }
        // Repository path components are lowercase (the registry part,
        // before the first '/', may be a host with a port).
        let components: Vec<&str> = path.split('/').collect();
        let host_like = components.len() > 1 && components[0].contains(['.', ':']) || components[0] == "localhost";
        let checked = if host_like { &components[1..] } else { &components[..] };
        if checked.iter().any(|c| c.is_empty() || c.chars().any(|ch| ch.is_ascii_uppercase() || ch == ':')) {
            return Err(bad("repository names are lowercase"));
        }
        Ok(match (tag, digest) {
            (None, None) => ImageRef(format!("{path}:latest")),
            _ => ImageRef(name.to_string()),
        })
    }

    /// The reference the engine is given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The images a worker has used, most recent first, and whether it pulled
/// each one itself: past `capacity`, the least recently used image it
/// pulled is removed from the engine (one it found there is never removed).
pub struct Images {
    used: lru::LruCache<ImageRef, bool>,
}

impl Images {
    pub fn new(capacity: usize) -> Self {
        let capacity = std::num::NonZeroUsize::new(capacity.max(1)).expect("at least 1");
        Images { used: lru::LruCache::new(capacity) }
    }

    /// Whether `image` is known to be in the engine (and marks it used).
    pub fn known(&mut self, image: &ImageRef) -> bool {
        self.used.get(image).is_some()
    }

    /// Records that `image` is in the engine (`pulled`: by this worker);
    /// returns an image this worker pulled that should now be removed.
    pub fn add(&mut self, image: ImageRef, pulled: bool) -> Option<ImageRef> {
        match self.used.push(image.clone(), pulled) {
            Some((old, true)) if old != image => Some(old),
            _ => None,
        }
    }

    /// Forgets `image` (the engine no longer has it).
    pub fn forget(&mut self, image: &ImageRef) {
        self.used.pop(image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_the_docker_cli_reads_them() {
        let ok = [
            ("docker://busybox", "busybox:latest"),
            ("busybox", "busybox:latest"),
            ("docker://busybox:1.36", "busybox:1.36"),
            ("docker://localhost:5000/team/tools", "localhost:5000/team/tools:latest"),
            ("docker://127.0.0.1:5000/tools:v2", "127.0.0.1:5000/tools:v2"),
        ];
        for (value, want) in ok {
            assert_eq!(ImageRef::parse(value).unwrap().as_str(), want, "{value}");
        }
        let digest = format!("docker://gcr.io/p/rbe@sha256:{}", "a".repeat(64));
        assert_eq!(ImageRef::parse(&digest).unwrap().as_str(), &digest["docker://".len()..]);
        let tagged = format!("docker://gcr.io/p/rbe:1@sha256:{}", "b".repeat(64));
        assert!(ImageRef::parse(&tagged).is_ok());
        for bad in [
            "",
            "docker://",
            "podman://busybox",
            "docker://Busybox",
            "docker://busy box",
            "docker://busybox:",
            "docker://busybox@sha256:abc",
            "docker:///busybox",
            "docker://a//b",
            "docker://busybox\n",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(e.contains(PROPERTY), "{bad:?}: {e}");
        }
    }

    #[test]
    fn only_pulled_images_are_evicted() {
        let r = |s: &str| ImageRef::parse(s).unwrap();
        let mut images = Images::new(2);
        assert_eq!(images.add(r("a"), false), None);
        assert_eq!(images.add(r("b"), true), None);
        assert!(images.known(&r("a")));
        // b is now the least recently used, and this worker pulled it.
        assert_eq!(images.add(r("c"), true), Some(r("b")));
        assert!(images.known(&r("c")));
        // a was found in the engine: evicted from the list, never removed.
        assert_eq!(images.add(r("d"), true), None);
        assert!(!images.known(&r("a")));
        images.forget(&r("d"));
        assert!(!images.known(&r("d")));
    }
}

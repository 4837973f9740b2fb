//! Platform properties and how workers are matched to actions.
//!
//! A requirement is met when the worker offers the same name and value, or,
//! for numeric capacity properties (such as `cpu-count`), a value at least as
//! large, or the value `*` ([`ANY_VALUE`]). A name may repeat: every value
//! is required (they are AND-ed).

use std::fmt;

use remote_apis::reapi;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Platform(Vec<(String, String)>);

impl Platform {
    pub fn new(mut pairs: Vec<(String, String)>) -> Self {
        pairs.sort();
        pairs.dedup();
        Platform(pairs)
    }

    pub fn from_proto(p: Option<&reapi::Platform>) -> Self {
        let pairs = p.map(|p| p.properties.iter().map(|x| (x.name.clone(), x.value.clone())).collect());
        Platform::new(pairs.unwrap_or_default())
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first requirement `offer` does not meet, if any. Sandbox
    /// settings ([`SANDBOX_SETTINGS`]) are not requirements, except
    /// `network=on`: only a worker that allows actions the network offers
    /// it, so such an action never runs without it.
    pub fn unmet_by<'a>(&'a self, offer: &Platform, numeric: &[String]) -> Option<&'a (String, String)> {
        self.0
            .iter()
            .filter(|(name, value)| !is_sandbox_setting(name) || (name == NETWORK && value == "on"))
            .find(|(name, value)| !offers(offer, name, value, numeric))
    }

    /// The value of the property `name` (the first, should it repeat).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// This platform plus each of `defaults` whose name it lacks (an
    /// instance's `[instances] platform`); `None` when nothing is added.
    pub fn with_defaults(&self, defaults: &[(String, String)]) -> Option<Platform> {
        let missing: Vec<(String, String)> =
            defaults.iter().filter(|(name, _)| self.get(name).is_none()).cloned().collect();
        if missing.is_empty() {
            return None;
        }
        Some(Platform::new(self.0.iter().cloned().chain(missing).collect()))
    }

    /// The REAPI form (sorted by name, then value, as the spec asks).
    pub fn to_proto(&self) -> reapi::Platform {
        reapi::Platform {
            properties: self
                .0
                .iter()
                .map(|(name, value)| reapi::platform::Property { name: name.clone(), value: value.clone() })
                .collect(),
        }
    }
}

/// Properties that configure the action's sandbox on whichever worker runs
/// it (each worker applies them within its own maxima) rather than select
/// a worker: workers do not advertise them and matching skips them. Extend
/// this list for every new sandbox setting.
pub const SANDBOX_SETTINGS: &[&str] =
    &["output_bytes_limit", "output_files_limit", NETWORK, MEMORY_LIMIT, PROCESS_LIMIT];

/// `network=on`: the host's network instead of loopback only, on workers
/// that allow it (they offer `network=on`); `off` is the default.
pub const NETWORK: &str = "network";
/// Memory per process of the action (RLIMIT_DATA), a size such as `2GiB`.
pub const MEMORY_LIMIT: &str = "memory_limit";
/// Processes the action may have at once (RLIMIT_NPROC).
pub const PROCESS_LIMIT: &str = "process_limit";

/// `chroot=input-root`: the action runs with its input root as `/`. A
/// matching key (not a sandbox setting): only workers with `[worker]
/// input_root_as_root` offer it, so such an action never runs on the host's
/// filesystem. Any other value is refused at Execute.
pub const CHROOT: &str = "chroot";
/// The one value of [`CHROOT`].
pub const CHROOT_INPUT_ROOT: &str = "input-root";

/// Whether `name` is a sandbox setting, not a matching key.
pub fn is_sandbox_setting(name: &str) -> bool {
    SANDBOX_SETTINGS.contains(&name)
}

/// An offered value that meets any requirement of its name (the container
/// runner offers `container-image=*`: it runs any image).
pub const ANY_VALUE: &str = "*";

fn offers(offer: &Platform, name: &str, value: &str, numeric: &[String]) -> bool {
    let offered = offer.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
    if offered.clone().any(|v| v == ANY_VALUE) {
        return true;
    }
    if numeric.iter().any(|n| n == name)
        && let Ok(want) = value.parse::<u64>()
    {
        return offered.filter_map(|v| v.parse::<u64>().ok()).any(|have| have >= want);
    }
    offered.into_iter().any(|v| v == value)
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `KEY=VALUE` (command-line properties).
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// What a worker on this machine offers by default: the OS, the CPU
/// architecture (names from the REAPI platform lexicon) and its CPU count.
use remote_apis::wrapper_state::LINKER_PROPERTY;

pub fn host_properties() -> Vec<(String, String)> {
    let isa = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "aarch64",
        other => other,
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut props = vec![
        ("OSFamily".into(), std::env::consts::OS.into()),
        ("ISA".into(), isa.into()),
        ("cpu-count".into(), cpus.to_string()),
    ];
    if has_c_linker() {
        props.push((LINKER_PROPERTY.0.into(), LINKER_PROPERTY.1.into()));
    }
    props
}

/// Whether actions can link: `cc` on the PATH the rustc wrapper gives its
/// actions. Link steps (binaries, proc-macros, tests) ask for
/// [`LINKER_PROPERTY`].
fn has_c_linker() -> bool {
    use std::os::unix::fs::PermissionsExt;
    ["/usr/local/bin/cc", "/usr/bin/cc", "/bin/cc"]
        .iter()
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Platform {
        Platform::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn matching() {
        let numeric = vec!["cpu-count".to_string()];
        let worker = p(&[("OSFamily", "linux"), ("cpu-count", "8"), ("pool", "a"), ("pool", "b")]);
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (&[], None),
            (&[("OSFamily", "linux")], None),
            (&[("OSFamily", "windows")], Some("OSFamily")),
            (&[("cpu-count", "4")], None),
            (&[("cpu-count", "8")], None),
            (&[("cpu-count", "16")], Some("cpu-count")),
            (&[("pool", "a"), ("pool", "b")], None),
            (&[("pool", "a"), ("pool", "c")], Some("pool")),
            (&[("gpu", "1")], Some("gpu")),
        ];
        for (want, unmet) in cases {
            let want_p = p(want);
            let got = want_p.unmet_by(&worker, &numeric).map(|(k, _)| k.as_str());
            assert_eq!(got, *unmet, "{want:?}");
        }
        // Not numeric: compared as strings.
        assert!(p(&[("cpu-count", "4")]).unmet_by(&worker, &[]).is_some());
        // Sandbox settings never keep an action from a worker, but for
        // network=on, which only a worker allowing it offers.
        assert_eq!(p(&[("network", "on")]).unmet_by(&worker, &numeric).map(|(k, _)| k.as_str()), Some("network"));
        let open = p(&[("OSFamily", "linux"), ("network", "on")]);
        assert_eq!(p(&[("network", "on")]).unmet_by(&open, &numeric), None);
        assert_eq!(p(&[("network", "off")]).unmet_by(&worker, &numeric), None);
        // `*` offers any value of its name, and nothing of another name.
        let containers = p(&[("OSFamily", "linux"), ("container-image", "*")]);
        let image = p(&[("container-image", "docker://busybox:1.36")]);
        assert_eq!(image.unmet_by(&containers, &numeric), None);
        assert_eq!(image.unmet_by(&worker, &numeric).map(|(k, _)| k.as_str()), Some("container-image"));
        assert!(p(&[("pool", "x")]).unmet_by(&containers, &numeric).is_some());
        // chroot is a matching key: only a worker offering it runs the action.
        let chroot = p(&[(CHROOT, CHROOT_INPUT_ROOT)]);
        assert_eq!(chroot.unmet_by(&worker, &numeric).map(|(k, _)| k.as_str()), Some(CHROOT));
        let chrooting = p(&[("OSFamily", "linux"), (CHROOT, CHROOT_INPUT_ROOT)]);
        assert_eq!(chroot.unmet_by(&chrooting, &numeric), None);
        for setting in SANDBOX_SETTINGS {
            assert_eq!(p(&[(setting, "1"), ("OSFamily", "linux")]).unmet_by(&worker, &numeric), None, "{setting}");
        }
    }

    #[test]
    fn properties_parse() {
        assert_eq!(parse_property("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_property("=x").is_err());
        assert!(parse_property("novalue").is_err());
    }
}

//! `[instances."NAME"]`: settings per instance name, for clients that cannot
//! say everything in their requests. Buck2 never sends `digest_function`, so
//! the server must know that its instance hashes with BLAKE3; BuildStream
//! cannot send custom platform properties; a read-only cache for developers
//! refuses their ActionCache writes while executions still fill it.
//!
//! Keys: `"NAME"` is that instance exactly (`""` is the empty name most
//! clients use), `"NAME/*"` is NAME and every instance under it, `"*"` is
//! every instance. The most specific key wins whole (exact, then the longest
//! prefix, then `"*"`); sections are not merged. An instance no key covers
//! gets [`InstanceSettings::default`]. The request context
//! ([`crate::auth::RequestContext`]) carries the resolved settings, so every
//! service reads them from there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, bail};
use remote_apis::{DigestFunction, InstanceName};
use serde::Deserialize;

/// One `[instances."NAME"]` section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceSection {
    /// The function a request that leaves `digest_function` unset uses
    /// (also ByteStream names without a function segment): "sha256" or
    /// "blake3". Default "sha256".
    pub digest_function: Option<String>,
    /// false: UpdateActionResult is PERMISSION_DENIED (the cache is
    /// read-only for clients); results of executions are still cached.
    pub ac_write: Option<bool>,
    /// Platform properties added to this instance's actions that lack the
    /// name, e.g. `{ chroot = "input-root" }` for BuildStream.
    pub platform: BTreeMap<String, String>,
    /// Overrides `[asset] fetch` for this instance.
    pub asset_fetch: Option<bool>,
}

/// What the server does for one instance, resolved from its section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSettings {
    /// Used when a request leaves the digest function unset; explicit
    /// functions still win.
    pub digest_function: DigestFunction,
    /// Whether clients may write the ActionCache (with the `ac-write` grant).
    pub ac_write: bool,
    /// Properties added to an action's platform when it lacks the name,
    /// sorted by name.
    pub platform: Vec<(String, String)>,
    /// Whether FetchBlob may download here; `None`: `[asset] fetch` decides.
    pub asset_fetch: Option<bool>,
}

impl Default for InstanceSettings {
    fn default() -> Self {
        InstanceSettings {
            digest_function: DigestFunction::Sha256,
            ac_write: true,
            platform: Vec::new(),
            asset_fetch: None,
        }
    }
}

impl InstanceSettings {
    fn resolve(key: &str, section: &InstanceSection) -> anyhow::Result<Self> {
        let digest_function = match section.digest_function.as_deref() {
            None => DigestFunction::Sha256,
            Some(name) => DigestFunction::from_name(&name.to_ascii_lowercase()).with_context(|| {
                format!("[instances.{key:?}] digest_function {name:?} is not supported (supported: sha256, blake3)")
            })?,
        };
        if let Some(name) = section.platform.keys().find(|n| n.is_empty()) {
            bail!("[instances.{key:?}] platform has a property with an empty name ({name:?})");
        }
        Ok(InstanceSettings {
            digest_function,
            ac_write: section.ac_write.unwrap_or(true),
            platform: section.platform.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
            asset_fetch: section.asset_fetch,
        })
    }
}

/// Every instance's settings: looked up by name, the most specific key
/// winning. Cheap to share (`Arc`) and to query (a hash lookup, then the
/// prefixes from the longest).
#[derive(Debug, Clone, Default)]
pub struct Instances {
    exact: HashMap<String, Arc<InstanceSettings>>,
    /// `(prefix, settings)` from `"prefix/*"`, longest prefix first.
    prefixes: Vec<(String, Arc<InstanceSettings>)>,
    /// `"*"`, else the defaults.
    fallback: Arc<InstanceSettings>,
}

impl Instances {
    /// Validates the `[instances]` table.
    pub fn resolve(sections: &BTreeMap<String, InstanceSection>) -> anyhow::Result<Instances> {
        let mut instances = Instances::default();
        for (key, section) in sections {
            let settings = Arc::new(InstanceSettings::resolve(key, section)?);
            if key == "*" {
                instances.fallback = settings;
            } else if let Some(prefix) = key.strip_suffix("/*") {
                check_name(key, prefix)?;
                if prefix.is_empty() {
                    bail!("[instances.{key:?}] has an empty prefix; use \"*\" for every instance");
                }
                instances.prefixes.push((prefix.to_string(), settings));
            } else {
                check_name(key, key)?;
                instances.exact.insert(key.clone(), settings);
            }
        }
        instances.prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(instances)
    }

    /// The settings of `instance`: its exact key, else the longest
    /// `"prefix/*"` covering it, else `"*"`, else the defaults.
    pub fn get(&self, instance: &InstanceName) -> &Arc<InstanceSettings> {
        let name = instance.as_str();
        if let Some(s) = self.exact.get(name) {
            return s;
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| crate::auth::under_prefix(name, prefix))
            .map(|(_, s)| s)
            .unwrap_or(&self.fallback)
    }
}

/// A key names an instance the server could be asked about: a `*` anywhere
/// but at the end, or a name REAPI would refuse, is a mistake to report.
fn check_name(key: &str, name: &str) -> anyhow::Result<()> {
    if name.contains('*') {
        bail!("[instances.{key:?}]: \"*\" may only stand alone or end the key as \"/*\"");
    }
    InstanceName::new(name).map_err(|e| anyhow::anyhow!("[instances.{key:?}]: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(text: &str) -> anyhow::Result<Instances> {
        #[derive(Deserialize)]
        struct File {
            instances: BTreeMap<String, InstanceSection>,
        }
        let file: File = toml::from_str(text)?;
        Instances::resolve(&file.instances)
    }

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).unwrap()
    }

    #[test]
    fn the_most_specific_key_wins_whole() {
        let i = instances(
            r#"
            [instances."*"]
            ac_write = false
            [instances."buck2/*"]
            digest_function = "blake3"
            [instances."buck2/ci/*"]
            digest_function = "BLAKE3"
            ac_write = true
            [instances."buck2/ci/special"]
            platform = { chroot = "input-root" }
            [instances.""]
            digest_function = "sha256"
            "#,
        )
        .unwrap();
        use DigestFunction::*;
        let cases = [
            // (instance, function, ac_write, platform)
            ("", Sha256, true, 0),
            ("other", Sha256, false, 0),
            ("buck2", Blake3, true, 0),
            ("buck2/dev", Blake3, true, 0),
            ("buck2x", Sha256, false, 0),
            ("buck2/ci", Blake3, true, 0),
            ("buck2/ci/x/y", Blake3, true, 0),
            // Exact beats every prefix, and is not merged with them.
            ("buck2/ci/special", Sha256, true, 1),
        ];
        for (instance, function, ac_write, platform) in cases {
            let s = i.get(&name(instance));
            assert_eq!(s.digest_function, function, "{instance:?}");
            assert_eq!(s.ac_write, ac_write, "{instance:?}");
            assert_eq!(s.platform.len(), platform, "{instance:?}");
        }
        // "buck2/*" covers "buck2" itself (prefix semantics of the grants).
        assert_eq!(i.get(&name("buck2")).digest_function, Blake3);
    }

    #[test]
    fn nothing_configured_is_the_defaults() {
        let i = Instances::default();
        assert_eq!(**i.get(&name("anything")), InstanceSettings::default());
        assert!(i.get(&name("")).ac_write);
    }

    #[test]
    fn bad_sections_are_refused_naming_the_key() {
        let cases = [
            (
                r#"[instances."x"]
                digest_function = "md5""#,
                "md5",
            ),
            (
                r#"[instances."a*"]
                ac_write = false"#,
                "\"*\" may only",
            ),
            (
                r#"[instances."a/*/b"]
                ac_write = false"#,
                "\"*\" may only",
            ),
            (
                r#"[instances."/*"]
                ac_write = false"#,
                "\"/*\"",
            ),
            (
                r#"[instances."a//b"]
                ac_write = false"#,
                "empty path segment",
            ),
            (
                r#"[instances."x/blobs"]
                ac_write = false"#,
                "reserved",
            ),
            (
                r#"[instances."x"]
                colour = "red""#,
                "colour",
            ),
            (
                r#"[instances."x"]
                platform = { "" = "v" }"#,
                "empty name",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", instances(text).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}

//! Registry credentials for pulls, from a Docker CLI config file
//! (`config.json`), so a worker pulls private images with what `docker
//! login` or a credential helper already set up on its machine:
//! - `auths`: `auth` (base64 of `user:password`), `username`/`password`, or
//!   an `identitytoken`, per registry;
//! - `credHelpers` (per registry) and `credsStore` (any registry): the
//!   helper program `docker-credential-NAME get`, the protocol every
//!   Docker credential helper speaks (registry on stdin, JSON on stdout).
//!
//! The file is read at every pull, so rotated credentials apply without a
//! restart. Secrets are never logged nor put in an error message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use serde::Deserialize;

use super::image::ImageRef;

/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Docker Hub's key in `auths` (the CLI's historical form).
const DOCKER_HUB: &str = "https://index.docker.io/v1/";

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Where credentials come from: `[worker] docker_config`, else
/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
#[derive(Debug, Clone)]
pub struct Credentials {
    path: Option<PathBuf>,
}

impl Credentials {
    pub fn new(configured: Option<PathBuf>) -> Self {
        let path = configured.or_else(|| {
            let dir = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
            Some(dir.join("config.json"))
        });
        Credentials { path }
    }

    /// The file credentials are read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The credentials to pull `image` with: None for anonymous pulls (no
    /// file, or nothing in it for the image's registry). An error names the
    /// file or the helper and what is wrong, never a secret.
    pub async fn for_image(&self, image: &ImageRef) -> Result<Option<DockerCredentials>, String> {
        let Some(path) = &self.path else { return Ok(None) };
        let text = match tokio::fs::read_to_string(path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading registry credentials from {}: {e}", path.display())),
        };
        let config: ConfigFile = serde_json::from_str(&text)
            .map_err(|e| format!("registry credentials in {}: not a Docker config file ({e})", path.display()))?;
        let registry = registry_of(image);
        if let Some(helper) = config.cred_helpers.get(&registry).or(config.creds_store.as_ref()) {
            return run_helper(helper, &registry).await;
        }
        let entry = config.auths.iter().find(|(key, _)| normalize(key) == registry).map(|(_, e)| e);
        let Some(entry) = entry else { return Ok(None) };
        let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
        if let Some(encoded) = &entry.auth {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())));
            let Some((u, p)) = decoded else {
                return Err(format!(
                    "registry credentials in {} for {registry}: \"auth\" is not base64 of user:password",
                    path.display()
                ));
            };
            (username, password) = (Some(u), Some(p));
        }
        Ok(Some(DockerCredentials {
            username,
            password,
            identitytoken: entry.identitytoken.clone(),
            registrytoken: entry.registrytoken.clone(),
            serveraddress: Some(registry),
            ..Default::default()
        }))
    }
}

/// The registry of an image reference as config files key it: its first
/// component when that is a host (has a '.' or ':', or is `localhost`),
/// else Docker Hub.
pub fn registry_of(image: &ImageRef) -> String {
    let name = image.as_str();
    match name.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first.to_string(),
        _ => "docker.io".to_string(),
    }
}

/// An `auths` key as a registry: without scheme and path; Docker Hub's
/// spellings as `docker.io`.
fn normalize(key: &str) -> String {
    let host = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        h => h.to_string(),
    }
}

async fn run_helper(helper: &str, registry: &str) -> Result<Option<DockerCredentials>, String> {
    use tokio::io::AsyncWriteExt;
    if helper.is_empty() || !helper.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("credential helper {helper:?}: not a helper name"));
    }
    let program = format!("docker-credential-{helper}");
    // Docker Hub's helpers store it under the CLI's historical key.
    let server = if registry == "docker.io" { DOCKER_HUB } else { registry };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running the credential helper {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes()).await;
    }
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("the credential helper {program} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|e| format!("running the credential helper {program}: {e}"))?;
    if !out.status.success() {
        // "credentials not found in native keychain": pull anonymously.
        return Ok(None);
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|_| format!("the credential helper {program} gave an answer that is not its JSON"))?;
    Ok(Some(if answer.username == "<token>" {
        DockerCredentials {
            identitytoken: Some(answer.secret),
            serveraddress: Some(server.into()),
            ..Default::default()
        }
    } else {
        DockerCredentials {
            username: Some(answer.username),
            password: Some(answer.secret),
            serveraddress: Some(server.into()),
            ..Default::default()
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn registries_are_named_as_config_files_key_them() {
        assert_eq!(registry_of(&image("busybox")), "docker.io");
        assert_eq!(registry_of(&image("team/tools:1")), "docker.io");
        assert_eq!(registry_of(&image("gcr.io/p/rbe")), "gcr.io");
        assert_eq!(registry_of(&image("127.0.0.1:5000/x")), "127.0.0.1:5000");
        assert_eq!(registry_of(&image("localhost/x")), "localhost");
        assert_eq!(normalize(DOCKER_HUB), "docker.io");
        assert_eq!(normalize("https://gcr.io"), "gcr.io");
        assert_eq!(normalize("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[tokio::test]
    async fn auths_entries_give_credentials() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret:with-colon");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "gcr.io": {{"identitytoken": "tok"}}, "bad.example": {{"auth": "%%%"}}}}}}"#
            ),
        )
        .unwrap();
        let c = Credentials::new(Some(path.clone()));
        let hub = c.for_image(&image("docker://team/tools")).await.unwrap().unwrap();
        assert_eq!((hub.username.as_deref(), hub.password.as_deref()), (Some("ci"), Some("s3cret:with-colon")));
        let gcr = c.for_image(&image("gcr.io/p/x")).await.unwrap().unwrap();
        assert_eq!(gcr.identitytoken.as_deref(), Some("tok"));
        assert!(c.for_image(&image("quay.io/p/x")).await.unwrap().is_none());
        let e = c.for_image(&image("bad.example/x")).await.unwrap_err();
        assert!(e.contains("bad.example") && !e.contains("%%%"), "{e}");
        // No file: anonymous.
        let none = Credentials::new(Some(dir.path().join("absent.json")));
        assert!(none.for_image(&image("busybox")).await.unwrap().is_none());
        std::fs::write(&path, "not json").unwrap();
        assert!(c.for_image(&image("busybox")).await.unwrap_err().contains("not a Docker config file"));
    }
}

//! `[asset]`: the Remote Asset API's downloads (see `crate::asset`).

use std::time::Duration;

use anyhow::bail;
use bytesize::ByteSize;
use serde::Deserialize;

/// `[asset]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssetSection {
    /// FetchBlob may download URIs it has no record of (http and https
    /// only), for callers holding `asset-fetch`. false: Fetch answers from
    /// records and the CAS alone.
    pub fetch: bool,
    /// Let downloads reach loopback, link-local, private, unique-local,
    /// unspecified and multicast addresses (default false: the server would
    /// otherwise fetch from its own network for whoever asks).
    pub allow_private: bool,
    /// Largest download; past it the download stops and nothing is stored.
    pub max_size: ByteSize,
    /// Longest a download may take (a request's own `timeout` may shorten it).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Redirects followed per URI.
    pub max_redirects: usize,
}

impl Default for AssetSection {
    fn default() -> Self {
        AssetSection {
            fetch: true,
            allow_private: false,
            max_size: ByteSize::gib(1),
            timeout: Duration::from_secs(300),
            max_redirects: 5,
        }
    }
}

/// `[asset]`, validated.
#[derive(Debug, Clone)]
pub struct AssetConfig {
    pub fetch: bool,
    pub allow_private: bool,
    pub max_size: u64,
    pub timeout: Duration,
    pub max_redirects: usize,
}

impl Default for AssetConfig {
    fn default() -> Self {
        AssetSection::default().resolve().expect("the defaults are valid")
    }
}

impl AssetSection {
    pub(super) fn resolve(&self) -> anyhow::Result<AssetConfig> {
        if self.max_size.as_u64() == 0 {
            bail!("[asset] max_size must be larger than zero");
        }
        if self.timeout.is_zero() {
            bail!("[asset] timeout must be above zero");
        }
        if self.max_redirects > 20 {
            bail!("[asset] max_redirects must be at most 20");
        }
        Ok(AssetConfig {
            fetch: self.fetch,
            allow_private: self.allow_private,
            max_size: self.max_size.as_u64(),
            timeout: self.timeout,
            max_redirects: self.max_redirects,
        })
    }
}

//! The SSRF guard: the server downloads for whoever holds `asset-fetch`, so
//! by default it refuses to reach its own host and network. Every address a
//! download connects to passes [`check`]: names through [`GuardedResolver`]
//! (reqwest's DNS hook, so the address checked is the address connected
//! to, on every redirect hop), IP literals (which skip DNS) where the URL is
//! parsed and in the redirect policy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why an address was refused; found again in reqwest's error chain to
/// report PERMISSION_DENIED.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// What kind of non-public address `ip` is, or `None` for a public one.
pub fn private_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => {
            // IPv4 carried in IPv6 (mapped, compatible, NAT64) is the IPv4
            // address as far as reachability goes.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_kind(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return v4_kind(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
            }
            v6_kind(v6)
        }
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() || o[0] == 0 => "unspecified",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() || o[0] >= 240 => "reserved",
        // Carrier-grade NAT (RFC 6598): someone's private network.
        [100, b, ..] if (64..128).contains(&b) => "shared (CGNAT)",
        _ => return None,
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match first {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if (first & 0xfe00) == 0xfc00 => "unique-local",
        _ if (first & 0xffc0) == 0xfe80 => "link-local",
        // Deprecated site-local: private in practice.
        _ if (first & 0xffc0) == 0xfec0 => "site-local",
        _ => return None,
    })
}

/// Refuses a non-public address unless `allow_private`.
pub fn check(ip: IpAddr, allow_private: bool) -> Result<(), Refused> {
    match private_kind(ip) {
        Some(kind) if !allow_private => {
            Err(Refused(format!("refusing to download from {ip}, a {kind} address ([asset] allow_private = false)")))
        }
        _ => Ok(()),
    }
}

/// The system resolver, with the guard applied to every answer: a name
/// whose addresses are all refused fails to resolve with [`Refused`].
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match check(a.ip(), allow_private) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = match refused {
                    Some(Refused(why)) => format!("{} resolves to: {why}", remote_apis::quote(&host)),
                    None => format!("{} resolves to no address", remote_apis::quote(&host)),
                };
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

impl GuardedResolver {
    pub fn arc(allow_private: bool) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { allow_private })
    }
}

/// The guard's verdict on a URL before it is requested: the scheme is http
/// or https, and a host given as an IP literal is allowed (names are
/// checked when they resolve).
pub fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), Refused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused(format!("scheme {} is not http or https", remote_apis::quote(url.scheme()))));
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => check(IpAddr::V4(ip), allow_private),
        Some(url::Host::Ipv6(ip)) => check(IpAddr::V6(ip), allow_private),
        Some(url::Host::Domain(_)) => Ok(()),
        None => Err(Refused("the URL has no host".into())),
    }
}

/// Whether `error` (reqwest's, or any) was caused by the guard.
pub fn refused_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("127.8.9.10", Some("loopback")),
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("unspecified")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("reserved")),
            ("100.64.0.1", Some("shared (CGNAT)")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00::1", Some("unique-local")),
            ("fc12::1", Some("unique-local")),
            ("fe80::1", Some("link-local")),
            ("fec0::1", Some("site-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("64:ff9b::a9fe:a9fe", Some("link-local")),
            // Public ones.
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2606:4700::1111", None),
            ("::ffff:1.1.1.1", None),
        ];
        for (text, want) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(private_kind(ip), *want, "{text}");
            assert_eq!(check(ip, false).is_ok(), want.is_none(), "{text}");
            assert!(check(ip, true).is_ok(), "{text} with allow_private");
        }
    }

    #[test]
    fn urls_are_checked_by_scheme_and_literal() {
        let cases: &[(&str, bool, bool)] = &[
            ("http://8.8.8.8/x", false, true),
            ("https://example.com/x", false, true),
            ("http://127.0.0.1:8080/x", false, false),
            ("http://127.0.0.1:8080/x", true, true),
            ("http://[::1]/x", false, false),
            ("http://[::ffff:7f00:1]/x", false, false),
            ("ftp://example.com/x", true, false),
            ("file:///etc/passwd", true, false),
        ];
        for (url, allow, ok) in cases {
            let parsed = reqwest::Url::parse(url).unwrap();
            assert_eq!(check_url(&parsed, *allow).is_ok(), *ok, "{url} allow_private={allow}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_loopback() {
        let refused = GuardedResolver { allow_private: false }.resolve("localhost".parse().unwrap()).await;
        let e = refused.err().expect("localhost is loopback");
        assert!(refused_in(e.as_ref()).is_some(), "{e}");
        let allowed = GuardedResolver { allow_private: true }.resolve("localhost".parse().unwrap()).await;
        assert!(allowed.unwrap().any(|a| a.ip().is_loopback()));
    }
}

use tonic::Code;

use super::tokens::{self, Policy};
use super::*;

const CI_TOKEN: &str = "dbt_ci";
const DEV_TOKEN: &str = "dbt_dev";

fn policy() -> Policy {
    let text = format!(
        r#"
        [[token]]
        name = "ci"
        sha256 = "{}"
        grants = ["cas-read", "cas-write", "ac-read", "ac-write", "execute", "asset-fetch"]

        [[token]]
        name = "dev"
        sha256 = "{}"
        grants = ["cas-read", "ac-read"]
        instances = {{ "team-a" = ["cas-write", "execute", "asset-push"], "ops/" = ["admin"] }}

        [[cert]]
        name = "worker-1.build.example"
        grants = ["worker"]
        "#,
        tokens::sha256_hex(CI_TOKEN),
        tokens::sha256_hex(DEV_TOKEN),
    );
    Policy::parse(&text, GrantSet::parse(&["cas-read"]).unwrap()).unwrap()
}

/// The result code of `grant` on `instance` for a caller.
fn code(p: &Policy, token: Option<&str>, certs: &[&str], instance: &str, grant: Grant) -> Code {
    let certs: Vec<String> = certs.iter().map(|s| s.to_string()).collect();
    let checked = p.identify(token, &certs).and_then(|(who, grants)| tokens::check(&who, &grants, instance, grant));
    match checked {
        Ok(()) => Code::Ok,
        Err(e) => {
            assert!(!e.message.contains("dbt_"), "a status names the token: {}", e.message);
            e.code
        }
    }
}

/// (token, certificate names, instance, the expected code for each grant
/// in `Grant::ALL` order).
type Row<'a> = (Option<&'a str>, &'a [&'a str], &'a str, [Code; Grant::ALL.len()]);

#[test]
fn every_grant_for_every_kind_of_caller() {
    use Code::{Ok as Y, PermissionDenied as D, Unauthenticated as U};
    let p = policy();
    // Columns: cas-read, cas-write, ac-read, ac-write, execute, worker, admin, status,
    // asset-read, asset-push, asset-fetch (asset-fetch implies asset-read).
    let table: &[Row] = &[
        (None, &[], "", [Y, U, U, U, U, U, U, U, U, U, U]),
        (None, &[], "team-a", [Y, U, U, U, U, U, U, U, U, U, U]),
        (Some(CI_TOKEN), &[], "", [Y, Y, Y, Y, Y, D, D, D, Y, D, Y]),
        (Some(CI_TOKEN), &[], "any/thing", [Y, Y, Y, Y, Y, D, D, D, Y, D, Y]),
        (Some(DEV_TOKEN), &[], "", [Y, D, Y, D, D, D, D, D, D, D, D]),
        (Some(DEV_TOKEN), &[], "team-a", [Y, Y, Y, D, Y, D, D, D, D, Y, D]),
        (Some(DEV_TOKEN), &[], "team-a/ci", [Y, Y, Y, D, Y, D, D, D, D, Y, D]),
        // A prefix covers whole segments only.
        (Some(DEV_TOKEN), &[], "team-abc", [Y, D, Y, D, D, D, D, D, D, D, D]),
        (Some(DEV_TOKEN), &[], "ops", [Y, D, Y, D, D, D, Y, Y, D, D, D]),
        (Some(DEV_TOKEN), &[], "ops/x", [Y, D, Y, D, D, D, Y, Y, D, D, D]),
        (Some("dbt_wrong"), &[], "", [U, U, U, U, U, U, U, U, U, U, U]),
        // A listed certificate name, found among the certificate's names.
        // (`worker` implies cas-read and cas-write: a worker moves blobs.)
        (None, &["CN-not-listed", "worker-1.build.example"], "", [Y, Y, D, D, D, Y, D, D, D, D, D]),
        // A verified certificate the file does not list: identified, anonymous grants.
        (None, &["stranger"], "", [Y, D, D, D, D, D, D, D, D, D, D]),
        // A valid token names the caller over a certificate.
        (Some(CI_TOKEN), &["worker-1.build.example"], "", [Y, Y, Y, Y, Y, D, D, D, Y, D, Y]),
    ];
    for (token, certs, instance, expected) in table {
        for (grant, want) in Grant::ALL.iter().zip(expected) {
            let got = code(&p, *token, certs, instance, *grant);
            assert_eq!(got, *want, "token {token:?} certs {certs:?} instance {instance:?} grant {grant}");
        }
    }
}

#[test]
fn open_policy_allows_everything_and_ignores_tokens() {
    let p = Policy::open();
    for grant in Grant::ALL {
        assert_eq!(code(&p, None, &[], "x", grant), Code::Ok);
        assert_eq!(code(&p, Some("anything"), &[], "", grant), Code::Ok);
    }
}

#[test]
fn denial_names_the_grant_and_instance() {
    let p = policy();
    let (who, grants) = p.identify(Some(DEV_TOKEN), &[]).unwrap();
    let e = tokens::check(&who, &grants, "team-b", Grant::AcWrite).unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied);
    assert!(e.message.contains("ac-write") && e.message.contains("\"team-b\"") && e.message.contains("token:dev"));
    let (who, grants) = p.identify(None, &[]).unwrap();
    let e = tokens::check(&who, &grants, "", Grant::Execute).unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated);
    assert!(e.message.contains("execute"), "{}", e.message);
}

#[test]
fn bad_token_files_are_refused_with_the_reason() {
    let sha = tokens::sha256_hex("x");
    let cases = [
        (format!("[[token]]\nname = \"a\"\nsha256 = \"{sha}\"\ngrants = [\"cas-reed\"]"), "cas-reed"),
        ("[[token]]\nname = \"a\"\nsha256 = \"dbt_plaintext\"".to_string(), "hex"),
        ("[[token]]\nname = \"a\"\nsha256 = \"abcd\"".to_string(), "64 hex"),
        (format!("[[token]]\nname = \"a b\"\nsha256 = \"{sha}\""), "name"),
        (format!("[[token]]\nname = \"a\"\nsha256 = \"{sha}\"\n[[token]]\nname = \"a\"\nsha256 = \"{sha}\""), "twice"),
        (format!("[[token]]\nname = \"a\"\nsha256 = \"{sha}\"\n[[token]]\nname = \"b\"\nsha256 = \"{sha}\""), "twice"),
        (
            format!("[[token]]\nname = \"a\"\nsha256 = \"{sha}\"\ninstances = {{ \"a/../b\" = [\"admin\"] }}"),
            "instances",
        ),
        (format!("[[token]]\nname = \"a\"\nsha256 = \"{sha}\"\ncolour = 1"), "unknown field"),
        ("[[cert]]\nname = \"\"".to_string(), "cert[0].name"),
    ];
    for (text, needle) in cases {
        let err = Policy::parse(&text, GrantSet::NONE).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{text}: {err:#}");
    }
}

#[test]
fn generated_tokens_are_fresh_and_the_entry_parses_back() {
    let a = tokens::generate().unwrap();
    let b = tokens::generate().unwrap();
    assert_ne!(a, b);
    assert!(a.starts_with(tokens::TOKEN_PREFIX) && a.len() == tokens::TOKEN_PREFIX.len() + 64);
    for instance in [None, Some("team-a")] {
        let entry = tokens::entry_toml("laptop", &tokens::sha256_hex(&a), &[Grant::CasRead, Grant::AcRead], instance);
        assert!(!entry.contains(&a), "the entry must not hold the token");
        let p = Policy::parse(&entry, GrantSet::NONE).unwrap();
        let (who, grants) = p.identify(Some(&a), &[]).unwrap();
        assert_eq!(who, Principal::Token("laptop".into()));
        assert!(grants.allows("team-a", Grant::AcRead));
        assert_eq!(grants.allows("", Grant::AcRead), instance.is_none());
        assert!(!grants.allows("team-a", Grant::CasWrite));
    }
}

#[test]
fn prefixes_match_whole_segments() {
    for (instance, prefix, want) in [
        ("", "", true),
        ("a", "", true),
        ("a", "a", true),
        ("a/b", "a", true),
        ("ab", "a", false),
        ("", "a", false),
        ("a", "a/b", false),
    ] {
        assert_eq!(under_prefix(instance, prefix), want, "{instance:?} under {prefix:?}");
    }
}

#[test]
fn secure_by_default_refuses_open_non_loopback() {
    let unset = AuthConfig::default();
    let err = unset.check_listener("0.0.0.0:8980".parse().unwrap(), "[scheduler] addr").unwrap_err().to_string();
    assert!(err.contains("mode = \"none\"") && err.contains("token new"), "{err}");
    unset.check_listener("127.0.0.1:8980".parse().unwrap(), "x").unwrap();
    unset.check_listener("[::1]:8980".parse().unwrap(), "x").unwrap();
    let none = AuthConfig { mode: Mode::None, ..Default::default() };
    none.check_listener("0.0.0.0:8980".parse().unwrap(), "x").unwrap();
    let tokens = AuthConfig { mode: Mode::Tokens, ..Default::default() };
    tokens.check_listener("0.0.0.0:8980".parse().unwrap(), "x").unwrap();
}

#[test]
fn asset_fetch_implies_asset_read_only() {
    let set = GrantSet::parse(&["asset-fetch"]).unwrap();
    assert!(set.contains(Grant::AssetFetch));
    assert!(set.contains(Grant::AssetRead), "a Fetch that may download may be answered from records");
    assert!(!set.contains(Grant::AssetPush));
    assert!(!set.contains(Grant::CasRead));
    let read = GrantSet::parse(&["asset-read", "asset-push"]).unwrap();
    assert!(!read.contains(Grant::AssetFetch));
    assert_eq!(read.to_string(), "[asset-read, asset-push]");
}

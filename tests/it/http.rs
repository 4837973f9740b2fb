//! The HTTP listener: health probes, authentication of the pages (tokens,
//! a browser's Basic credentials, the `status` grant), the default address
//! taken by another server, and refusal on a public address without auth.

use base64::Engine;
use cargo_distbuild::config::{Backend, FileConfig};

use crate::auth::{start, token_file_text, token_of};
use crate::common::{TestServer, free_addr, http_get, http_request};

#[tokio::test]
async fn health_probes_answer_without_credentials() {
    let http = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("viewer", &["status"], "")]);
    let server = start(dir.path(), &tokens, &[], |f| f.server.http_listen = Some(http.to_string())).await;
    let live = http_get(http, "/healthz", &[]).await;
    assert_eq!((live.status, live.text().as_str()), (200, "ok\n"));
    let ready = http_get(http, "/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(ready.text().contains("1 workers"), "{}", ready.text());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn pages_need_the_status_grant() {
    let http = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let tokens =
        token_file_text(&[("viewer", &["status"], ""), ("ops", &["admin"], ""), ("dev", &["cas-read", "execute"], "")]);
    let server = start(dir.path(), &tokens, &["cas-read"], |f| f.server.http_listen = Some(http.to_string())).await;
    // No credentials: 401 asking a browser for Basic credentials.
    let anonymous = http_get(http, "/", &[]).await;
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.header("www-authenticate").unwrap().starts_with("Basic"), "{:?}", anonymous.headers);
    // A wrong token: 401, and the answer never echoes it.
    let wrong = http_get(http, "/", &[("Authorization", "Bearer dbt_wrong_secret")]).await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.text().contains("dbt_wrong_secret"));
    // A token without `status`: 403 naming the grant.
    let dev = format!("Bearer {}", token_of("dev"));
    let denied = http_get(http, "/", &[("Authorization", &dev)]).await;
    assert_eq!(denied.status, 403);
    assert!(denied.text().contains("status"), "{}", denied.text());
    // `status` by bearer token and by a browser's Basic credentials, and
    // `admin` (which implies it).
    for name in ["viewer", "ops"] {
        let bearer = format!("Bearer {}", token_of(name));
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("someone:{}", token_of(name)))
        );
        for value in [bearer, basic] {
            let page = http_get(http, "/", &[("Authorization", &value)]).await;
            assert_ne!(page.status, 401, "{name}");
            assert_ne!(page.status, 403, "{name}");
        }
    }
    // Changing things needs `admin`, whatever the path.
    let viewer = format!("Bearer {}", token_of("viewer"));
    let post = http_request(http, "POST", "/workers/x/drain", &[("Authorization", &viewer)], b"").await;
    assert_eq!(post.status, 403);
    // A form posted from another site is refused even for an admin.
    let ops = format!("Bearer {}", token_of("ops"));
    let forged = http_request(
        http,
        "POST",
        "/workers/x/drain",
        &[("Authorization", &ops), ("Origin", "https://evil.example")],
        b"",
    )
    .await;
    assert_eq!(forged.status, 403);
    assert!(forged.text().contains("cross-site"), "{}", forged.text());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_open_server_serves_pages_to_anyone_on_loopback() {
    let http = free_addr();
    let server = TestServer::start_with(Backend::Memory, |f| f.server.http_listen = Some(http.to_string())).await;
    let ready = http_get(http, "/readyz", &[]).await;
    assert_eq!(ready.status, 200);
    let unknown = http_get(http, "/no/such/page", &[]).await;
    assert_eq!(unknown.status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_chosen_address_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut file = FileConfig::default();
    file.scheduler.addr = "127.0.0.1:0".into();
    file.cas.backend = Backend::Memory;
    file.worker.capacity = Some(0);
    file.server.http_listen = Some(addr.to_string());
    let config = file.resolve().unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let err = cargo_distbuild::server::run(listener, config, std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("http_listen"), "{err:#}");
}

#[tokio::test]
async fn a_public_http_address_without_auth_is_refused() {
    let mut file = FileConfig::default();
    file.scheduler.addr = "127.0.0.1:0".into();
    file.cas.backend = Backend::Memory;
    file.worker.capacity = Some(0);
    file.server.http_listen = Some("0.0.0.0:0".into());
    let config = file.resolve().unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let err = cargo_distbuild::server::run(listener, config, std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("http_listen"), "{err:#}");
}

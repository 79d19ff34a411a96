//! Relay mode through real proxies from Debian, started by the tests: squid as the corporate
//! forward proxy (HTTP CONNECT) and nginx as the TLS-terminating reverse proxy on "443".
//! Without the binaries these tests fail when `CI=true` and are skipped (loudly) otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pluresdb_sync_core::Transport;
use pluresdb_sync_core::testkit::{fresh_topic, pattern};
use pluresdb_sync_transport_relay::RelayTransport;
use tokio::process::{Child, Command};

mod common;
use common::{T, accept, free_port, listening, recv, relay};

/// The path of a system binary, or `None` (after failing the test in CI).
fn system_binary(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var("PATH").unwrap_or_default();
    let found = dirs
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required in CI (scripts/test installs it from Debian)"
        );
        eprintln!("SKIPPED: {name} is not installed (scripts/test installs it)");
    }
    found
}

async fn wait_listening(port: u16, what: &str, log: &Path) {
    assert!(
        listening(port, T).await,
        "{what} did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// squid on a free loopback port, memory only, no helpers; killed on drop.
struct Squid {
    _child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Squid {
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // squid drops root privileges to its own user, which must write its logs here.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\npid_filename none\ncache deny all\ncache_mem 8 MB\n\
             pinger_enable off\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
             coredump_dir {d}\nacl local src 127.0.0.1/32\nhttp_access allow local\n\
             http_access deny all\nshutdown_lifetime 0 seconds\n"
        );
        std::fs::write(dir.path().join("squid.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(bin)
            .arg("-N")
            .arg("-f")
            .arg(dir.path().join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_listening(port, "squid", &dir.path().join("cache.log")).await;
        Self {
            _child: child,
            port,
            dir,
        }
    }

    async fn wait_logged(&self, needle: &str) {
        let path = self.dir.path().join("access.log");
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.contains(needle) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "squid never logged {needle:?}: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// nginx terminating TLS on a free loopback port and proxying `/relay` to `upstream`.
struct Nginx {
    _child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    cert_der: Vec<u8>,
}

impl Nginx {
    async fn start(bin: &Path, upstream: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        let port = free_port();
        let d = dir.path().display();
        // The location block is the one documented in docs/relay-operations.md.
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             server {{\nlisten 127.0.0.1:{port} ssl;\nssl_certificate {d}/cert.pem;\n\
             ssl_certificate_key {d}/key.pem;\n\
             location /relay {{\n    proxy_pass http://{upstream};\n    proxy_http_version 1.1;\n\
                 proxy_set_header Upgrade $http_upgrade;\n    proxy_set_header Connection \"upgrade\";\n\
                 proxy_set_header Host $host;\n    proxy_read_timeout 120s;\n\
                 proxy_send_timeout 120s;\n    proxy_buffering off;\n}}\n}}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_listening(port, "nginx", &dir.path().join("error.log")).await;
        Self {
            _child: child,
            port,
            _dir: dir,
            cert_der: cert.cert.der().to_vec(),
        }
    }
}

/// Two transports built by `build` meet on a fresh topic and exchange 1 MiB each way.
async fn two_peers_talk(build: impl Fn() -> RelayTransport) {
    let (mut a, mut b) = (build(), build());
    let topic = fresh_topic("proxies");
    let mut a_rx = a.connect(topic).await.unwrap();
    let mut b_rx = b.connect(topic).await.unwrap();
    let mut ca = accept(&mut a_rx).await;
    let mut cb = accept(&mut b_rx).await;
    let big = pattern(1 << 20, 1);
    ca.send(&big).await.unwrap();
    assert_eq!(recv(&mut cb).await, big);
    cb.send(b"back").await.unwrap();
    assert_eq!(recv(&mut ca).await, b"back");
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_forward_proxy_needs_squid() {
    let Some(bin) = system_binary("squid") else {
        return;
    };
    let (server, _) = relay().await;
    let squid = Squid::start(&bin).await;
    let url = format!("ws://{}/relay", server.local_addr());
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    two_peers_talk(|| {
        RelayTransport::builder()
            .relay_url(&url)
            .proxy(&proxy)
            .build()
            .unwrap()
    })
    .await;
    squid
        .wait_logged(&format!("CONNECT {}", server.local_addr()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_tls_reverse_proxy_needs_nginx() {
    let Some(bin) = system_binary("nginx") else {
        return;
    };
    let (server, _) = relay().await;
    let nginx = Nginx::start(&bin, server.local_addr()).await;
    let url = format!("wss://127.0.0.1:{}/relay", nginx.port);
    two_peers_talk(|| {
        RelayTransport::builder()
            .relay_url(&url)
            .add_root_certificate(nginx.cert_der.clone())
            .build()
            .unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_then_nginx_then_relay_needs_squid_and_nginx() {
    let (Some(squid_bin), Some(nginx_bin)) = (system_binary("squid"), system_binary("nginx"))
    else {
        return;
    };
    let (server, _) = relay().await;
    let nginx = Nginx::start(&nginx_bin, server.local_addr()).await;
    let squid = Squid::start(&squid_bin).await;
    // TLS end to end from the client to nginx, tunnelled through squid.
    let url = format!("wss://127.0.0.1:{}/relay", nginx.port);
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    two_peers_talk(|| {
        RelayTransport::builder()
            .relay_url(&url)
            .proxy(&proxy)
            .add_root_certificate(nginx.cert_der.clone())
            .build()
            .unwrap()
    })
    .await;
    squid
        .wait_logged(&format!("CONNECT 127.0.0.1:{}", nginx.port))
        .await;
}

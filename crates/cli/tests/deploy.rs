//! The deployment files, run for real: the command line of `deploy/Containerfile` (its
//! ENTRYPOINT and CMD) and the `ExecStart` of `deploy/pluresdb-sync-relay.service`, each parsed
//! out of the file and run as the same binary with the same flags, on one real nats-server. No container
//! runtime or systemd is needed; what they would do is done here, the way an operator's
//! settings would:
//!
//! - the binary path is this build's binary;
//! - every listen address keeps its port but gets a loopback address of this test's own
//!   (`127.x.y.z`), so port 443 is free even when other tests run; without root, ports below
//!   1024 become 0 (any free port);
//! - as root, the relay runs as the file's user (the Containerfile's `USER`, a non-root uid for
//!   systemd's `DynamicUser=`) holding only the capability the file grants it
//!   (`setcap cap_net_bind_service` / `AmbientCapabilities=`), through `setpriv`;
//! - the files the flags name get a self-signed certificate (made with `rcgen`) and a token
//!   file: under a temporary directory standing for the `/etc/pluresdb-sync` volume, or in a
//!   credentials directory standing for systemd's `%d` (each `%d/NAME` must have its
//!   `LoadCredential=NAME:...`);
//! - the environment is empty but for `PLURESDB_SYNC_RELAY_NATS` (the container's `-e`, the
//!   unit's `EnvironmentFile=`), pointing at the test's nats-server.
//!
//! Then: `/healthz` over TLS on each relay port and on each metrics port, a client without a
//! token refused with 401, a WSS session between a client of the container's relay and a client
//! of the systemd unit's relay (rooms span both over NATS), `/metrics` counting it all, and a
//! clean exit on SIGTERM. With `systemd-analyze` installed (scripts/test installs it) the unit
//! also passes `systemd-analyze verify` without a warning.
//!
//! Without nats-server this test skips, except with `CI=true`, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use pluresdb_sync::{Connection, Transport};
use pluresdb_sync_core::testkit::fresh_topic;
use pluresdb_sync_transport_relay::RelayTransport;
use pluresdb_sync_transport_relay::testkit::WAIT as T;
use pluresdb_sync_transport_relay::testkit::nats::NatsServer;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const TOKEN: &str = "deploy-test-token";

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// What the deployment file says to run.
#[derive(Debug)]
struct Plan {
    /// The command line, the binary first.
    argv: Vec<String>,
    /// The uid and gid to run as.
    user: (u32, u32),
    /// Capabilities the process holds (setpriv names: `net_bind_service`).
    caps: Vec<String>,
    /// `NoNewPrivileges=yes`.
    no_new_privs: bool,
    /// Where `%d` points (systemd credentials), if the file uses it.
    credentials: HashMap<String, String>,
}

/// A file's instructions or settings: continuation lines (`\`) joined, comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(trimmed);
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_owned());
        }
        cur.clear();
    }
    assert!(cur.is_empty(), "the file ends inside a continued line");
    out
}

/// The final stage of `deploy/Containerfile`: ENTRYPOINT + CMD (exec form), USER, the
/// capability `setcap` gives the binary.
fn container_plan() -> Plan {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let lines = logical_lines(&text);
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.to_ascii_uppercase().starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    assert!(
        lines[stages[0]].contains("rust:"),
        "built with the Rust toolchain image: {}",
        lines[stages[0]]
    );
    let last = &lines[*stages.last().unwrap()..];
    assert!(
        last[0].contains("debian:bookworm-slim"),
        "runs on debian:bookworm-slim: {}",
        last[0]
    );
    let instr = |name: &str| -> Option<String> {
        last.iter()
            .rev()
            .find(|l| l.to_ascii_uppercase().starts_with(&format!("{name} ")))
            .map(|l| l[name.len()..].trim().to_owned())
    };
    let exec_form = |name: &str| -> Vec<String> {
        let v = instr(name).unwrap_or_else(|| panic!("no {name}"));
        serde_json::from_str(&v)
            .unwrap_or_else(|e| panic!("{name} must be exec form (a JSON array): {v}: {e}"))
    };
    let mut argv = exec_form("ENTRYPOINT");
    argv.extend(exec_form("CMD"));
    let user = instr("USER").expect("the image sets USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let user: (u32, u32) = (uid.parse().unwrap(), gid.parse().unwrap());
    assert_ne!(user.0, 0, "the relay must not run as root");
    // RUN ... setcap cap_x=+ep BINARY
    let setcap = last
        .iter()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "setcap")?;
            let (caps, bin) = (words.get(i + 1)?, words.get(i + 2)?);
            (*bin == argv[0]).then(|| caps.to_string())
        })
        .expect("setcap on the binary");
    let caps = setcap
        .strip_suffix("=+ep")
        .expect("cap=+ep")
        .split(',')
        .map(|c| c.trim_start_matches("cap_").to_owned())
        .collect();
    Plan {
        argv,
        user,
        caps,
        no_new_privs: false,
        credentials: HashMap::new(),
    }
}

/// `[Service]` of `deploy/pluresdb-sync-relay.service`: ExecStart, LoadCredential=,
/// AmbientCapabilities=, DynamicUser=, NoNewPrivileges=.
fn systemd_plan() -> Plan {
    let text = std::fs::read_to_string(deploy_dir().join("pluresdb-sync-relay.service")).unwrap();
    let mut section = String::new();
    let mut settings: Vec<(String, String)> = Vec::new();
    for line in logical_lines(&text) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            settings.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let all = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> Option<&str> { all(key).last().copied() };
    let exec = all("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    assert!(
        !exec[0].contains(['"', '\'']),
        "this parser does not do systemd quoting: {}",
        exec[0]
    );
    let argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    for arg in &argv {
        let rest = arg.replace("%d", "");
        assert!(
            !rest.contains('%'),
            "unsupported specifier in ExecStart: {arg}"
        );
    }
    assert_eq!(one("DynamicUser"), Some("yes"), "a user of its own");
    let caps = one("AmbientCapabilities")
        .expect("AmbientCapabilities=")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    assert!(
        one("EnvironmentFile").is_some(),
        "the NATS URL comes from an EnvironmentFile="
    );
    let credentials = all("LoadCredential")
        .into_iter()
        .map(|v| {
            let (name, path) = v.split_once(':').expect("LoadCredential=NAME:PATH");
            (name.to_owned(), path.to_owned())
        })
        .collect();
    Plan {
        argv,
        // DynamicUser= picks a uid from 61184-65519.
        user: (61184, 61184),
        caps,
        no_new_privs: one("NoNewPrivileges") == Some("yes"),
        credentials,
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        == Some("0")
}

/// A loopback address no other test uses.
fn own_loopback() -> Ipv4Addr {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).unwrap();
    Ipv4Addr::new(127, 20 + b[0] % 200, b[1], 1 + b[2] % 253)
}

/// The self-signed certificate for `ip` and its key, as PEM, and the certificate's DER.
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn cert_for(ips: &[Ipv4Addr]) -> Cert {
    let c =
        rcgen::generate_simple_self_signed(ips.iter().map(ToString::to_string).collect::<Vec<_>>())
            .unwrap();
    Cert {
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

/// Writes `content` to `path` (creating directories), owned by `user` when root, mode 0600.
fn install(path: &Path, content: &str, user: (u32, u32), root: bool) {
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if root {
        std::os::unix::fs::chown(path, Some(user.0), Some(user.1)).unwrap();
    }
}

/// A relay started from a plan, and the addresses it printed.
struct Relay {
    child: Child,
    url: String,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Applies the substitutions of the module docs to `plan` and starts it.
async fn start(
    plan: &Plan,
    ip: Ipv4Addr,
    files: &Path,
    cert: &Cert,
    tokens: &str,
    nats: &str,
) -> Relay {
    let root = is_root();
    // Every directory the relay's user must traverse.
    std::fs::create_dir_all(files).unwrap();
    std::fs::set_permissions(files, std::fs::Permissions::from_mode(0o755)).unwrap();
    let credentials = files.join("credentials");
    let mut argv = plan.argv.clone();
    assert!(
        argv[0].ends_with("/pluresdb-sync") && argv.get(1).map(String::as_str) == Some("relay"),
        "runs `pluresdb-sync relay`: {argv:?}"
    );
    argv[0] = env!("CARGO_BIN_EXE_pluresdb-sync").to_owned();
    let mut i = 2;
    while i < argv.len() {
        let flag = argv[i].clone();
        let Some(value) = argv.get_mut(i + 1) else {
            break;
        };
        match flag.as_str() {
            "--listen" | "--metrics" => {
                let addr: SocketAddr = value.parse().unwrap();
                let port = if addr.port() < 1024 && !root {
                    0
                } else {
                    addr.port()
                };
                *value = SocketAddr::new(IpAddr::V4(ip), port).to_string();
            }
            "--tls-cert" | "--tls-key" | "--auth-token-file" => {
                let content = match flag.as_str() {
                    "--tls-cert" => &cert.cert_pem,
                    "--tls-key" => &cert.key_pem,
                    _ => tokens,
                };
                let path = if let Some(name) = value.strip_prefix("%d/") {
                    assert!(
                        plan.credentials.contains_key(name),
                        "{flag} {value}: no LoadCredential={name}:..."
                    );
                    credentials.join(name)
                } else {
                    assert!(
                        value.starts_with("/etc/pluresdb-sync/"),
                        "{flag} {value}: files live in the /etc/pluresdb-sync volume"
                    );
                    files.join(value.trim_start_matches('/'))
                };
                install(&path, content, plan.user, root);
                *value = path.to_str().unwrap().to_owned();
            }
            _ => {}
        }
        i += 2;
    }
    // Directories on the way to the files: traversable by the relay's user.
    for dir in [files.join("etc"), files.join("etc/pluresdb-sync")] {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    }
    for dir in [files.join("etc/pluresdb-sync/tls"), credentials.clone()] {
        if dir.exists() && root {
            std::os::unix::fs::chown(&dir, Some(plan.user.0), Some(plan.user.1)).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
    }
    let mut cmd = if root {
        let caps: Vec<String> = plan.caps.iter().map(|c| format!("+{c}")).collect();
        let caps = caps.join(",");
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", plan.user.0))
            .arg(format!("--regid={}", plan.user.1))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"));
        if plan.no_new_privs {
            c.arg("--no-new-privs");
        }
        c.arg("--").args(&argv);
        c
    } else {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    if root {
        eprintln!("running {argv:?} as {:?} with {:?}", plan.user, plan.caps);
    } else {
        eprintln!("running {argv:?} as this user (not root: no user switch, no port 443)");
    }
    let mut child = cmd
        .env_clear()
        .env("PLURESDB_SYNC_RELAY_NATS", nats)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut metrics) = (None, None);
    while url.is_none() || metrics.is_none() {
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .expect("the relay did not print its addresses")
            .unwrap()
            .expect("the relay exited early");
        if let Some(rest) = line.strip_prefix("relay listening on ") {
            url = Some(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("metrics on http://") {
            metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
        }
    }
    let url = url.unwrap();
    let addr = url
        .strip_prefix("wss://")
        .and_then(|r| r.strip_suffix("/relay"))
        .unwrap_or_else(|| panic!("TLS on the relay port: {url}"))
        .parse::<SocketAddr>()
        .unwrap();
    assert_eq!(addr.ip(), IpAddr::V4(ip));
    if root {
        assert_eq!(
            addr.port(),
            443,
            "as root the relay binds 443 as a non-root user"
        );
    }
    Relay {
        child,
        url,
        addr,
        metrics: metrics.unwrap(),
    }
}

/// Reads until the peer closes; a TLS stream cut without close_notify still yields its data.
async fn read_all(mut s: impl AsyncRead + Unpin) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn exchange(mut s: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    read_all(s).await
}

/// An HTTP/1.1 request over TLS to `addr`, trusting `der` only; the whole response.
async fn https(addr: SocketAddr, der: &[u8], request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.to_vec().into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(addr.ip().into(), tcp)
        .await
        .unwrap();
    exchange(tls, request).await
}

async fn http(addr: SocketAddr, request: &str) -> String {
    exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), request).await
}

/// The value of the metric line starting with `prefix`.
async fn metric(relay: &Relay, prefix: &str) -> u64 {
    let text = http(relay.metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no metric {prefix} in {text}"))
}

fn client(url: &str, der: &[u8]) -> RelayTransport {
    RelayTransport::builder()
        .relay_url(url)
        .auth_token(TOKEN)
        .add_root_certificate(der.to_vec())
        .timeout(T)
        .build()
        .unwrap()
}

async fn next_conn(
    rx: &mut tokio::sync::mpsc::Receiver<Box<dyn Connection>>,
) -> Box<dyn Connection> {
    tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()
}

async fn receive(c: &mut Box<dyn Connection>) -> Vec<u8> {
    tokio::time::timeout(T, c.receive())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// `systemd-analyze verify` on the unit (with this build's binary) prints nothing.
fn systemd_analyze_verify(dir: &Path) {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(bin) = found else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing (Debian package systemd; scripts/test installs it)"
        );
        eprintln!("not verifying the unit: systemd-analyze is not installed");
        return;
    };
    let text = std::fs::read_to_string(deploy_dir().join("pluresdb-sync-relay.service")).unwrap();
    let unit = dir.join("pluresdb-sync-relay.service");
    std::fs::write(
        &unit,
        text.replace(
            "/usr/local/bin/pluresdb-sync",
            env!("CARGO_BIN_EXE_pluresdb-sync"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_and_systemd_command_lines_serve_tls_tokens_metrics_and_nats() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    systemd_analyze_verify(dir.path());
    let (container, systemd) = (container_plan(), systemd_plan());
    let (ip_c, ip_s) = (own_loopback(), own_loopback());
    let cert = cert_for(&[ip_c, ip_s]);
    let tokens = format!("# operators\n{TOKEN}\n");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = start(
        &container,
        ip_c,
        &dir.path().join("container"),
        &cert,
        &tokens,
        &nats.url(),
    )
    .await;
    let mut s = start(
        &systemd,
        ip_s,
        &dir.path().join("systemd"),
        &cert,
        &tokens,
        &nats.url(),
    )
    .await;

    for relay in [&c, &s] {
        let health = https(
            relay.addr,
            &cert.der,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
            "{}: {health}",
            relay.url
        );
        let health = http(relay.metrics, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let refused = https(
            relay.addr,
            &cert.der,
            &format!(
                "GET /relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: {}\r\n\r\n",
                pluresdb_sync_transport_relay::protocol::SUBPROTOCOL
            ),
        )
        .await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    }

    // One client on each relay: they meet through NATS and talk over WSS, end to end.
    let topic = fresh_topic("deploy");
    let (mut a, mut b) = (client(&c.url, &cert.der), client(&s.url, &cert.der));
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
    let (mut ab, mut ba) = (next_conn(&mut ra).await, next_conn(&mut rb).await);
    assert_eq!(ab.peer_id(), b.peer_id());
    assert_eq!(ba.peer_id(), a.peer_id());
    ab.send(b"from the container's relay").await.unwrap();
    assert_eq!(receive(&mut ba).await, b"from the container's relay");
    ba.send(b"from the systemd unit's relay").await.unwrap();
    assert_eq!(receive(&mut ab).await, b"from the systemd unit's relay");

    for relay in [&c, &s] {
        assert_eq!(metric(relay, "pluresdb_relay_nats_up").await, 1);
        assert!(metric(relay, "pluresdb_relay_connections_total").await >= 1);
        assert!(metric(relay, "pluresdb_relay_frames_forwarded_total").await >= 1);
        assert!(metric(relay, "pluresdb_relay_drops_total{reason=\"unauthorized\"}").await >= 1);
    }
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();

    // STOPSIGNAL / KillSignal: SIGTERM, and a clean exit.
    for relay in [&mut c, &mut s] {
        let pid = relay.child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let exit = tokio::time::timeout(T, relay.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "{}: {exit:?}", relay.url);
    }
    nats.stop().await;
}

/// `PLURESDB_SYNC_RELAY_<FLAG>` sets a flag, and the flag on the command line wins.
#[test]
fn relay_flags_come_from_the_environment_and_the_command_line_wins() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pluresdb-sync"))
            .arg("relay")
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[("PLURESDB_SYNC_RELAY_LISTEN", "not-an-address")], &[]);
    assert!(
        err.contains("not-an-address") && err.contains("--listen"),
        "{err}"
    );
    let env = [
        ("PLURESDB_SYNC_RELAY_LISTEN", "127.0.0.1:0"),
        (
            "PLURESDB_SYNC_RELAY_AUTH_TOKEN_FILE",
            "/nonexistent/from-env",
        ),
    ];
    let err = run(&env, &[]);
    assert!(
        err.contains("cannot read --auth-token-file /nonexistent/from-env"),
        "{err}"
    );
    let err = run(&env, &["--auth-token-file", "/nonexistent/from-flag"]);
    assert!(
        err.contains("/nonexistent/from-flag") && !err.contains("from-env"),
        "{err}"
    );
}

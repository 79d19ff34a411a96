//! Fuzzes the relay's HTTP layer as a client meets it: each input is sent on a fresh TCP
//! connection to a real `RelayServer` on loopback (the first byte picks one without tokens or
//! one with a bearer token), then the write side is closed. The relay must not panic (the fuzz
//! runtime aborts on a panic in any thread, the relay's tasks included), must answer or close
//! within 10 s, and whatever it sends must start with an HTTP/1.x status line (hyper answers an
//! HTTP/1.0 request in HTTP/1.0). It tests behaviour, not a function, so it stays meaningful
//! whatever parses the head: hyper since the move from the hand-written parser.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};

const TOKEN: &str = "fuzz-token";

/// Two relays (no tokens; one token), started once on their own runtime.
fn relays() -> &'static [SocketAddr; 2] {
    static RELAYS: OnceLock<[SocketAddr; 2]> = OnceLock::new();
    RELAYS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let base = || {
                    RelayServerConfig::builder()
                        .handshake_timeout(Duration::from_secs(2))
                        .max_connections_per_ip(100_000)
                };
                let open =
                    RelayServer::bind("127.0.0.1:0".parse().unwrap(), base().build().unwrap())
                        .await
                        .expect("bind");
                let config = base().auth_tokens(vec![TOKEN.to_owned()]).build().unwrap();
                let authed = RelayServer::bind("127.0.0.1:0".parse().unwrap(), config)
                    .await
                    .expect("bind");
                tx.send([open.local_addr(), authed.local_addr()]).unwrap();
                std::future::pending::<()>().await;
                drop((open, authed));
            });
        });
        rx.recv().expect("relays started")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, request)) = data.split_first() else {
        return;
    };
    let addr = relays()[usize::from(pick & 1)];
    let mut s = TcpStream::connect(addr).expect("connect to the relay");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The relay may answer and close before reading everything: a reset here is no finding.
    let _ = s.write_all(request);
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the relay neither answered nor closed in 10 s");
            }
            Err(_) => break,
        }
        if got.len() > 64 * 1024 {
            break;
        }
    }
    if !got.is_empty() {
        let status = got.get(..12).unwrap_or(&got);
        assert!(
            status.len() == 12
                && (status.starts_with(b"HTTP/1.1 ") || status.starts_with(b"HTTP/1.0 "))
                && status[9..].iter().all(u8::is_ascii_digit),
            "not an HTTP status line: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        );
    }
});

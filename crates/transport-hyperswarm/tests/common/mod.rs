//! Helpers of the integration tests besides the testkit's loopback DHT: tracing, a UDP
//! forwarder, timed waits.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UdpSocket;

/// A UDP forwarder on loopback in front of one target: each client gets its own upstream
/// socket (like a NAT). `blackhole` drops everything in both directions (a peer that stops
/// answering); the task ends when the proxy is dropped.
pub struct UdpProxy {
    pub addr: SocketAddr,
    pub blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = blackhole.clone();
        let task = tokio::spawn(async move {
            let mut uplinks: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut tasks = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if hole.load(Ordering::Relaxed) {
                    continue;
                }
                let up = match uplinks.get(&from) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        uplinks.insert(from, up.clone());
                        let (up2, front2, hole2) = (up.clone(), front.clone(), hole.clone());
                        tasks.spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                                if !hole2.load(Ordering::Relaxed) {
                                    let _ = front2.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        up
                    }
                };
                let _ = up.send_to(&buf[..n], target).await;
            }
        });
        Self {
            addr,
            blackhole,
            task,
        }
    }

    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for the next connection, with a timeout.
pub async fn next_conn(
    rx: &mut tokio::sync::mpsc::Receiver<Box<dyn pluresdb_sync_core::Connection>>,
    within: Duration,
) -> Box<dyn pluresdb_sync_core::Connection> {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("timed out waiting for a connection")
        .expect("the connect receiver ended")
}

/// A loopback UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
pub mod attack;
pub mod pair;

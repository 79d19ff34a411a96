//! What the namespace tests of Auto mode share (`nat_matrix.rs`, `roaming.rs`): a private
//! internet from the `pluresdb-sync-netlab` testkit with a relay server and a mainline DHT
//! testnet on its public segment (in this process, on a runtime inside the public
//! namespace), and Auto peers at sites on it, each on a runtime inside its site's host
//! namespace, so every socket a peer makes is on that site's network.
#![allow(dead_code)]

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use pluresdb_sync_core::{Connection, TopicHash, Transport};
use pluresdb_sync_netlab::{Lab, Nat, NsRuntime, PublicNet, Site};
use pluresdb_sync_transport_auto::AutoTransport;
use pluresdb_sync_transport_hyperswarm::relay_path::PeerPath;
use pluresdb_sync_transport_relay::server::{RelayServer, RelayServerConfig};
use tokio::sync::mpsc;

/// The step timeout of these tests (a hang guard, not a target).
pub(crate) const T: Duration = Duration::from_secs(30);

/// Logs to the test's output with `RUST_LOG` (e.g. `pluresdb_sync_transport_hyperswarm=debug`).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The public segment with its relay and DHT testnet.
pub(crate) struct World {
    pub(crate) lab: Lab,
    pub(crate) public: PublicNet,
    rt: NsRuntime,
    relay: Option<RelayServer>,
    testnet: Option<mainline::Testnet>,
    pub(crate) url: String,
    pub(crate) bootstrap: Vec<String>,
}

impl World {
    /// A lab tagged `tag`, its public segment 10.211.0.0/24, and on 10.211.0.1 a relay
    /// server (default configuration) and a 4-node DHT testnet.
    pub(crate) fn start(tag: &str) -> Self {
        let mut lab = Lab::new(tag).unwrap();
        let public = lab.public_net(211).unwrap();
        let rt = public.ns.runtime(2).unwrap();
        let gw = public.gateway();
        let (relay, testnet) = rt.block_on(async move {
            let relay = RelayServer::bind(SocketAddr::from((gw, 0)), RelayServerConfig::default())
                .await
                .unwrap();
            let testnet = tokio::task::spawn_blocking(move || {
                mainline::Testnet::builder(4).bind_address(gw).build()
            })
            .await
            .unwrap()
            .unwrap();
            (relay, testnet)
        });
        let url = pluresdb_sync_transport_relay::testkit::url(&relay);
        let bootstrap = testnet.bootstrap.clone();
        World {
            lab,
            public,
            rt,
            relay: Some(relay),
            testnet: Some(testnet),
            url,
            bootstrap,
        }
    }

    /// A peer at a new site `idx` reached as `nat`.
    pub(crate) async fn peer(&mut self, idx: u8, nat: Nat) -> Peer {
        let site = self.lab.site(&self.public, idx, nat).unwrap();
        let rt = site.host.runtime(2).unwrap();
        let (url, bootstrap, ip) = (self.url.clone(), self.bootstrap.clone(), site.ip);
        // Built on the site's runtime: nothing of it may run outside the namespace.
        let t = rt
            .run(async move {
                AutoTransport::builder()
                    .relay_url(url)
                    .no_proxy()
                    .bootstrap(bootstrap)
                    .bind_addr(SocketAddrV4::new(ip, 0))
                    .timeout(Duration::from_secs(10))
                    .handshake_timeout(Duration::from_secs(5))
                    // The default idle timeout (10 s): a path that breaks is noticed in 2 s,
                    // and the connection must outlive that.
                    .keep_alive(Duration::from_millis(500), Duration::from_secs(10))
                    .hyperswarm(|h| {
                        // Tuned for the testnet: its nodes answer at once.
                        h.dht_server_mode(true)
                            .dht_request_timeout(Duration::from_millis(250))
                            .lookup_interval(Duration::from_secs(2))
                    })
                    .build()
                    .unwrap()
            })
            .await;
        Peer {
            site,
            rt,
            t: Some(t),
            rx: None,
        }
    }

    /// Removes the peer's site (after [`Peer::stop`]).
    pub(crate) fn remove(&mut self, peer: Peer) {
        let site = peer.site.clone();
        drop(peer);
        self.lab.remove_site(&self.public, &site);
    }

    /// Stops the relay and the testnet.
    pub(crate) fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            self.rt.block_on(relay.shutdown());
        }
        drop(self.testnet.take());
    }
}

/// An Auto transport at a site, on a runtime inside the site's host namespace.
pub(crate) struct Peer {
    // Dropped in this order: the transport before its runtime.
    t: Option<AutoTransport>,
    /// The connection receiver of the topic it joined (kept open).
    pub(crate) rx: Option<mpsc::Receiver<Box<dyn Connection>>>,
    pub(crate) rt: NsRuntime,
    pub(crate) site: Site,
}

impl Peer {
    pub(crate) fn t(&self) -> &AutoTransport {
        self.t
            .as_ref()
            .expect("the transport is here between calls")
    }

    /// Joins `topic` (on the peer's runtime) and waits for the first connection.
    pub(crate) async fn join(&mut self, topic: TopicHash) -> anyhow::Result<Box<dyn Connection>> {
        let mut t = self.t.take().expect("the transport is here between calls");
        let (t, r) = self
            .rt
            .run(async move {
                let r = async {
                    let mut rx = t.connect(topic).await?;
                    let conn = tokio::time::timeout(T, rx.recv())
                        .await
                        .map_err(|_| anyhow::anyhow!("no connection within {T:?}"))?
                        .ok_or_else(|| anyhow::anyhow!("the connection receiver ended"))?;
                    anyhow::Ok((rx, conn))
                }
                .await;
                (t, r)
            })
            .await;
        self.t = Some(t);
        let (rx, conn) = r?;
        self.rx = Some(rx);
        Ok(conn)
    }

    /// The path of this peer's connection(s) to `peer_id` (every one listed).
    pub(crate) fn paths_to(&self, peer_id: &str) -> Vec<PeerPath> {
        self.t()
            .paths()
            .into_iter()
            .filter(|p| p.peer_id == peer_id)
            .map(|p| p.path)
            .collect()
    }

    /// Whether every connection to `peer_id` is direct (and there is one).
    pub(crate) fn direct_to(&self, peer_id: &str) -> bool {
        let paths = self.paths_to(peer_id);
        !paths.is_empty() && paths.iter().all(|p| matches!(p, PeerPath::Direct(_)))
    }

    /// What the peer knows of its network, for messages.
    pub(crate) fn diagnostics(&self) -> String {
        let t = self.t();
        format!(
            "public {:?}, local {:?}, path stats {:?}, relay errors {:?}, dial failures {:?}",
            t.hyperswarm().public_addr(),
            t.local_addr(),
            t.path_stats(),
            t.relay_errors(),
            t.hyperswarm()
                .dial_failures()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        )
    }

    /// Disconnects (on the peer's runtime).
    pub(crate) async fn stop(&mut self) {
        if let Some(mut t) = self.t.take() {
            let _ = self.rt.run(async move { t.disconnect().await }).await;
        }
        self.rx = None;
    }
}

/// Polls `cond` every 5 ms until it holds (the time it did) or `within` passes (`None`).
pub(crate) async fn wait_until(
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `nat` names, `x×y`.
pub(crate) fn pair_name(x: Nat, y: Nat) -> String {
    format!("{}x{}", x.name(), y.name())
}

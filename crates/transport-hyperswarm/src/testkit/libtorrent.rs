//! A private DHT of libtorrent 2.0 nodes (the implementation most of the public mainline DHT
//! runs), for tests and benchmarks that must meet real DHT nodes rather than the `mainline`
//! crate's own: a Python script (`libtorrent_dht.py`, run with the interpreter that has
//! Debian's `python3-libtorrent`) starts the nodes on one private address and reports every
//! DHT packet they exchange with anyone else, so a test can assert what our sockets sent and
//! received.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{HyperswarmTransport, HyperswarmTransportBuilder};

/// The script that runs the nodes.
const SCRIPT: &str = include_str!("libtorrent_dht.py");

/// Interpreters tried, in order: Debian's `python3-libtorrent` installs for the system
/// Python, which a `python3` earlier on `PATH` (pyenv, a venv) may not see.
const PYTHONS: [&str; 2] = ["/usr/bin/python3", "python3"];

/// How long the nodes may take to start and know each other.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Packets kept; later ones are counted, not kept (a test runs far fewer).
const MAX_PACKETS: usize = 200_000;

/// One KRPC packet between a libtorrent node and an endpoint that is not one of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhtPacket {
    /// When the script saw it, from when the DHT was ready ([`LibtorrentDht::ready_at`]).
    pub at: Duration,
    /// The libtorrent node.
    pub node: SocketAddrV4,
    /// Whether the libtorrent node received it (`false`: sent it).
    pub incoming: bool,
    /// The other endpoint.
    pub peer: SocketAddrV4,
    /// The KRPC kind: `q` (query), `r` (reply), `e` (error), `?` (not KRPC).
    pub kind: String,
    /// The query method (`ping`, `get_peers`, `announce_peer`, ...), for queries.
    pub method: Option<String>,
    /// Whether the message carries `ro: 1` (BEP 43: the sender is a read-only node).
    pub read_only: bool,
    /// The sender's node id (hex), when the message names one.
    pub id: Option<String>,
    /// The nodes a reply lists (`nodes`: other DHT nodes for the asker to query).
    pub nodes: Vec<SocketAddrV4>,
}

impl DhtPacket {
    /// Whether this is a query named `method` sent by `from` to a libtorrent node.
    pub fn is_query_from(&self, from: SocketAddrV4, method: &str) -> bool {
        self.incoming
            && self.peer == from
            && self.kind == "q"
            && self.method.as_deref() == Some(method)
    }

    /// Whether this is a query a libtorrent node sent to `to`.
    pub fn is_query_to(&self, to: SocketAddrV4) -> bool {
        !self.incoming && self.peer == to && self.kind == "q"
    }

    /// Parses `PKT <ms> <node port> <in|out> <ip:port> <y> <q> <ro> <id> <nodes>`.
    fn parse(line: &str, ip: Ipv4Addr) -> Option<Self> {
        let mut f = line.strip_prefix("PKT ")?.split_whitespace();
        let ms: u64 = f.next()?.parse().ok()?;
        let node = SocketAddrV4::new(ip, f.next()?.parse().ok()?);
        let incoming = f.next()? == "in";
        let peer = f.next()?.parse().ok()?;
        let kind = f.next()?.to_owned();
        let method = Some(f.next()?).filter(|m| *m != "-").map(str::to_owned);
        let read_only = f.next()? == "1";
        let id = Some(f.next()?).filter(|i| *i != "-").map(str::to_owned);
        let nodes = match f.next()? {
            "-" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Self {
            at: Duration::from_millis(ms),
            node,
            incoming,
            peer,
            kind,
            method,
            read_only,
            id,
            nodes,
        })
    }
}

/// A private DHT of libtorrent session nodes on one address (e.g. 127.0.0.1). Dropping it
/// stops the nodes.
#[derive(Debug)]
pub struct LibtorrentDht {
    child: Child,
    stdin: Option<ChildStdin>,
    bootstrap: Vec<String>,
    ready_at: Instant,
    packets: Arc<Mutex<Vec<DhtPacket>>>,
}

impl LibtorrentDht {
    /// The Python interpreter that can `import libtorrent`, if any (Debian:
    /// `apt-get install python3-libtorrent`).
    pub fn python() -> Option<&'static str> {
        PYTHONS.into_iter().find(|python| {
            Command::new(python)
                .args(["-c", "import libtorrent"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Starts `nodes` libtorrent nodes on `ip` that know each other, off the async workers.
    pub async fn start(nodes: usize, ip: Ipv4Addr) -> anyhow::Result<Self> {
        Self::start_in(&[], nodes, ip).await
    }

    /// [`LibtorrentDht::start`] with the script run under `prefix` (a command and its
    /// arguments, e.g. `["ip", "netns", "exec", "ns"]` to run the nodes in a network
    /// namespace).
    pub async fn start_in(prefix: &[&str], nodes: usize, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let prefix: Vec<String> = prefix.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || Self::start_blocking(&prefix, nodes, ip))
            .await
            .context("the task starting the libtorrent DHT failed")?
    }

    fn start_blocking(prefix: &[String], nodes: usize, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let python = Self::python()
            .context("no Python with libtorrent (apt-get install python3-libtorrent)")?;
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(python);
                c
            }
            None => Command::new(python),
        };
        let mut child = command
            .args(["-c", SCRIPT, &nodes.to_string(), &ip.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {python} (under {prefix:?})"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take();
        // The first line names the nodes; read it on a thread so a stuck script times out.
        let (tx, rx) = std::sync::mpsc::channel();
        let packets = Arc::new(Mutex::new(Vec::new()));
        let sink = packets.clone();
        std::thread::Builder::new()
            .name("libtorrent-dht-reader".into())
            .spawn(move || read_lines(stdout, ip, tx, sink))
            .context("cannot start the reader thread")?;
        let Ok(bootstrap) = rx.recv_timeout(START_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the libtorrent DHT did not start within {START_TIMEOUT:?}");
        };
        Ok(Self {
            child,
            stdin,
            bootstrap,
            ready_at: Instant::now(),
            packets,
        })
    }

    /// The nodes' addresses (`ip:port`), to bootstrap from.
    pub fn bootstrap(&self) -> &[String] {
        &self.bootstrap
    }

    /// When the nodes were ready (packet times count from here, within a few milliseconds).
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// The packets exchanged with endpoints other than the nodes so far, in order.
    pub fn packets(&self) -> Vec<DhtPacket> {
        self.packets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A builder for a transport bound to `bind` using these nodes, with every other setting
    /// at its default, as on the public network (a read-only DHT node, the default DHT
    /// request timeout).
    pub fn builder(&self, bind: Ipv4Addr) -> HyperswarmTransportBuilder {
        HyperswarmTransport::builder()
            .bootstrap(self.bootstrap.clone())
            .bind_addr(SocketAddrV4::new(bind, 0))
    }

    /// Stops the nodes (closing the script's stdin ends it), off the async workers.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || self.stop_blocking())
            .await
            .context("the task stopping the libtorrent DHT failed")
    }

    fn stop_blocking(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LibtorrentDht {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.stdin = None;
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the script's output: the bootstrap line (sent to `first`), then packets.
fn read_lines(
    stdout: std::process::ChildStdout,
    ip: Ipv4Addr,
    first: std::sync::mpsc::Sender<Vec<String>>,
    packets: Arc<Mutex<Vec<DhtPacket>>>,
) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { return };
        if let Some(nodes) = line.strip_prefix("BOOTSTRAP ") {
            let _ = first.send(nodes.split(',').map(str::to_owned).collect());
        } else if let Some(packet) = DhtPacket::parse(&line, ip) {
            let mut kept = packets.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() < MAX_PACKETS {
                kept.push(packet);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_packet_lines() {
        let ip = Ipv4Addr::LOCALHOST;
        let p = DhtPacket::parse(
            "PKT 12 4000 in 127.0.0.1:5000 q ping 1 6161616161616161616161616161616161616161 -",
            ip,
        )
        .unwrap();
        assert_eq!(p.at, Duration::from_millis(12));
        assert_eq!(p.node, "127.0.0.1:4000".parse().unwrap());
        assert!(p.is_query_from("127.0.0.1:5000".parse().unwrap(), "ping"));
        assert!(p.read_only);
        assert_eq!(
            p.id.as_deref(),
            Some("6161616161616161616161616161616161616161")
        );
        let r = DhtPacket::parse(
            "PKT 13 4000 out 127.0.0.1:5000 r - 0 - 127.0.0.1:1,127.0.0.1:2",
            ip,
        )
        .unwrap();
        assert!(!r.incoming && r.method.is_none() && r.id.is_none() && !r.read_only);
        assert_eq!(
            r.nodes,
            [
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ]
        );
        assert!(!r.is_query_to("127.0.0.1:5000".parse().unwrap()));
        assert!(DhtPacket::parse("BOOTSTRAP 1", ip).is_none());
        assert!(DhtPacket::parse("PKT x", ip).is_none());
    }
}

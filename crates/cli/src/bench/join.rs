//! Time from joining a topic to the first message, for `pluresdb-sync bench hyperswarm`: fresh
//! pairs of transports, (a) both joining at once (neither is on the DHT yet: one's announcement
//! has to land before the other's lookup can find it), (b) the second joining a topic the
//! first has announced already (what a replica coming online meets). Median and p90 of each.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pluresdb_sync::{Connection, HyperswarmTransport, Transport};
use pluresdb_sync_core::testkit::fresh_topic;

use super::quantile;

/// How long one pair may take before the measurement fails.
const WAIT: Duration = Duration::from_secs(30);

/// The join times measured, sorted.
#[derive(Debug, Default)]
pub(super) struct JoinTimes {
    /// Both peers call `connect` at the same moment; until B has A's first message.
    pub(super) together: Vec<Duration>,
    /// A has announced and joined; from B's `connect` until B has A's first message.
    pub(super) second: Vec<Duration>,
}

impl JoinTimes {
    /// Table rows: the name, the median and the p90 in ms.
    pub(super) fn rows(&self) -> [(&'static str, f64, f64); 2] {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let row = |name, v: &[Duration]| (name, ms(quantile(v, 0.5)), ms(quantile(v, 0.9)));
        [
            row("both joining at once", &self.together),
            row("one already announced", &self.second),
        ]
    }
}

/// Times `pairs` fresh pairs from `make` each way.
pub(super) async fn measure(
    make: &impl Fn() -> anyhow::Result<HyperswarmTransport>,
    pairs: usize,
) -> anyhow::Result<JoinTimes> {
    let mut times = JoinTimes::default();
    for i in 0..pairs.max(1) {
        let t = together(make()?, make()?).await?;
        let s = second(make()?, make()?).await?;
        eprintln!(
            "  pair {i}: both at once {:.0} ms, one announced {:.0} ms",
            t.as_secs_f64() * 1000.0,
            s.as_secs_f64() * 1000.0
        );
        times.together.push(t);
        times.second.push(s);
    }
    times.together.sort();
    times.second.sort();
    Ok(times)
}

/// Both connect at once; until B receives A's first message.
async fn together(
    mut a: HyperswarmTransport,
    mut b: HyperswarmTransport,
) -> anyhow::Result<Duration> {
    let topic = fresh_topic("bench-join");
    let started = Instant::now();
    let (ra, rb) = tokio::join!(a.connect(topic), b.connect(topic));
    let (mut ra, mut rb) = (ra?, rb?);
    let (ca, cb) = tokio::join!(
        tokio::time::timeout(WAIT, ra.recv()),
        tokio::time::timeout(WAIT, rb.recv())
    );
    let mut ca = ca.context("A found no peer")?.context("A ended")?;
    let mut cb = cb.context("B found no peer")?.context("B ended")?;
    ca.send(b"first").await?;
    expect_first(cb.as_mut()).await?;
    let took = started.elapsed();
    a.disconnect().await?;
    b.disconnect().await?;
    Ok(took)
}

/// A announces and joins first; from B's `connect` until B receives A's first message.
async fn second(
    mut a: HyperswarmTransport,
    mut b: HyperswarmTransport,
) -> anyhow::Result<Duration> {
    let topic = fresh_topic("bench-join-second");
    a.announce(topic).await?;
    let mut ra = a.connect(topic).await?;
    let greeter = tokio::spawn(async move {
        let mut conn = tokio::time::timeout(WAIT, ra.recv())
            .await
            .context("A found no peer")?
            .context("A ended")?;
        conn.send(b"first").await?;
        anyhow::Ok((ra, conn))
    });
    let started = Instant::now();
    let mut rb = b.connect(topic).await?;
    let mut cb = tokio::time::timeout(WAIT, rb.recv())
        .await
        .context("B found no peer")?
        .context("B ended")?;
    expect_first(cb.as_mut()).await?;
    let took = started.elapsed();
    let _kept = greeter.await??;
    a.disconnect().await?;
    b.disconnect().await?;
    Ok(took)
}

async fn expect_first(conn: &mut dyn Connection) -> anyhow::Result<()> {
    let got = tokio::time::timeout(WAIT, conn.receive())
        .await
        .context("first message timed out")??;
    if got.as_deref() != Some(&b"first"[..]) {
        bail!("first message arrived as {got:?}");
    }
    Ok(())
}

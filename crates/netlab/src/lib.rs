//! Test plumbing of pluresdb-sync's scenario tests (dev only, never published): private
//! networks made of Linux network namespaces on this machine, and ways to run code in them.
//! Needs root and `ip` (iproute2); NAT routers also `iptables`, and flushing their mappings
//! `conntrack`.
//!
//! - [`Lab`]: the namespaces of one test, with names unique to the process (and to the lab
//!   within it), removed when the lab is dropped, also when the test panics; namespaces
//!   left by a killed run are removed by the next lab. Bridges and veth links between them.
//! - [`PublicNet`] and [`Site`]: a "public" segment (a bridge) and peers on it, each either
//!   plugged in directly or behind a NAT router namespace of a [`Nat`] kind:
//!   endpoint-independent mapping (`MASQUERADE`) or endpoint-dependent "symmetric" mapping
//!   (`MASQUERADE --random-fully`), both dropping unsolicited inbound packets as home
//!   routers do.
//! - [`Netns`]: one namespace: run a command in it, a closure on a thread inside it, a tokio
//!   runtime whose every thread is inside it ([`NsRuntime`]), or a test of the current test
//!   binary as a child process inside it ([`Netns::test_child`]).
//!
//! Nothing here touches the host's own interfaces, routes or iptables rules: every command
//! runs inside a namespace the lab made.
//!
//! ```no_run
//! use pluresdb_sync_netlab::{Lab, Nat};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut lab = Lab::new("doc")?;
//! let public = lab.public_net(211)?;
//! let site = lab.site(&public, 1, Nat::Eim)?;
//! let rt = site.host.runtime(2)?;
//! let ip = site.ip;
//! let addr = rt.block_on(async move {
//!     let s = tokio::net::UdpSocket::bind((ip, 0)).await?;
//!     s.local_addr()
//! })?;
//! println!("bound {addr} behind a NAT");
//! # Ok(())
//! # }
//! ```

mod lab;
mod nat;
mod netns;

pub use lab::Lab;
pub use nat::{Nat, PublicNet, Site};
pub use netns::{Netns, NsRuntime};

use std::process::Command;

use anyhow::{Context, bail};

/// Runs `args` (program first) and returns its standard output; an error with its standard
/// error when it fails.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let Some((program, rest)) = args.split_first() else {
        bail!("run: no program given");
    };
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("starting {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process is root and every program of `tools` can be started (it is run
/// once with `-V`; only whether it starts counts).
pub fn have_root_tools(tools: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    root && tools
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok())
}

/// Whether `test` can run: root and `tools` present. When not, in CI (`CI` set) it panics
/// with what is missing (`scripts/test` installs the tools); elsewhere it prints that the
/// test is skipped and returns `false`.
pub fn prerequisites(test: &str, tools: &[&str]) -> bool {
    if have_root_tools(tools) {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{test} needs root and {tools:?}; scripts/test installs them"
    );
    eprintln!("skipped {test}: needs root and {tools:?}");
    false
}

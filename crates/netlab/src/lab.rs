//! `Lab`: the namespaces of one test, with names unique to the process and to the lab, and
//! their removal: on drop (also when the test panics), one by one, and of the namespaces a
//! killed run left behind. Bridges and veth links between its namespaces.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

use crate::netns::Netns;
use crate::run;

/// Every lab namespace's name starts with this, then `<tag>-<pid>-<lab>-<suffix>`.
const PREFIX: &str = "nl-";

/// Labs made by this process so far (two tests of one process get different names).
static LABS: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one test, and child processes to end with it. Dropping it kills the
/// children and deletes the namespaces (with their interfaces, routes and iptables rules).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// A lab whose namespaces are named `nl-<tag>-<pid>-<n>-<suffix>` (`tag`: a few letters
    /// naming the test, no `-`). First removes lab namespaces whose process is gone.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        if tag.is_empty() || tag.contains(['-', '/']) {
            bail!("lab tag {tag:?}: must be non-empty, without '-' or '/'");
        }
        remove_stale_namespaces();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            prefix: format!("{PREFIX}{tag}-{}-{n}-", std::process::id()),
            namespaces: Vec::new(),
            children: Vec::new(),
        })
    }

    /// The start of this lab's namespace names (unique to the lab; also good in topic
    /// names).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A new namespace `<prefix><suffix>` with loopback up.
    pub fn namespace(&mut self, suffix: &str) -> anyhow::Result<Netns> {
        let name = format!("{}{suffix}", self.prefix);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(Netns::new(name))
    }

    /// Deletes `ns` now (its interfaces go with it; veth peers in other namespaces too).
    pub fn remove(&mut self, ns: &Netns) {
        if let Some(pos) = self.namespaces.iter().position(|n| n == ns.name()) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns.name()])
                .output();
            self.namespaces.remove(pos);
        }
    }

    /// A bridge `br` in `ns`, up, with `cidr` on it if given.
    pub fn bridge(&self, ns: &Netns, br: &str, cidr: Option<&str>) -> anyhow::Result<()> {
        ns.ip(&["link", "add", br, "type", "bridge"])?;
        if let Some(cidr) = cidr {
            ns.ip(&["addr", "add", cidr, "dev", br])?;
        }
        ns.ip(&["link", "set", br, "up"])?;
        Ok(())
    }

    /// A veth pair: `a` in `a_ns`, `b` in `b_ns`, both up; `a` joins bridge `a_bridge` and
    /// `b` gets `b_cidr` when given. Interface names live in their namespaces, so short
    /// ones are unique (at most 15 characters).
    pub fn veth(
        &self,
        (a_ns, a, a_bridge): (&Netns, &str, Option<&str>),
        (b_ns, b, b_cidr): (&Netns, &str, Option<&str>),
    ) -> anyhow::Result<()> {
        a_ns.ip(&[
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            b_ns.name(),
        ])?;
        if let Some(br) = a_bridge {
            a_ns.ip(&["link", "set", a, "master", br])?;
        }
        a_ns.ip(&["link", "set", a, "up"])?;
        if let Some(cidr) = b_cidr {
            b_ns.ip(&["addr", "add", cidr, "dev", b])?;
        }
        b_ns.ip(&["link", "set", b, "up"])?;
        Ok(())
    }

    /// Plugs `host_ns` into bridge `br` of `bridge_ns` with a veth `<tag>a` (bridge side) /
    /// `<tag>b` (host side, with `cidr`); returns the host end's name.
    pub fn plug(
        &self,
        bridge_ns: &Netns,
        br: &str,
        host_ns: &Netns,
        tag: &str,
        cidr: &str,
    ) -> anyhow::Result<String> {
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        self.veth((bridge_ns, &a, Some(br)), (host_ns, &b, Some(cidr)))?;
        Ok(b)
    }

    /// Ends `child` (kill and wait) when the lab is dropped.
    pub fn keep(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The pid in a lab namespace name (`nl-<tag>-<pid>-...`), if it is one.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.split('-');
    let _tag = parts.next()?;
    parts.next()?.parse().ok()
}

/// Removes lab namespaces whose process is gone (a run that was killed).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(pid) = owner(name)
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_reads_the_pid_of_lab_names_only() {
        assert_eq!(owner("nl-nat-4242-0-p"), Some(4242));
        assert_eq!(owner("nl-nat-4242-3-r12"), Some(4242));
        assert_eq!(owner("nl-nat-x42-0-p"), None);
        assert_eq!(owner("hs1a2bp"), None);
        assert_eq!(owner("nl-"), None);
    }

    #[test]
    fn a_tag_with_a_dash_is_refused_and_labs_get_distinct_prefixes() {
        assert!(Lab::new("a-b").is_err());
        assert!(Lab::new("").is_err());
        let (a, b) = (Lab::new("t").unwrap(), Lab::new("t").unwrap());
        assert_ne!(a.prefix(), b.prefix());
        assert!(
            a.prefix()
                .starts_with(&format!("nl-t-{}-", std::process::id()))
        );
    }
}

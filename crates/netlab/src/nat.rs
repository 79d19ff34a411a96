//! A private internet: a "public" segment (a bridge in a namespace of its own, 10.N.0.0/24)
//! and sites on it, each a host plugged in directly or behind a NAT router namespace of a
//! [`Nat`] kind. How the routers are built, and why they drop unsolicited input, is in
//! [`Nat`].

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

use crate::lab::Lab;
use crate::netns::Netns;

/// How a site reaches the public segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nat {
    /// Plugged into the public bridge: its own address is public.
    None,
    /// Behind a router with endpoint-independent mapping ("eim"): `MASQUERADE`, which keeps
    /// the source port when it can, so one local socket has one public address whatever
    /// the destination; filtering is address-and-port dependent (a "port-restricted
    /// cone").
    Eim,
    /// Behind a router with endpoint-dependent ("symmetric") mapping: `MASQUERADE
    /// --random-fully`, a new random public port per destination.
    Sym,
}

impl Nat {
    /// Every kind, in matrix order.
    pub const ALL: [Nat; 3] = [Nat::None, Nat::Eim, Nat::Sym];

    /// Its short name: `none`, `eim` or `sym`.
    pub fn name(self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Eim => "eim",
            Nat::Sym => "sym",
        }
    }

    /// Every unordered pair of kinds (none×none, none×eim, none×sym, eim×eim, eim×sym,
    /// sym×sym).
    pub fn pairs() -> Vec<(Nat, Nat)> {
        let mut out = Vec::new();
        for (i, &x) in Nat::ALL.iter().enumerate() {
            for &y in &Nat::ALL[i..] {
                out.push((x, y));
            }
        }
        out
    }
}

/// The public segment: namespace `<prefix>p` with bridge `br0` at 10.N.0.1/24. Services
/// the sites share (a DHT testnet, a relay) run in this namespace, on [`PublicNet::gateway`].
#[derive(Clone, Debug)]
pub struct PublicNet {
    /// The namespace holding the bridge.
    pub ns: Netns,
    octet: u8,
}

impl PublicNet {
    /// The bridge's address, 10.N.0.1.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 1)
    }

    /// The public (WAN) address of site `idx`: 10.N.0.(10 + idx).
    pub fn site_ip(&self, idx: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 10 + idx)
    }

    /// The private subnet behind site `idx`'s router: 10.(N + 1).idx.0/24, the router at
    /// .1 and the host at .2.
    fn lan(&self, idx: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet.wrapping_add(1), idx, host)
    }
}

/// A peer's site: the namespace it runs in, and the router in front of it (if any).
#[derive(Clone, Debug)]
pub struct Site {
    /// The site's number on the public segment.
    pub idx: u8,
    /// How it reaches the public segment.
    pub nat: Nat,
    /// The namespace the peer runs in.
    pub host: Netns,
    /// The NAT router's namespace (`None` for [`Nat::None`]).
    pub router: Option<Netns>,
    /// The host's own address (public for [`Nat::None`], private behind a router).
    pub ip: Ipv4Addr,
    /// The site's address on the public segment (the host's or its router's).
    pub wan_ip: Ipv4Addr,
    /// The bridge side of the site's veth, in the public namespace.
    uplink: String,
}

impl Site {
    /// Flushes the router's NAT mappings and connection tracking (`conntrack -F`, needs
    /// `conntrack`): what a router reboot or a mapping timeout does to live flows. The
    /// next packet out makes a new mapping; packets coming in before that are dropped.
    /// Returns how many entries there were just before.
    pub fn flush_nat(&self) -> anyhow::Result<u64> {
        let Some(router) = &self.router else {
            bail!("site {} has no NAT router to flush", self.idx);
        };
        let count = router.exec(&["conntrack", "-C"])?;
        let count = count
            .trim()
            .parse()
            .with_context(|| format!("conntrack -C printed {count:?}"))?;
        router.exec(&["conntrack", "-F"])?;
        Ok(count)
    }
}

impl Site {
    /// Moves the site to a new public address `wan_ip` (on the public segment; the host
    /// keeps its own address behind the router): what a router does when its ISP
    /// renumbers it or the device roams to another network. The router's WAN address
    /// changes and its NAT mappings and connection tracking are flushed, so every flow
    /// leaves from the new address from its next packet on. Only for sites behind a
    /// router.
    pub fn renumber(&mut self, wan_ip: Ipv4Addr) -> anyhow::Result<()> {
        let Some(router) = &self.router else {
            bail!("site {} has no NAT router to renumber", self.idx);
        };
        let wan = format!("r{}b", self.idx);
        // The old one first: deleting a primary address deletes its secondaries too.
        router.ip(&["addr", "del", &format!("{}/24", self.wan_ip), "dev", &wan])?;
        router.ip(&["addr", "add", &format!("{wan_ip}/24"), "dev", &wan])?;
        router.exec(&["conntrack", "-F"])?;
        self.wan_ip = wan_ip;
        Ok(())
    }
}

impl Lab {
    /// The public segment 10.`octet`.0.0/24 (its private subnets behind routers are
    /// 10.(`octet` + 1).idx.0/24).
    pub fn public_net(&mut self, octet: u8) -> anyhow::Result<PublicNet> {
        let ns = self.namespace("p")?;
        let net = PublicNet { ns, octet };
        self.bridge(&net.ns, "br0", Some(&format!("{}/24", net.gateway())))?;
        Ok(net)
    }

    /// Site `idx` (1..=200) on `public`, reached as `nat` says. Namespaces `<prefix>h<idx>`
    /// (the host) and `<prefix>r<idx>` (its router).
    pub fn site(&mut self, public: &PublicNet, idx: u8, nat: Nat) -> anyhow::Result<Site> {
        if !(1..=200).contains(&idx) {
            bail!("site number {idx}: must be 1..=200");
        }
        let wan_ip = public.site_ip(idx);
        let wan_cidr = format!("{wan_ip}/24");
        if nat == Nat::None {
            let host = self.namespace(&format!("h{idx}"))?;
            let tag = format!("h{idx}");
            self.plug(&public.ns, "br0", &host, &tag, &wan_cidr)?;
            return Ok(Site {
                idx,
                nat,
                host,
                router: None,
                ip: wan_ip,
                wan_ip,
                uplink: format!("{tag}a"),
            });
        }
        let router = self.namespace(&format!("r{idx}"))?;
        let host = self.namespace(&format!("h{idx}"))?;
        let tag = format!("r{idx}");
        let wan = self.plug(&public.ns, "br0", &router, &tag, &wan_cidr)?;
        let (gw, ip) = (public.lan(idx, 1), public.lan(idx, 2));
        self.veth(
            (&router, &format!("l{idx}r"), None),
            (&host, &format!("l{idx}h"), Some(&format!("{ip}/24"))),
        )?;
        router.ip(&[
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            &format!("l{idx}r"),
        ])?;
        host.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let mut masq = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &wan,
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::Sym {
            masq.push("--random-fully");
        }
        router.exec(&masq)?;
        // Like a home router: drop unsolicited input on the WAN side. Without it the first
        // unsolicited punch packet leaves a conntrack entry for a flow to the router itself,
        // MASQUERADE then cannot reuse that port for the host behind it, and punching
        // between two port-preserving NATs fails. (A dropped packet's entry is never
        // confirmed.)
        router.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-i",
            &wan,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ])?;
        Ok(Site {
            idx,
            nat,
            host,
            router: Some(router),
            ip,
            wan_ip,
            uplink: format!("{tag}a"),
        })
    }

    /// Removes `site`'s namespaces, the bridge side of its link first (namespace removal
    /// finishes asynchronously, and a next site may reuse the interface name).
    pub fn remove_site(&mut self, public: &PublicNet, site: &Site) {
        let _ = Command::new("ip")
            .args(["-n", public.ns.name(), "link", "del", &site.uplink])
            .output();
        self.remove(&site.host);
        if let Some(r) = &site.router {
            self.remove(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_six_pairs_in_matrix_order() {
        let names: Vec<String> = Nat::pairs()
            .iter()
            .map(|(x, y)| format!("{}x{}", x.name(), y.name()))
            .collect();
        assert_eq!(
            names,
            [
                "nonexnone",
                "nonexeim",
                "nonexsym",
                "eimxeim",
                "eimxsym",
                "symxsym"
            ]
        );
    }

    #[test]
    fn addresses_of_the_public_segment_and_the_lans() {
        let net = PublicNet {
            ns: Netns::new("x".into()),
            octet: 211,
        };
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 211, 0, 1));
        assert_eq!(net.site_ip(2), Ipv4Addr::new(10, 211, 0, 12));
        assert_eq!(net.lan(2, 1), Ipv4Addr::new(10, 212, 2, 1));
    }
}

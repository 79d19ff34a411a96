//! The testkit itself, for real (needs root, `ip` and `iptables`): the NAT kinds map as they
//! claim (eim: one public port for every destination; sym: one per destination; none: the
//! host's own address), routers drop unsolicited input, code in a namespace runtime or
//! closure talks on the namespace's network only, and a lab's namespaces are gone after it
//! is dropped, also when the test panicked.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use pluresdb_sync_netlab::{Lab, Nat, prerequisites};

fn namespaces() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// Where the public segment saw a datagram from each of the site's one socket, sent to two
/// different public sockets.
fn seen_from(nat: Nat) -> (SocketAddr, SocketAddr, std::net::Ipv4Addr, bool) {
    let mut lab = Lab::new("kit").unwrap();
    let public = lab.public_net(201).unwrap();
    let site = lab.site(&public, 2, nat).unwrap();
    let gw = public.gateway();
    let (s1, s2) = public
        .ns
        .run(|| {
            let s1 = UdpSocket::bind((gw, 0)).unwrap();
            let s2 = UdpSocket::bind((gw, 0)).unwrap();
            (s1, s2)
        })
        .unwrap();
    let (to1, to2) = (s1.local_addr().unwrap(), s2.local_addr().unwrap());
    let ip = site.ip;
    let host = site
        .host
        .run(move || {
            let s = UdpSocket::bind((ip, 0)).unwrap();
            s.send_to(b"one", to1).unwrap();
            s.send_to(b"two", to2).unwrap();
            s
        })
        .unwrap();
    let mut buf = [0u8; 16];
    s1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_, from1) = s1.recv_from(&mut buf).unwrap();
    let (_, from2) = s2.recv_from(&mut buf).unwrap();
    // Unsolicited: a third public socket writes to the mapping it never talked to.
    let s3 = public
        .ns
        .run(move || UdpSocket::bind((gw, 0)).unwrap())
        .unwrap();
    s3.send_to(b"unsolicited", from1).unwrap();
    // And an answer from a socket it did talk to (through the mapping).
    s1.send_to(b"answer", from1).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got_unsolicited = false;
    let mut got_answer = false;
    while let Ok((n, _)) = host.recv_from(&mut buf) {
        match &buf[..n] {
            b"unsolicited" => got_unsolicited = true,
            b"answer" => got_answer = true,
            _ => {}
        }
        if got_answer {
            host.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
    }
    assert!(
        got_answer,
        "{nat:?}: the answer through the mapping arrives"
    );
    (from1, from2, site.wan_ip, got_unsolicited)
}

#[test]
fn nat_kinds_map_and_filter_as_they_claim_root() {
    if !prerequisites(
        "nat_kinds_map_and_filter_as_they_claim_root",
        &["ip", "iptables"],
    ) {
        return;
    }
    let (a, b, wan, unsolicited) = seen_from(Nat::None);
    assert_eq!((a.ip(), b.ip()), (wan.into(), wan.into()));
    assert_eq!(a, b, "none: the host's own address");
    assert!(unsolicited, "none: no filter");

    let (a, b, wan, unsolicited) = seen_from(Nat::Eim);
    assert_eq!(
        (a.ip(), b.ip()),
        (wan.into(), wan.into()),
        "eim: the router's address"
    );
    assert_eq!(a.port(), b.port(), "eim: one mapping for both destinations");
    assert!(!unsolicited, "eim: unsolicited input dropped");

    let (a, b, wan, unsolicited) = seen_from(Nat::Sym);
    assert_eq!((a.ip(), b.ip()), (wan.into(), wan.into()));
    assert_ne!(a.port(), b.port(), "sym: a mapping per destination");
    assert!(!unsolicited, "sym: unsolicited input dropped");
}

#[test]
fn a_namespace_runtime_runs_inside_and_labs_clean_up_also_on_panic_root() {
    if !prerequisites(
        "a_namespace_runtime_runs_inside_…_root",
        &["ip", "iptables"],
    ) {
        return;
    }
    let mut lab = Lab::new("kit").unwrap();
    let public = lab.public_net(203).unwrap();
    let site = lab.site(&public, 7, Nat::Sym).unwrap();
    let prefix = lab.prefix().to_owned();
    assert!(namespaces().contains(&format!("{prefix}r7")));
    // Its workers and blocking threads are inside: they see the site's address, and only
    // the namespace's interfaces.
    let rt = site.host.runtime(2).unwrap();
    let ip = site.ip;
    let (bound, blocking) = rt.block_on(async move {
        let s = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
        let blocking = tokio::task::spawn_blocking(move || UdpSocket::bind((ip, 0)).is_ok())
            .await
            .unwrap();
        (s.local_addr().unwrap(), blocking)
    });
    assert_eq!(bound.ip(), std::net::IpAddr::from(ip));
    assert!(blocking, "a blocking thread is inside too");
    // Outside, the host namespace has no such address.
    assert!(UdpSocket::bind((ip, 0)).is_err());
    drop(rt);
    drop(lab);
    assert!(!namespaces().contains(&prefix), "{}", namespaces());

    // A test that panics while its lab is alive leaves nothing either.
    let prefix = std::panic::catch_unwind(|| {
        let mut lab = Lab::new("kit").unwrap();
        let public = lab.public_net(205).unwrap();
        let _site = lab.site(&public, 1, Nat::Eim).unwrap();
        let prefix = lab.prefix().to_owned();
        panic!("{prefix}");
    })
    .unwrap_err();
    let prefix = prefix.downcast_ref::<String>().unwrap();
    assert!(!namespaces().contains(prefix.as_str()), "{}", namespaces());
}

//! The root tests' namespace plumbing: a test runs a child of its own binary inside a
//! network namespace of its own (`ip netns exec`), so its iptables rules never touch the
//! host's network; the namespace (only loopback) is removed on drop, even when the test
//! fails.

use std::process::Command;

/// Whether this process may make namespaces and iptables rules.
pub(crate) fn have_root_tools() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let tools = ["ip", "iptables"].iter().all(|t| {
        Command::new(t).arg("-V").output().is_ok()
            || Command::new(t).arg("--version").output().is_ok()
    });
    root && tools
}

/// Runs a command; panics with its stderr when it fails.
pub(crate) fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's standard output; panics when it fails.
pub(crate) fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Drops (`-A`) or restores (`-D`) UDP to `ports` in this namespace.
pub(crate) fn udp_rule(op: &str, ports: &[u16]) {
    for port in ports {
        let port = port.to_string();
        run(&[
            "iptables", op, "INPUT", "-p", "udp", "--dport", &port, "-j", "DROP",
        ]);
    }
}

/// A namespace with only loopback (up), named after this process and `tag`, removed on
/// drop.
pub(crate) struct Namespace(pub(crate) String);

impl Namespace {
    pub(crate) fn new(tag: &str) -> Self {
        let ns = Self(format!("auto{:x}{tag}", std::process::id()));
        run(&["ip", "netns", "add", &ns.0]);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The parent half of a root test: skips (outside CI) without root, `ip` and `iptables`;
/// otherwise runs the ignored test `child` of this binary in a new namespace tagged `tag`
/// and asserts that it passed. Returns the child's standard output.
pub(crate) fn run_child_in_namespace(tag: &str, child: &str) -> Option<String> {
    if !have_root_tools() {
        assert!(
            std::env::var("CI").is_err(),
            "{child} needs root, ip (iproute2) and iptables; scripts/test installs them"
        );
        eprintln!("skipped: needs root, ip and iptables");
        return None;
    }
    let ns = Namespace::new(tag);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args(["--exact", child, "--ignored", "--nocapture"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the child failed");
    assert!(stdout.contains("1 passed"), "the child did not run");
    Some(stdout)
}

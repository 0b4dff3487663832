//! Hosts of their own for end-to-end tests: each a network namespace with one
//! interface on a bridge and its own address, made by the test and removed when the
//! [`Lan`] is dropped. The test itself stays on the machine's namespace, where the
//! bridge has the subnet's first address, so it reaches every host directly.
//!
//! Faults are made with the kernel's own tools: a cut link (`ip link set … down` on
//! the host's end of the bridge), a partition between two hosts (`blackhole` routes on
//! both), a slow link (`tc` token bucket on the host's egress). Needs root.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use super::mesh::Proc;

/// Runs `ip ARGS`; panics with its error output when it fails.
fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge and the hosts on it.
pub struct Lan {
    /// `ip netns` names and bridge-side interfaces (`e…`) are made from it.
    tag: String,
    bridge: String,
    /// The subnet's first three octets (`10.A.B`).
    prefix: String,
    hosts: Vec<String>,
}

/// A host on a [`Lan`].
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its address.
    pub ip: String,
    /// Its link's end on the bridge.
    outer: String,
}

impl Lan {
    /// A new bridge with its own /24; `None` when network namespaces cannot be made
    /// (not root) — a failure when the run requires every service.
    pub fn new() -> Option<Self> {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let bridge = format!("eb{tag}");
        let prefix = format!("10.{}.{n}", 100 + pid % 100);
        // A bridge left by a test killed before its clean-up goes first.
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        let made = Command::new("ip")
            .args(["link", "add", &bridge, "type", "bridge"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !made {
            assert!(
                std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "hosts of their own need root (ip link add … type bridge)"
            );
            eprintln!("skipped: cannot make a bridge for test hosts (not root?)");
            return None;
        }
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        Some(Self {
            tag,
            bridge,
            prefix,
            hosts: Vec::new(),
        })
    }

    /// A new host on the bridge, with the next address.
    pub fn host(&mut self, name: &str) -> Host {
        let i = self.hosts.len() + 2;
        let ns = format!("etlm{}-{name}", self.tag);
        let outer = format!("e{}h{i}", self.tag);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge]);
        ip(&["link", "set", &outer, "up"]);
        let addr = format!("{}.{i}", self.prefix);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Host {
            ns,
            ip: addr,
            outer,
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace's end of each link goes with it, and the bridge's end with that.
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

impl Host {
    /// Starts `etlmesh ARGS` on this host, in `dir`, with `env`.
    pub fn start(&self, dir: &Path, args: &[&str], env: &[(String, String)]) -> Proc {
        Proc::start_in_netns_env(&self.ns, dir, args, env)
    }

    /// `host:port` on this host's address.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    /// Cuts its link: nothing goes in or out, and nothing says so (no reset).
    pub fn cut(&self) {
        ip(&["link", "set", &self.outer, "down"]);
    }

    /// Mends the link [`Host::cut`] cut.
    pub fn mend(&self) {
        ip(&["link", "set", &self.outer, "up"]);
    }

    /// Nothing goes between this host and `other`, both ways; the rest still reach both.
    pub fn partition_from(&self, other: &Host) {
        ip(&["-n", &self.ns, "route", "add", "blackhole", &other.ip]);
        ip(&["-n", &other.ns, "route", "add", "blackhole", &self.ip]);
    }

    /// Ends [`Host::partition_from`].
    pub fn heal_from(&self, other: &Host) {
        ip(&["-n", &self.ns, "route", "del", "blackhole", &other.ip]);
        ip(&["-n", &other.ns, "route", "del", "blackhole", &self.ip]);
    }

    /// What it sends leaves at `rate` (`tc`'s units, `400kbit`) through a token bucket
    /// of one packet: its answers take time in proportion to their size.
    pub fn slow_link(&self, rate: &str) {
        run(
            "ip",
            &[
                "netns", "exec", &self.ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                "rate", rate, "burst", "3000", "latency", "2s",
            ],
        );
    }
}

//! Network namespaces for the chaos tests: a node runs in its own namespace, joined to the
//! root namespace by a veth pair with a private /30 (`10.250.x.y+1` on the root side,
//! `+2` inside), and can be partitioned from everything (`ip link set <veth> down`) and healed.
//!
//! Everything is done with `ip` (iproute2) as root. Names are unique per test process and per
//! namespace (`rdzvc-<pid>-<n>`, links `rzc<pid hex><n hex>{h,n}`), so parallel tests do not
//! collide; the namespace and the veth pair are deleted on drop, also when a test panics, and
//! [`NetNs::create`] first removes leftovers of test processes that no longer exist (killed
//! before their drop ran). Processes started in a namespace must be killed before it is
//! dropped (a namespace lives as long as a process in it).
//!
//! Traffic only goes between the two ends of the pair, both on this machine.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace name this module creates.
const NS_PREFIX: &str = "rdzvc-";

/// Prefix of every link name this module creates (at most 15 bytes in all).
const LINK_PREFIX: &str = "rzc";

/// Runs `ip <args>`; `Err` with its output if it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why network namespaces cannot be used here, or `None` if they can (root, `ip` works and a
/// namespace can be created and deleted).
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root (ip netns add)".into());
    }
    let probe = format!("{NS_PREFIX}probe-{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        return Some(e);
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

/// Deletes namespaces and links left by test processes that no longer exist.
pub fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["link", "del", &link_name(pid, ns_index(rest), 'h')]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ns_index(rest: &str) -> u32 {
    rest.split('-')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn link_name(pid: u32, index: u32, side: char) -> String {
    // 3 + 6 + 2 + 1 = 12 bytes (pid_max is at most 2^22 = 0x400000).
    format!(
        "{LINK_PREFIX}{:06x}{:02x}{side}",
        pid & 0xff_ffff,
        index & 0xff
    )
}

/// One network namespace with a veth pair to the root namespace; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_link: String,
    ns_link: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    partitioned: bool,
}

impl NetNs {
    /// Creates a namespace with loopback up and a veth pair to the root namespace, addresses
    /// on a /30 of 10.250.0.0/16 that no interface of the root namespace uses yet.
    pub fn create() -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        let used = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
        // A /30 per (process, namespace), probing forward from a hash of both.
        let start = (pid.wrapping_mul(2654435761) ^ index.wrapping_mul(40503)) % 16384;
        let (host_addr, ns_addr) = (0..16384)
            .map(|i| (start + i) % 16384)
            .map(|slot| {
                let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + slot * 4;
                (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
            })
            .find(|(h, n)| !used.contains(&format!(" {h}/")) && !used.contains(&format!(" {n}/")))
            .ok_or("no free /30 in 10.250.0.0/16")?;
        let ns = Self {
            name: format!("{NS_PREFIX}{pid}-{index}"),
            host_link: link_name(pid, index, 'h'),
            ns_link: link_name(pid, index, 'n'),
            host_addr,
            ns_addr,
            partitioned: false,
        };
        // From here on, drop cleans up whatever was created.
        ns.setup()?;
        Ok(ns)
    }

    fn setup(&self) -> Result<(), String> {
        let (name, h, n) = (&self.name, &self.host_link, &self.ns_link);
        ip(&["netns", "add", name])?;
        ip(&["link", "add", h, "type", "veth", "peer", "name", n])?;
        ip(&["link", "set", n, "netns", name])?;
        ip(&["addr", "add", &format!("{}/30", self.host_addr), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["link", "set", "lo", "up"])?;
        in_ns(&["addr", "add", &format!("{}/30", self.ns_addr), "dev", n])?;
        in_ns(&["link", "set", n, "up"])?;
        Ok(())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root namespace's end of the pair (listen here for the namespace's clients).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace's own address.
    pub fn ns_addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// The root-side link name.
    pub fn host_link(&self) -> &str {
        &self.host_link
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <ns> <program>`;
    /// `ip` execs the program, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = crate::common::command("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Cuts the namespace off (the root-side link goes down: packets are dropped, connections
    /// hang rather than fail).
    pub fn partition(&mut self) -> Result<(), String> {
        ip(&["link", "set", &self.host_link, "down"])?;
        self.partitioned = true;
        Ok(())
    }

    /// Undoes [`partition`](Self::partition).
    pub fn heal(&mut self) -> Result<(), String> {
        ip(&["link", "set", &self.host_link, "up"])?;
        self.partitioned = false;
        Ok(())
    }

    /// Whether the namespace is partitioned.
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end deletes the pair (the other end may be in the namespace).
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skips (with the reason) where namespaces cannot work; the reason is printed so that a
    /// skip is visible in the test output.
    fn skip() -> bool {
        match unavailable() {
            Some(why) => {
                eprintln!("skipped: {why}");
                true
            }
            None => false,
        }
    }

    fn namespaces() -> String {
        ip(&["netns", "list"]).unwrap_or_default()
    }

    fn has_namespace(name: &str) -> bool {
        namespaces()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    fn has_link(name: &str) -> bool {
        links().contains(&format!(" {name}@")) || links().contains(&format!(" {name}:"))
    }

    fn links() -> String {
        ip(&["-o", "link", "show"]).unwrap_or_default()
    }

    /// From inside the namespace, connect to `addr:port` with a bounded timeout; true on success.
    fn connects_from(ns: &NetNs, addr: Ipv4Addr, port: u16) -> bool {
        // bash's /dev/tcp under `timeout`: no extra tool needed.
        let status = ns
            .command("timeout")
            .args([
                "2",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{addr}/{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run a probe in the namespace");
        status.success()
    }

    #[test]
    fn a_namespace_reaches_the_host_until_partitioned_and_is_removed_on_drop() {
        if skip() {
            return;
        }
        let mut ns = NetNs::create().expect("create a namespace");
        let name = ns.name().to_string();
        let link = ns.host_link().to_string();
        assert!(has_namespace(&name), "{}", namespaces());
        assert!(has_link(&link), "{}", links());
        let listener =
            std::net::TcpListener::bind((ns.host_addr(), 0)).expect("listen on the host end");
        let port = listener.local_addr().unwrap().port();
        assert!(
            connects_from(&ns, ns.host_addr(), port),
            "the namespace cannot reach {}:{port}",
            ns.host_addr()
        );
        // Loopback inside the namespace is its own: the host's listener is not there.
        assert!(
            !connects_from(&ns, Ipv4Addr::LOCALHOST, port),
            "127.0.0.1 inside the namespace must not be the host's"
        );
        ns.partition().expect("partition");
        assert!(
            !connects_from(&ns, ns.host_addr(), port),
            "a partitioned namespace still reaches the host"
        );
        ns.heal().expect("heal");
        assert!(
            connects_from(&ns, ns.host_addr(), port),
            "a healed namespace cannot reach the host"
        );
        drop(ns);
        assert!(!has_namespace(&name), "namespace left: {}", namespaces());
        assert!(!has_link(&link), "link left: {}", links());
    }

    #[test]
    fn names_and_subnets_are_unique() {
        if skip() {
            return;
        }
        let a = NetNs::create().expect("namespace a");
        let b = NetNs::create().expect("namespace b");
        assert_ne!(a.name(), b.name());
        assert_ne!(a.host_link(), b.host_link());
        assert_ne!(a.host_addr(), b.host_addr());
        assert!(has_namespace(a.name()) && has_namespace(b.name()));
    }

    #[test]
    fn cleanup_happens_on_panic() {
        if skip() {
            return;
        }
        let names = std::sync::Mutex::new(String::new());
        let result = std::panic::catch_unwind(|| {
            let ns = NetNs::create().expect("create");
            *names.lock().unwrap() = format!("{} {}", ns.name(), ns.host_link());
            panic!("a test fails with a namespace alive");
        });
        assert!(result.is_err());
        let names = names.into_inner().unwrap();
        let (name, link) = names.split_once(' ').unwrap();
        assert!(!has_namespace(name), "namespace left after a panic");
        assert!(!has_link(link), "link left after a panic");
    }
}

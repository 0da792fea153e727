//! `cleanup-kube-proxy` against real iptables (legacy and nft backends) and nftables, inside a
//! network namespace of its own (never the machine's). Needs root; fails without it.
use std::process::{Command, Output};

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        // SAFETY: plain syscall.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test builds a network namespace: run as root"
        );
        let name = format!("kpc-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Netns(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn removes_kube_proxy_chains_and_tables_and_nothing_else() {
    let ns = Netns::new();
    for ipt in ["iptables-legacy", "iptables-nft"] {
        for args in [
            &["-t", "nat", "-N", "KUBE-SERVICES"][..],
            &["-t", "nat", "-N", "KUBE-SVC-ABC"],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                "10.96.0.1/32",
                "-p",
                "tcp",
                "--dport",
                "443",
                "-j",
                "KUBE-SVC-ABC",
            ],
            &["-t", "filter", "-N", "KUBE-FORWARD"],
            &["-t", "filter", "-A", "FORWARD", "-j", "KUBE-FORWARD"],
            &["-t", "mangle", "-N", "KUBE-KUBELET-CANARY"],
            &["-t", "filter", "-N", "MINE"],
            &["-t", "filter", "-A", "INPUT", "-j", "MINE"],
        ] {
            ns.ok(ipt, args);
        }
    }
    ns.ok("nft", &["add", "table", "ip", "kube-proxy"]);
    ns.ok("nft", &["add", "chain", "ip", "kube-proxy", "services"]);
    ns.ok("nft", &["add", "table", "ip", "other"]);

    let agent = env!("CARGO_BIN_EXE_dataplane-agent");
    let dry = ns.ok(agent, &["cleanup-kube-proxy", "--dry-run"]);
    for line in [
        "iptables-legacy nat: would remove chain KUBE-SERVICES",
        "iptables-nft nat: would remove chain KUBE-SVC-ABC",
        "iptables-nft filter: would remove rule -A FORWARD -j KUBE-FORWARD",
        "nft: would remove table ip kube-proxy",
    ] {
        assert!(dry.lines().any(|l| l == line), "missing {line:?} in\n{dry}");
    }
    assert!(
        !dry.contains("KUBE-KUBELET-CANARY") && !dry.contains("MINE"),
        "{dry}"
    );
    assert!(
        ns.ok("iptables-legacy-save", &[])
            .contains(":KUBE-SERVICES"),
        "a dry run removes nothing"
    );

    let done = ns.ok(agent, &["cleanup-kube-proxy"]);
    assert!(done.contains("removed chain KUBE-SERVICES"), "{done}");
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let rules = ns.ok(save, &[]);
        assert!(
            !rules.contains("KUBE-SERVICES")
                && !rules.contains("KUBE-SVC-ABC")
                && !rules.contains("KUBE-FORWARD"),
            "{save}:\n{rules}"
        );
        assert!(
            rules.contains(":KUBE-KUBELET-CANARY") && rules.contains("-A INPUT -j MINE"),
            "the rest stays:\n{rules}"
        );
    }
    let tables = ns.ok("nft", &["list", "tables"]);
    assert!(
        !tables.contains("kube-proxy") && tables.contains("table ip other"),
        "{tables}"
    );
    let again = ns.ok(agent, &["cleanup-kube-proxy"]);
    assert!(again.contains("0 kube-proxy objects removed"), "{again}");
}

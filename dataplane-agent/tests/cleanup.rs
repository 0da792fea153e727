//! `cleanup-kube-proxy` against real iptables (legacy and nft backends) and nftables, inside a
//! network namespace of its own (never the machine's). Needs root; fails without it.
use kplab::netns::Netns;

/// The test's namespace, deleted on drop.
fn netns() -> Netns {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test builds a network namespace: run as root"
    );
    Netns::create(format!("kpc-{}", std::process::id())).expect("create the test namespace")
}

/// Runs `program args` in the namespace; its stdout, or a failure with its stderr.
fn ok(ns: &Netns, program: &str, args: &[&str]) -> String {
    ns.run(program, args)
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"))
}

#[test]
fn removes_kube_proxy_chains_and_tables_and_nothing_else() {
    let ns = netns();
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
            ok(&ns, ipt, args);
        }
    }
    ok(&ns, "nft", &["add", "table", "ip", "kube-proxy"]);
    ok(
        &ns,
        "nft",
        &["add", "chain", "ip", "kube-proxy", "services"],
    );
    ok(&ns, "nft", &["add", "table", "ip", "other"]);

    let agent = env!("CARGO_BIN_EXE_dataplane-agent");
    let dry = ok(&ns, agent, &["cleanup-kube-proxy", "--dry-run"]);
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
        ok(&ns, "iptables-legacy-save", &[]).contains(":KUBE-SERVICES"),
        "a dry run removes nothing"
    );

    let done = ok(&ns, agent, &["cleanup-kube-proxy"]);
    assert!(done.contains("removed chain KUBE-SERVICES"), "{done}");
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let rules = ok(&ns, save, &[]);
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
    let tables = ok(&ns, "nft", &["list", "tables"]);
    assert!(
        !tables.contains("kube-proxy") && tables.contains("table ip other"),
        "{tables}"
    );
    let again = ok(&ns, agent, &["cleanup-kube-proxy"]);
    assert!(again.contains("0 kube-proxy objects removed"), "{again}");
}

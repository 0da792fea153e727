//! Benchmarks: a synthetic cluster of N Services, the rules kube-proxy would write for it
//! (iptables and nftables modes, the baselines), the datapath's per-packet cost through
//! BPF_PROG_TEST_RUN, control-plane timings, NetworkPolicy costs, lab runs through the real kernel, and the report
//! with its plots; `all` runs every one of them with typed results.
pub mod all;
pub mod cluster;
pub mod control;
pub mod kubeproxy;
pub mod labrun;
pub mod policy;
pub mod report;
pub mod testrun;

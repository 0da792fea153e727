//! Benchmarks: a synthetic cluster of N Services, the rules kube-proxy would write for it
//! (iptables and nftables modes, the baselines), the datapath's per-packet cost through
//! BPF_PROG_TEST_RUN, control-plane timings, and the report with its plots.
pub mod cluster;
pub mod control;
pub mod kubeproxy;
pub mod report;
pub mod testrun;

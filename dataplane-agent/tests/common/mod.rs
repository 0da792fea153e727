//! What the packet tests share: one BPF_PROG_TEST_RUN of a frame, whichever program, and the
//! drop counters read back.
use aya::programs::ProgramError;
use aya::{TestRunOptions, TestRunResult};
use dataplane_agent::datapath::Datapath;
use dataplane_common::DropReason;

/// Packets dropped for `reason`, summed over CPUs.
pub fn drops(dp: &Datapath, reason: DropReason) -> u64 {
    dp.drops()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

/// Runs `run` (a program's `test_run`) on `frame`; returns the verdict and the output frame.
pub fn test_run(
    frame: &[u8],
    run: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

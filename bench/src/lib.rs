//! Benchmarks land here (issue 4).

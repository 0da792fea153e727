//! The report: `latest.json` (every figure, with the machine it came from), `latest.md` (tables,
//! ratios, targets met or missed) and SVG plots, from the results document `bench all` builds.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use dataplane_common::prog_names;
use plotters::prelude::*;
use serde_json::{Value, json};

/// What a result document holds: `machine`, `datapath`, `control`, `lab`, `agent_rss`, `policy`,
/// `criterion`.
/// Every part is optional (a step may have been skipped with a flag).
pub fn write(results: &Value, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    let mut md = String::new();
    let m = &results["machine"];
    let _ = writeln!(
        md,
        "# Benchmark results\n\n{} on {} ({} CPUs), kernel {}; `cargo xtask {}`, {:.0} s in all.\n",
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?"),
        m["args"].as_str().unwrap_or(""),
        m["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    datapath(&mut md, &results["datapath"], out)?;
    lab(&mut md, &results["lab"], out)?;
    control(&mut md, &results["control"], &results["agent_rss"], out)?;
    policy(&mut md, &results["policy"]);
    criterion(&mut md, &results["criterion"]);
    let _ = writeln!(
        md,
        "## IPVS\n\nNot measured: this kernel has no IP_VS, so kube-proxy's IPVS mode cannot be loaded here. \
         Published figures put IPVS between iptables and nftables: a hash lookup per new connection (flat in \
         the number of Services, like nftables' verdict maps) but with iptables still used for masquerade and \
         filtering (see kube-proxy's IPVS documentation and the Kubernetes blog post \"NFTables mode for \
         kube-proxy\", 2025).\n"
    );
    std::fs::write(out.join("latest.md"), md)?;
    Ok(())
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn datapath(md: &mut String, d: &Value, out: &Path) -> anyhow::Result<()> {
    let Some(scales) = d.as_array().filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let _ = writeln!(
        md,
        "## Datapath cost per packet (BPF_PROG_TEST_RUN)\n\nKernel-reported ns per packet, median of single-packet runs \
         (the kernel repeats a test on the same buffer, so each run is one fresh packet), with the ratio to an empty \
         program of the same hook (TC, or XDP for `from_external`) measured the same way. Filler Services have {} endpoints each.\n",
        scales[0]["endpoints_per_service"]
    );
    let paths: Vec<String> = scales[0]["paths"]
        .as_array()
        .context("paths")?
        .iter()
        .filter_map(|p| p["path"].as_str().map(str::to_owned))
        .collect();
    let _ = write!(md, "| path (program) |");
    for s in scales {
        let _ = write!(md, " {} Services |", s["services"]);
    }
    let _ = writeln!(md, " last / first |");
    let _ = writeln!(md, "|---|{}---|", "---|".repeat(scales.len()));
    let cost = |s: &Value, path: &str| {
        s["paths"]
            .as_array()?
            .iter()
            .find(|p| p["path"] == path)
            .and_then(|p| f(&p["median_ns"]))
    };
    let mut series = Vec::new();
    for path in &paths {
        let program = scales[0]["paths"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["path"] == path.as_str()))
            .and_then(|p| p["program"].as_str())
            .unwrap_or("?");
        let _ = write!(md, "| {path} ({program}) |");
        let mut pts = Vec::new();
        for s in scales {
            let c = cost(s, path);
            let floor = if program == prog_names::FROM_EXTERNAL {
                "empty XDP program"
            } else {
                "empty program"
            };
            let empty = cost(s, floor);
            match (c, empty) {
                (Some(c), Some(e)) if program != "empty" => {
                    let _ = write!(md, " {c:.0} ns ({:.1}x) |", c / e);
                }
                _ => {
                    let _ = write!(md, " {} ns |", fmt(c, 0));
                }
            }
            if let (Some(c), Some(n)) = (c, f(&s["services"])) {
                pts.push((n, c));
            }
        }
        let ratio = match (pts.first(), pts.last()) {
            (Some(a), Some(b)) => format!("{:.2}x", b.1 / a.1),
            _ => "-".into(),
        };
        let _ = writeln!(md, " {ratio} |");
        series.push((path.clone(), pts));
    }
    plot(
        &out.join("datapath.svg"),
        "Datapath: kernel ns per packet",
        "Services",
        "ns per packet",
        &series,
    )?;
    let _ = writeln!(md, "\n![datapath](datapath.svg)\n");
    Ok(())
}

fn lab(md: &mut String, d: &Value, out: &Path) -> anyhow::Result<()> {
    let Some(rows) = d.as_array().filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let _ = writeln!(
        md,
        "## Through the real kernel (lab)\n\nOne lab node: a client pod, ten nginx pods behind a Service in the middle \
         of N Services of 10 endpoints each (iptables walks KUBE-SERVICES half way), an iperf3 pod. Latency: a new TCP \
         connection plus one HTTP request and its response, through the ClusterIP; \"direct\" goes to the ten pods' \
         own addresses in turn (the floor); \"pod IP\" is the same with the mode loaded. Requests/s: wrk (1 thread, \
         8 connections) against one nginx pod through a single-endpoint ClusterIP (direct: its address), in \
         three rounds alternating with wrk to the pod's own address in the same mode (the share in brackets). \
         Every client runs in the client pod's network namespace and cgroup. \
         Throughput: iperf3, one stream, through a ClusterIP. Latency is paired: each round one connection \
         through the ClusterIP and one to a pod's own address, so both see the same moment; overhead = median \
         of the per-round differences, with their interquartile range (in \"direct\" both sides go to pods, \
         the pairing's noise floor). Modes run in turn in the same lab: ours socket (pods translated at \
         connect(), the default), ours + policy (the same, with a NetworkPolicy selecting the web pods that \
         admits the client pod and the external host: every measured flow to them is judged and tracked; \
         the load column is how long `lab apply` of it took), ours tc (agents restarted with `--pod-translation tc`: per packet on the \
         pods' interfaces), then (programs detached) direct, nftables, iptables-nft, iptables-legacy.\n"
    );
    let _ = writeln!(
        md,
        "| Services | mode | p50 us | p99 us | overhead p50 us (IQR) | pod IP p50 us | requests/s (of pod IP) | Gbit/s (of direct) |\n|---|---|---|---|---|---|---|---|"
    );
    let direct = |n: &Value, key: &str| {
        rows.iter()
            .find(|r| r["services"] == *n && r["mode"] == "direct")
            .and_then(|r| f(&r[key]))
    };
    let mut latency: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let mode = r["mode"].as_str().unwrap_or("?").to_owned();
        if let Some(note) = r["note"].as_str() {
            let _ = writeln!(md, "| {} | {mode} | {note} | | | | | |", r["services"]);
            continue;
        }
        let p50 = f(&r["p50_us"]);
        let overhead = format!(
            "{} ({})",
            fmt(f(&r["overhead_p50_us"]), 1),
            fmt(f(&r["overhead_iqr_us"]), 1)
        );
        let gbps = f(&r["gbps"]);
        let share = gbps
            .zip(direct(&r["services"], "gbps"))
            .map_or(String::new(), |(a, b)| format!(" ({:.0}%)", 100.0 * a / b));
        let rps = f(&r["rps"]);
        let rps_share = rps
            .zip(f(&r["rps_pod_ip"]))
            .map_or(String::new(), |(a, b)| format!(" ({:.1}%)", 100.0 * a / b));
        let _ = writeln!(
            md,
            "| {} | {mode} | {} | {} | {} | {} | {}{rps_share} | {}{share} |",
            r["services"],
            fmt(p50, 1),
            fmt(f(&r["p99_us"]), 1),
            overhead,
            fmt(f(&r["pod_ip_p50_us"]), 1),
            fmt(rps, 0),
            fmt(gbps, 2),
        );
        if let (Some(p), Some(n)) = (p50, f(&r["services"])) {
            add_point(&mut latency, mode, (n, p));
        }
    }
    let _ = writeln!(
        md,
        "\nFrom the node's own network namespace (a hostNetwork client; ours: the socket hooks), paired: \
         each round one new connection + request through the ClusterIP and one to a web pod's own address, \
         so both see the same moment. Overhead = median of the per-round differences, with their \
         interquartile range; in \"direct\" both sides go to pods (the pairing's noise floor).\n\n\
         | Services | mode | through Service p50 us | p99 us | direct p50 us | overhead p50 us | IQR us |\n|---|---|---|---|---|---|---|"
    );
    paired_rows(md, rows, "node");
    let _ = writeln!(
        md,
        "\nFrom outside the cluster (the lab's external host) to a NodePort on the node's address \
         (externalTrafficPolicy Cluster, the same ten pods; ours: XDP, the pods are local so no source \
         NAT; kube-proxy's modes: KUBE-NODEPORTS / service-nodeports with masquerade), paired against \
         the pods' own addresses routed through the node.\n\n\
         | Services | mode | through NodePort p50 us | p99 us | direct p50 us | overhead p50 us | IQR us |\n|---|---|---|---|---|---|---|"
    );
    paired_rows(md, rows, "external");
    plot(
        &out.join("latency.svg"),
        "New connection + request, p50",
        "Services",
        "microseconds",
        &latency,
    )?;
    let _ = writeln!(md, "\n![latency](latency.svg)\n");
    Ok(())
}

/// One table row per lab row with paired figures under `key` (a `Paired`).
fn paired_rows(md: &mut String, rows: &[Value], key: &str) {
    for r in rows.iter().filter(|r| r[key].is_object()) {
        let n = &r[key];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["services"],
            r["mode"].as_str().unwrap_or("?"),
            fmt(f(&n["service_p50_us"]), 1),
            fmt(f(&n["service_p99_us"]), 1),
            fmt(f(&n["direct_p50_us"]), 1),
            fmt(f(&n["overhead_p50_us"]), 1),
            fmt(f(&n["overhead_iqr_us"]), 1),
        );
    }
}

fn control(md: &mut String, d: &Value, rss: &Value, out: &Path) -> anyhow::Result<()> {
    let Some(rows) = d.as_array().filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let _ = writeln!(
        md,
        "## Control plane\n\nFull sync: from the objects known to the datapath programmed (ours: the agent's batch \
         of every Service and EndpointSlice through index, translation and BPF map writes; kube-proxy modes: \
         loading its ruleset into an empty network namespace). One change: an endpoint added or removed \
         (ours: event to map written; kube-proxy: its partial-sync transaction).\n\n\
         | mode | Services | full sync s | one change p50 ms | one change p99 ms |\n|---|---|---|---|---|"
    );
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let mode = r["mode"].as_str().unwrap_or("?").to_owned();
        let full = f(&r["full_sync_s"]);
        let full_s = full.map_or_else(
            || format!("over {:.0} (capped)", f(&r["capped_at_s"]).unwrap_or(0.0)),
            |s| format!("{s:.3}"),
        );
        let _ = writeln!(
            md,
            "| {mode} | {} | {full_s} | {} | {} |",
            r["services"],
            fmt(f(&r["change"]["p50_ms"]), 2),
            fmt(f(&r["change"]["p99_ms"]), 2)
        );
        if let (Some(s), Some(n)) = (full, f(&r["services"])) {
            add_point(&mut series, mode, (n, s));
        }
    }
    if let Some(rss) = rss.as_array() {
        let _ = writeln!(
            md,
            "\nAgent peak RSS (VmHWM of the running agent in the lab):\n"
        );
        for r in rss {
            let _ = writeln!(
                md,
                "- {} Services: {} MB",
                r["services"],
                fmt(f(&r["peak_rss_mb"]), 1)
            );
        }
    }
    plot(
        &out.join("sync.svg"),
        "Full sync time",
        "Services",
        "seconds",
        &series,
    )?;
    let _ = writeln!(md, "\n![sync](sync.svg)\n");
    Ok(())
}

fn policy(md: &mut String, d: &Value) {
    let Some(stages) = d["datapath"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## NetworkPolicy\n\nPer packet (kernel-reported ns, median / trimmed mean; every variant measured \
         round-robin in one run), a pod on this node selected by one policy of N ingress rules (the admitting \
         rule last; 0: no policy). New flow: a SYN to the pod (`to_pod`: judged, two conntrack entries, an \
         event); established: its ACK (conntrack hit, epoch compare); reply: the pod's answer (`from_pod`).\n\n\
         | rules | new flow | established | reply | established - no policy |\n|---|---|---|---|---|"
    );
    let cell = |stage: &Value, path: &str| {
        stage["paths"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["path"] == path))
            .map(|p| (f(&p["median_ns"]), f(&p["trimmed_mean_ns"])))
    };
    let base = stages
        .iter()
        .find(|s| s["rules"] == 0)
        .and_then(|s| cell(s, "established flow"))
        .and_then(|c| c.0);
    for stage in stages {
        if cell(stage, "new flow").is_none() {
            continue;
        }
        let show = |path: &str| {
            cell(stage, path).map_or_else(
                || "-".to_owned(),
                |(m, t)| format!("{} / {}", fmt(m, 0), fmt(t, 1)),
            )
        };
        let extra = cell(stage, "established flow")
            .and_then(|c| c.0)
            .zip(base)
            .map(|(e, b)| e - b);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} ns |",
            stage["rules"],
            show("new flow"),
            show("established flow"),
            show("reply"),
            fmt(extra, 0)
        );
    }
    if let Some(empty) = stages.iter().find_map(|s| cell(s, "empty program")) {
        let _ = writeln!(
            md,
            "\nEmpty TC program: {} / {} ns. Target: established flows pay under 20 ns for policy.\n",
            fmt(empty.0, 0),
            fmt(empty.1, 1)
        );
    }
    let c = &d["control"];
    let pct = |v: &Value| {
        format!(
            "{} / {} ms",
            fmt(f(&v["p50_ms"]), 1),
            fmt(f(&v["p99_ms"]), 1)
        )
    };
    let _ = writeln!(
        md,
        "Event -> enforced (object change applied to every map written, `Pipeline::apply` into the kernel maps) \
         with {} pods ({} on the node) and {} policies: full sync {} s (target under 1 s); one local pod's label \
         change p50 / p99 {} (target under 5 ms p99); one policy's port range changed {}. Map entries (both generations): \
         POLICY_IDS {}, POLICY_EP {}, POLICY {}. The agent's peak RSS with these objects (from a manifests \
         directory, after its first sync): {} MB.\n",
        c["pods"],
        c["local_pods"],
        c["policies"],
        fmt(f(&c["full_sync_s"]), 3),
        pct(&c["label_change"]),
        pct(&c["policy_change"]),
        c["id_entries"],
        c["endpoint_entries"],
        c["rule_entries"],
        fmt(f(&d["agent_peak_rss_mb"]), 1)
    );
}

fn criterion(md: &mut String, d: &Value) {
    let Some(rows) = d.as_array().filter(|s| !s.is_empty()) else {
        return;
    };
    let _ = writeln!(
        md,
        "## Agent hot paths (criterion)\n\n| benchmark | time |\n|---|---|"
    );
    for r in rows {
        let ns = f(&r["mean_ns"]).unwrap_or(0.0);
        let t = if ns > 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns > 1e3 {
            format!("{:.2} us", ns / 1e3)
        } else {
            format!("{ns:.0} ns")
        };
        let _ = writeln!(md, "| {} | {t} |", r["name"].as_str().unwrap_or("?"));
    }
    let _ = writeln!(md);
}

/// Adds a point to the series named `name`, starting it if needed.
fn add_point(series: &mut Vec<(String, Vec<(f64, f64)>)>, name: String, point: (f64, f64)) {
    match series.iter_mut().find(|(m, _)| *m == name) {
        Some((_, pts)) => pts.push(point),
        None => series.push((name, vec![point])),
    }
}

/// A log-log line plot, one series per mode or path.
fn plot(
    path: &Path,
    title: &str,
    x: &str,
    y: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            ((x0 * 0.8)..(x1 * 1.25)).log_scale(),
            ((y0 * 0.7).max(1e-6)..(y1 * 1.4)).log_scale(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x)
        .y_desc(y)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The machine a run happened on.
#[must_use]
pub fn machine(args: &str, elapsed_s: f64) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({"cpu": cpu, "cpus": cpus, "kernel": kernel, "date": date, "args": args, "elapsed_s": elapsed_s})
}

//! The coordinator at scale: N simulated nodes (tasks of this process
//! speaking the real protocol over TLS, see `fleet/simulator.rs`) against
//! the real `fabric-coordinator` binary, with scheduled jobs of
//! `replicas = 2`; prints the coordinator's cost against N. Run:
//!
//! ```text
//! cargo bench -p fabric-coordinator --bench fleet -- --nodes 100,300,1000 --jobs 10000
//! ```
//!
//! Options: `--nodes A,B,...` (default 100,300,1000), `--jobs N` (10000),
//! `--seconds S` (the steady window, 60), `--interval S` (each job's
//! schedule, 3600), `--quick` (20 nodes, 200 jobs of a 60 s schedule, a 20 s
//! window, 1 s heartbeats).

#[path = "fleet/simulator.rs"]
mod simulator;

use simulator::{FleetConfig, FleetReport};

fn main() {
    let mut nodes = vec![100, 300, 1_000];
    let mut jobs = 10_000;
    let mut seconds = None;
    let mut interval = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the option");
        match arg.as_str() {
            "--nodes" => {
                nodes = value()
                    .split(',')
                    .map(|n| n.trim().parse().expect("a number of nodes"))
                    .collect();
            }
            "--jobs" => jobs = value().parse().expect("a number of jobs"),
            "--seconds" => seconds = Some(value().parse().expect("seconds")),
            "--interval" => interval = Some(value().parse().expect("seconds")),
            "--quick" => quick = true,
            // `cargo bench` passes `--bench`; filters are not used.
            _ => {}
        }
    }
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_fabric-coordinator"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut reports = Vec::new();
    for &n in &nodes {
        let mut config = if quick {
            FleetConfig {
                nodes: n,
                jobs,
                ..FleetConfig::quick()
            }
        } else {
            FleetConfig::bench(n, jobs)
        };
        config.verbose = true;
        if let Some(seconds) = seconds {
            config.steady = std::time::Duration::from_secs(seconds);
        }
        if let Some(interval) = interval {
            config.interval = std::time::Duration::from_secs(interval);
        }
        let report = runtime.block_on(simulator::run(binary, config));
        print_checks(&report);
        reports.push(report);
    }
    print_table(&reports);
}

fn print_checks(report: &FleetReport) {
    eprintln!(
        "fleet[{}]: checks: {} of {} due slots missing, {} of {} runs not at their target, \
         {} sessions broken, {} unexpected messages, {} snapshots lost with every copy",
        report.nodes,
        report.due_missing.len(),
        report.due_slots,
        report.reported_missing.len(),
        report.reported,
        report.session_breaks,
        report.unexpected,
        report.lost_snapshots,
    );
}

fn print_table(reports: &[FleetReport]) {
    let row = |name: &str, cell: &dyn Fn(&FleetReport) -> String| {
        let mut line = format!("| {name} |");
        for report in reports {
            line.push_str(&format!(" {} |", cell(report)));
        }
        println!("{line}");
    };
    row("nodes (storage + agents)", &|r| {
        format!(
            "{} ({} + {})",
            r.nodes,
            r.storage_nodes,
            r.nodes - r.storage_nodes
        )
    });
    let mut rule = "| --- |".to_owned();
    for _ in reports {
        rule.push_str(" ---: |");
    }
    println!("{rule}");
    row("jobs", &|r| r.jobs.to_string());
    row("sessions open (register + hello)", &|r| {
        format!("{:.1} s", r.sessions_open_s)
    });
    row("jobs submitted", &|r| format!("{:.1} s", r.submit_s));
    row("coordinator CPU, registration and submission", &|r| {
        format!("{:.0}% of a core", r.startup_cpu_percent)
    });
    row("coordinator CPU, steady", &|r| {
        format!("{:.1}% of a core", r.steady_cpu_percent)
    });
    row("heartbeats / runs done in the steady window", &|r| {
        format!("{} / {}", r.steady_heartbeats, r.steady_runs)
    });
    row("coordinator RSS, steady / peak", &|r| {
        format!("{:.0} / {:.0} MiB", r.steady_rss_mib, r.peak_rss_mib)
    });
    row("engine round trip (GetJob) p50 / p99 / max", &|r| {
        let s = r.engine_round_trip;
        format!("{:.1} / {:.1} / {:.1} ms", s.p50_ms, s.p99_ms, s.max_ms)
    });
    row("scheduling latency p50 / p99 / max", &|r| {
        let s = r.scheduling_latency;
        format!(
            "{:.0} / {:.0} / {:.0} ms ({})",
            s.p50_ms, s.p99_ms, s.max_ms, s.count
        )
    });
    row(
        "re-replication after dropping 10% of nodes",
        &|r| match r.rereplicate_s {
            Some(s) => format!(
                "{s:.0} s ({} of {} snapshots)",
                r.most_short, r.had_copy_dropped
            ),
            None => "not done".into(),
        },
    );
    row("simulator CPU, steady", &|r| {
        format!("{:.0}% of a core", r.simulator_cpu_percent)
    });
}

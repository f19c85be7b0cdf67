//! The policy-quality benchmark: the reference across `minReplicas` x
//! `idleTimeout`, against a grid of the operator's controls, on one trace.
//! Reports every point, each side's cost/wait frontier, which reference
//! points the operator's frontier dominates, and the targets at the
//! reference's default cost.

use std::time::Duration;

use serde::Serialize;

use super::{Job, PolicyChoice, SimOptions, SimResult, simulate};
use crate::crd::{RunnerPoolSpec, validate};

/// One configuration and its result.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Short name, e.g. `ref min=3 idle=10m`.
    pub label: String,
    /// The `spec.scaling` used (YAML flow style).
    pub scaling: String,
    /// What the replay measured.
    pub result: SimResult,
}

/// Whether `a` is at least as good as `b` on VM-hours, mean and p95 wait,
/// and better on one.
pub fn dominates(a: &SimResult, b: &SimResult) -> bool {
    let (x, y) = (&a.wait_secs, &b.wait_secs);
    let ge = a.vm_hours <= b.vm_hours && x.mean <= y.mean && x.p95 <= y.p95;
    ge && (a.vm_hours < b.vm_hours || x.mean < y.mean || x.p95 < y.p95)
}

/// The benchmark's report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Trace days replayed.
    pub days: f64,
    /// The reference grid.
    pub reference: Vec<Point>,
    /// The operator's grid.
    pub operator: Vec<Point>,
    /// For each reference point: the cheapest operator point dominating it
    /// (`None` also when an operator point only ties it).
    pub dominated_by: Vec<Option<String>>,
    /// The reference's defaults (min 3, idleTimeout 10m).
    pub reference_default: String,
    /// The operator point with the lowest mean wait at no more VM-hours
    /// than the reference's defaults.
    pub best_at_default_cost: Option<String>,
    /// Its mean wait over the reference default's (target: <= 0.5).
    pub mean_ratio: Option<f64>,
    /// Its p95 wait over the reference default's (target: <= 0.75).
    pub p95_ratio: Option<f64>,
    /// Whether busy VMs were ever killed (must be false).
    pub any_busy_killed: bool,
}

fn spec(scaling: &str) -> crate::crd::ValidSpec {
    let yaml = format!(
        "resourceClass: bench/linux\ncircleci: {{apiTokenSecretRef: {{name: a}}, runnerTokenSecretRef: {{name: b}}}}\nscaling: {{maxReplicas: 500, {scaling}}}\n"
    );
    let s: RunnerPoolSpec = serde_norway::from_str(&yaml).expect("benchmark specs parse");
    validate(&s).expect("benchmark specs are valid")
}

/// The reference grid of the issue: min in {0, 3, 10, 20, 40} x idleTimeout
/// in {10m, 30m}.
pub fn reference_grid() -> Vec<(String, String)> {
    let mut g = Vec::new();
    for min in [0, 3, 10, 20, 40] {
        for idle in ["10m", "30m"] {
            g.push((
                format!("ref min={min} idle={idle}"),
                format!("minReplicas: {min}, idleTimeout: {idle}"),
            ));
        }
    }
    g
}

/// The operator's grid: burstPercent x idleTimeout x idleBuffer, plus
/// headroom and adaptive-polling variants.
pub fn operator_grid(full: bool) -> Vec<(String, String)> {
    let mut g = Vec::new();
    let bursts: &[u32] = if full {
        &[0, 25, 50, 100, 150, 200, 300]
    } else {
        &[0, 100]
    };
    let idles: &[&str] = if full {
        &["5m", "10m", "30m"]
    } else {
        &["10m"]
    };
    let buffers: &[u32] = if full { &[0, 2, 5, 10, 20] } else { &[0] };
    for &b in bursts {
        for &i in idles {
            for &ib in buffers {
                g.push((
                    format!("burst={b}% idle={i} buffer={ib}"),
                    format!("burstPercent: {b}, idleTimeout: {i}, idleBuffer: {ib}"),
                ));
            }
        }
    }
    for h in [3, 5] {
        g.push((
            format!("headroom={h} idle=10m"),
            format!("headroom: {h}, idleTimeout: 10m"),
        ));
    }
    g.push((
        "burst=100% idle=10m idlePoll=30s".into(),
        "burstPercent: 100, idleTimeout: 10m, idlePollInterval: 30s".into(),
    ));
    g
}

/// Runs both grids on `jobs` (the first `days` days).
pub fn run(jobs: &[Job], days: f64, full: bool, seed: u64) -> Report {
    let opts = SimOptions {
        horizon: Some(Duration::from_secs_f64(days * 86400.0)),
        seed,
        ..Default::default()
    };
    let point = |(label, scaling): (String, String), choice| {
        let result = simulate(jobs, &spec(&scaling), choice, &opts);
        Point {
            label,
            scaling,
            result,
        }
    };
    let reference: Vec<Point> = reference_grid()
        .into_iter()
        .map(|c| point(c, PolicyChoice::Reference))
        .collect();
    let operator: Vec<Point> = operator_grid(full)
        .into_iter()
        .map(|c| point(c, PolicyChoice::Operator))
        .collect();
    let dominated_by = reference
        .iter()
        .map(|r| {
            operator
                .iter()
                .filter(|o| dominates(&o.result, &r.result))
                .min_by(|a, b| a.result.vm_hours.total_cmp(&b.result.vm_hours))
                .map(|o| o.label.clone())
        })
        .collect();
    let def = reference
        .iter()
        .find(|r| r.label == "ref min=3 idle=10m")
        .expect("the default is in the grid");
    let best = operator
        .iter()
        .filter(|o| o.result.vm_hours <= def.result.vm_hours)
        .min_by(|a, b| a.result.wait_secs.mean.total_cmp(&b.result.wait_secs.mean));
    let any_busy_killed = reference
        .iter()
        .chain(&operator)
        .any(|p| p.result.busy_vms_killed > 0);
    Report {
        days,
        dominated_by,
        reference_default: def.label.clone(),
        best_at_default_cost: best.map(|b| b.label.clone()),
        mean_ratio: best.map(|b| b.result.wait_secs.mean / def.result.wait_secs.mean),
        p95_ratio: best.map(|b| b.result.wait_secs.p95 / def.result.wait_secs.p95),
        any_busy_killed,
        reference,
        operator,
    }
}

/// The report as text: the reference points with their dominating operator
/// point, the operator's frontier, and the targets.
pub fn table(r: &Report) -> String {
    let row = |p: &Point| {
        let w = &p.result.wait_secs;
        format!(
            "{:<36} {:>7.1} {:>6.0} {:>6.0} {:>8.1} {:>8.1} {:>6} {:>7}",
            p.label,
            w.mean,
            w.p50,
            w.p95,
            p.result.vm_hours,
            p.result.idle_vm_hours,
            p.result.vms_booted,
            p.result.busy_vms_killed
        )
    };
    let head = format!(
        "{:<36} {:>7} {:>6} {:>6} {:>8} {:>8} {:>6} {:>7}",
        "policy", "mean s", "p50 s", "p95 s", "VM-h", "idle VM-h", "booted", "killed"
    );
    let mut out = format!(
        "Policy quality, first {} days of the trace\n\n{head}  dominated by\n",
        r.days
    );
    for (p, d) in r.reference.iter().zip(&r.dominated_by) {
        out.push_str(&format!("{}  {}\n", row(p), d.as_deref().unwrap_or("-")));
    }
    out.push_str(&format!(
        "\nOperator frontier (no other operator point dominates it)\n{head}\n"
    ));
    let mut frontier: Vec<&Point> = r
        .operator
        .iter()
        .filter(|p| !r.operator.iter().any(|q| dominates(&q.result, &p.result)))
        .collect();
    frontier.sort_by(|a, b| a.result.vm_hours.total_cmp(&b.result.vm_hours));
    // Equal results (e.g. burst=0% at every idleTimeout) are listed once.
    frontier.dedup_by(|a, b| {
        a.result.vm_hours == b.result.vm_hours && a.result.wait_secs == b.result.wait_secs
    });
    for p in frontier {
        out.push_str(&row(p));
        out.push('\n');
    }
    let dominated = r.dominated_by.iter().filter(|d| d.is_some()).count();
    out.push_str(&format!(
        "\nReference points dominated by an operator point: {dominated} of {}\n",
        r.reference.len()
    ));
    if let (Some(b), Some(m), Some(p)) = (&r.best_at_default_cost, r.mean_ratio, r.p95_ratio) {
        out.push_str(&format!(
            "At no more VM-hours than {}: {b}: mean wait x{m:.2} (target <= 0.50: {}), p95 x{p:.2} (target <= 0.75: {})\n",
            r.reference_default,
            if m <= 0.5 { "PASS" } else { "MISS" },
            if p <= 0.75 { "PASS" } else { "MISS" },
        ));
    }
    out.push_str(&format!(
        "Busy VMs killed: {}\n",
        if r.any_busy_killed {
            "SOME (a bug)"
        } else {
            "0"
        }
    ));
    out
}

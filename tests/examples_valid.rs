//! Every RunnerPool in `examples/` passes the operator's own validation
//! (cron expressions, time zones, the VMI template...), beyond the schema
//! checks of the chart test's server-side dry run.

use std::path::Path;

fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("examples/") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

#[test]
fn every_example_runnerpool_is_valid() {
    let mut files = Vec::new();
    yaml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        &mut files,
    );
    let mut pools = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] != "RunnerPool" {
                continue;
            }
            let p: runner_provisioner::crd::RunnerPool =
                serde_json::from_value(v).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if let Err(e) = runner_provisioner::crd::validate(&p.spec) {
                panic!("{}: {e:?}", f.display());
            }
            pools += 1;
        }
    }
    assert!(pools >= 6, "only {pools} RunnerPools in examples/");
}

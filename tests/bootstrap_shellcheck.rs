//! shellcheck on every script the user-data makes a VM run (extracted from
//! each rendered variant as cloud-init reads it), on the runcmd script
//! cloud-init generates, and on the repository's own bootstrap helpers.

mod bootstrap_common;

use std::path::Path;
use std::process::Command;

use bootstrap_common::*;
use runner_provisioner::cloudinit::*;

fn shellcheck(name: &str, script: &str) -> Result<(), String> {
    let shell = match script.lines().next() {
        Some(l) if l.starts_with("#!") && l.contains("bash") => "bash",
        Some(l) if l.starts_with("#!") => "sh",
        _ => "sh",
    };
    let out = run_with_stdin(
        Command::new(require_tool("shellcheck", "shellcheck")).args([
            "--shell",
            shell,
            "--severity",
            "style",
            "-",
        ]),
        script.as_bytes(),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// cloud-init turns runcmd into a `#!/bin/sh` script, one shell-quoted line
/// per argument list.
fn runcmd_script(cmds: &[Vec<String>]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    for cmd in cmds {
        let quoted: Vec<String> = cmd
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        s.push_str(&quoted.join(" "));
        s.push('\n');
    }
    s
}

#[test]
fn shellcheck_passes_on_every_generated_script() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, config) in variants() {
        let doc = cloud_init_parse(&render_user_data(&config));
        for file in write_files(&doc) {
            // The user's own script is theirs; ours are the rest.
            if file.path == USER_DATA_PATH || !file.text().starts_with("#!") {
                continue;
            }
            checked += 1;
            if let Err(e) = shellcheck(&format!("{name}: {}", file.path), file.text()) {
                failures.push(e);
            }
        }
        checked += 1;
        if let Err(e) = shellcheck(&format!("{name}: runcmd"), &runcmd_script(&runcmd(&doc))) {
            failures.push(e);
        }
    }
    assert!(
        checked >= 2 * variants().len(),
        "too few scripts checked: {checked}"
    );
    assert!(
        failures.is_empty(),
        "shellcheck failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn shellcheck_passes_on_the_bundle_recipe_and_test_helpers() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in ["runner-bundle", "scripts/bootstrap-test"] {
        let mut entries: Vec<_> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sh"))
            .collect();
        entries.sort();
        for path in entries {
            checked += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            let rel = path.strip_prefix(repo()).unwrap_or(Path::new(""));
            if let Err(e) = shellcheck(&rel.display().to_string(), &text) {
                failures.push(e);
            }
        }
    }
    assert!(
        checked >= 7,
        "expected the recipe and helper scripts, found {checked}"
    );
    assert!(
        failures.is_empty(),
        "shellcheck failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn shellcheck_would_catch_a_broken_script() {
    // The check can fail: an unquoted expansion is reported.
    assert!(shellcheck("probe", "#!/bin/sh\nrm -rf $1/*\n").is_err());
}

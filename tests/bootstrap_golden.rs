//! Golden files of the rendered user-data (tests/golden/bootstrap-*.yaml),
//! and the round trip through cloud-init's own YAML parser (PyYAML): every
//! file cloud-init would write is exactly what the renderer meant, even for
//! hostile values. Regenerate the golden files with
//! `UPDATE_GOLDEN=1 cargo test -p runner-provisioner --test bootstrap_golden`.

mod bootstrap_common;

use bootstrap_common::*;
use runner_provisioner::cloudinit::*;

fn golden_path(name: &str) -> std::path::PathBuf {
    repo()
        .join("tests/golden")
        .join(format!("bootstrap-{name}.yaml"))
}

#[test]
fn user_data_matches_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, config) in variants() {
        let rendered = render_user_data(&config);
        let path = golden_path(name);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with UPDATE_GOLDEN=1 cargo test -p runner-provisioner --test bootstrap_golden",
                path.display()
            )
        });
        if rendered != expected {
            let line = rendered
                .lines()
                .zip(expected.lines())
                .position(|(a, b)| a != b)
                .map(|i| i + 1)
                .unwrap_or_else(|| rendered.lines().count().min(expected.lines().count()) + 1);
            stale.push(format!(
                "{} (first difference at line {line})",
                path.display()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "rendered user-data differs from the golden files (review, then UPDATE_GOLDEN=1): {stale:#?}"
    );
}

#[test]
fn no_orphan_golden_files() {
    let names: Vec<String> = variants()
        .iter()
        .map(|(n, _)| format!("bootstrap-{n}.yaml"))
        .collect();
    for entry in std::fs::read_dir(repo().join("tests/golden")).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if file.starts_with("bootstrap-") {
            assert!(
                names.contains(&file),
                "tests/golden/{file} belongs to no variant: delete it"
            );
        }
    }
}

/// What cloud-init writes, for one config, checked file by file.
fn check_cloud_init_view(config: &BootstrapConfig) {
    let doc = cloud_init_parse(&render_user_data(config));
    let files = write_files(&doc);
    let get = |path: &str| {
        files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("write_files lacks {path}"))
    };

    let runner_config = get(RUNNER_CONFIG_PATH);
    assert_eq!(runner_config.text(), runner_config_yaml(config));
    assert_eq!(runner_config.mode, 0o600);
    // The runner config itself, read back: every value literal.
    let parsed: serde_norway::Value = serde_norway::from_str(runner_config.text()).unwrap();
    assert_eq!(
        parsed["api"]["auth_token"].as_str(),
        Some(config.runner_token.as_str())
    );
    let url = if config.api_url.is_empty() {
        DEFAULT_API_URL
    } else {
        &config.api_url
    };
    assert_eq!(parsed["api"]["url"].as_str(), Some(url));
    assert_eq!(parsed["runner"]["mode"].as_str(), Some("single-task"));
    assert_eq!(
        parsed["runner"]["idle_timeout"].as_str(),
        config.idle_timeout.as_deref()
    );
    assert_eq!(
        parsed["runner"]["max_run_time"].as_str(),
        config.max_run_time.as_deref()
    );
    assert_eq!(
        parsed["runner"]["working_directory"].as_str(),
        config.working_directory.as_deref()
    );
    let prefix: Option<Vec<String>> = parsed["runner"]
        .get("command_prefix")
        .map(|v| serde_norway::from_value(v.clone()).unwrap());
    assert_eq!(prefix, config.command_prefix);

    let settings = get(SETTINGS_PATH);
    assert_eq!(settings.text(), settings_file(config));
    assert_eq!(settings.mode, 0o600);

    let dropin = get(DROPIN_PATH);
    assert_eq!(dropin.text(), systemd_dropin());
    assert_eq!(dropin.mode, 0o644);

    let sudoers = files.iter().find(|f| f.path == SUDOERS_PATH);
    if config.grant_sudo {
        let sudoers = sudoers.expect("grantSudo writes the sudoers drop-in");
        assert_eq!(sudoers.text(), format!("{SUDOERS_LINE}\n"));
        assert_eq!(sudoers.mode, 0o440, "sudo ignores a writable sudoers file");
    } else {
        assert!(sudoers.is_none(), "no sudoers drop-in without grantSudo");
    }

    let script = get(BOOTSTRAP_SCRIPT_PATH);
    assert_eq!(script.text(), bootstrap_script());
    assert_eq!(script.mode, 0o700);

    match config
        .user_script
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        Some(s) => {
            let user = get(USER_DATA_PATH);
            let expected = if s.ends_with('\n') {
                s.to_owned()
            } else {
                format!("{s}\n")
            };
            assert_eq!(user.text(), expected);
            assert_eq!(user.mode, 0o700);
        }
        None => assert!(files.iter().all(|f| f.path != USER_DATA_PATH)),
    }
    for f in &files {
        assert_eq!(f.owner, "root:root", "{}", f.path);
    }
    assert_eq!(
        runcmd(&doc),
        vec![vec!["sh".to_owned(), BOOTSTRAP_SCRIPT_PATH.to_owned()]]
    );
    // Nothing else in the document: no packages, no bootcmd, no users.
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["runcmd", "write_files"]);
}

#[test]
fn cloud_init_reads_every_variant_back_exactly() {
    for (name, config) in variants() {
        eprintln!("variant {name}");
        check_cloud_init_view(&config);
    }
}

#[test]
fn yaml_1_1_specials_stay_strings_for_cloud_init() {
    for special in YAML11_SPECIALS {
        let config = BootstrapConfig {
            runner_token: (*special).into(),
            user_script: Some((*special).into()),
            idle_timeout: Some((*special).into()),
            command_prefix: Some(vec![(*special).into()]),
            ..Default::default()
        };
        eprintln!("value {special:?}");
        check_cloud_init_view(&config);
    }
}

#[test]
fn user_data_is_larger_than_the_inline_limit_so_it_needs_a_secret() {
    // Documented assumption: the operator must use cloudInitNoCloud.secretRef.
    let size = render_user_data(&variants()[0].1).len();
    assert!(size > 2048, "user-data is {size} bytes");
}

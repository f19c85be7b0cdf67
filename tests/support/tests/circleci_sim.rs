//! The CircleCI simulator, driven the way the operator (HTTP) and the
//! KubeVirt simulator (`GuestRuntime`) drive it. No Kubernetes needed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use rp_testenv::circleci::{
    AgentProblem, AgentState, CircleCiSim, CircleCiSimConfig, Endpoint, EnqueueRequest, ExitReason,
    Fault, FaultKind, OutageMode, RUNNER_CONFIG_PATH, RateLimitBody, RunnerMode, TEST_API_TOKEN,
    TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN, TaskRecord, TaskState, render_user_data,
};
use rp_testenv::{GuestBoot, GuestRuntime, PowerOff};
use serde::Deserialize;
use serde_json::{Value, json};

const CLASS: &str = TEST_RESOURCE_CLASS;

fn client() -> reqwest::Client {
    rp_testenv::init_crypto();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn sim() -> CircleCiSim {
    CircleCiSim::start(CircleCiSimConfig::for_tests())
        .await
        .unwrap()
}

fn url(sim: &CircleCiSim, path: &str) -> String {
    format!("{}{path}", sim.base_url())
}

/// GET with `Circle-Token: <TEST_API_TOKEN>`.
async fn get(c: &reqwest::Client, sim: &CircleCiSim, path: &str) -> reqwest::Response {
    c.get(url(sim, path))
        .header("Circle-Token", TEST_API_TOKEN)
        .send()
        .await
        .unwrap()
}

#[derive(Debug, Deserialize)]
struct Unclaimed {
    unclaimed_task_count: u64,
}

#[derive(Debug, Deserialize)]
struct Running {
    running_runner_tasks: u64,
}

/// A booted guest and what happened to it.
struct Guest {
    uid: String,
    powered_off_at: Arc<Mutex<Option<Instant>>>,
}

impl Guest {
    fn powered_off(&self) -> bool {
        self.powered_off_at.lock().unwrap().is_some()
    }
}

/// GET `url` and decode its JSON body.
async fn get_json<T: serde::de::DeserializeOwned>(c: &reqwest::Client, url: String) -> T {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

fn boot(guest: &Arc<dyn GuestRuntime>, vm: &str, user_data: Option<String>) -> Guest {
    let uid = format!("uid-{vm}-{}", rand::random::<u32>());
    let powered_off_at = Arc::new(Mutex::new(None));
    let flag = powered_off_at.clone();
    guest.boot(
        GuestBoot {
            namespace: "ci".into(),
            vm_name: vm.into(),
            vmi_uid: uid.clone(),
            user_data,
        },
        PowerOff::new(move || {
            let mut at = flag.lock().unwrap();
            assert!(at.is_none(), "power_off called twice");
            *at = Some(Instant::now());
        }),
    );
    Guest {
        uid,
        powered_off_at,
    }
}

fn user_data(sim: &CircleCiSim, token: &str) -> Option<String> {
    Some(render_user_data(
        &sim.base_url(),
        token,
        RunnerMode::SingleTask,
        None,
    ))
}

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- auth & API

#[tokio::test]
async fn auth_rules() {
    let sim = sim().await;
    let c = client();
    let path = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    sim.enqueue(CLASS, Duration::from_secs(60));

    // Circle-Token, Basic (token as user, blank password), Bearer API token.
    let r = get(&c, &sim, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Unclaimed>().await.unwrap().unclaimed_task_count, 1);
    let r = c
        .get(url(&sim, &path))
        .basic_auth(TEST_API_TOKEN, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(url(&sim, &path))
        .bearer_auth(TEST_API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The runner token is not an API token, however it is sent.
    for req in [
        c.get(url(&sim, &path)).bearer_auth(TEST_RUNNER_TOKEN),
        c.get(url(&sim, &path))
            .header("Circle-Token", TEST_RUNNER_TOKEN),
        c.get(url(&sim, &path))
            .basic_auth(TEST_RUNNER_TOKEN, Some("")),
        c.get(url(&sim, &path)).header("Circle-Token", "wrong"),
        c.get(url(&sim, &path)),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let body: Value = r.json().await.unwrap();
        assert!(body["message"].is_string(), "{body}");
    }

    // A revoked token stops working.
    sim.add_api_token("second-token");
    let ok = c
        .get(url(&sim, &path))
        .header("Circle-Token", "second-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    sim.revoke_api_token("second-token");
    let revoked = c
        .get(url(&sim, &path))
        .header("Circle-Token", "second-token")
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn filters_aliases_and_unknown_classes() {
    let sim = sim().await;
    let c = client();
    sim.enqueue(CLASS, Duration::from_secs(60));
    sim.enqueue(CLASS, Duration::from_secs(60));

    // Missing filter: 400 with CircleCI's message.
    for path in [
        "/api/v3/runner",
        "/api/v3/runner/tasks",
        "/api/v3/runner/tasks/running",
    ] {
        let r = get(&c, &sim, path).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body,
            json!({"message": "must specify one of org-id, resource-class, or namespace"})
        );
    }

    // URL-encoded slash, v3 and every v2 alias.
    for path in [
        "/api/v3/runner/tasks",
        "/api/v2/runner/tasks",
        "/api/v2/tasks",
    ] {
        let r = get(&c, &sim, &format!("{path}?resource-class=sim-org%2Flinux")).await;
        assert_eq!(r.json::<Unclaimed>().await.unwrap().unclaimed_task_count, 2);
    }
    for path in [
        "/api/v3/runner/tasks/running",
        "/api/v2/runner/tasks/running",
        "/api/v2/tasks/running",
    ] {
        let r = get(&c, &sim, &format!("{path}?resource-class=sim-org%2Flinux")).await;
        assert_eq!(r.json::<Running>().await.unwrap().running_runner_tasks, 0);
    }
    for path in ["/api/v3/runner", "/api/v2/runner"] {
        let r = get(&c, &sim, &format!("{path}?namespace=sim-org")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"items": []}));
    }

    // Valid token, unknown class: zeros, not an error.
    let r = get(
        &c,
        &sim,
        "/api/v3/runner/tasks?resource-class=nobody/nothing",
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Unclaimed>().await.unwrap().unclaimed_task_count, 0);

    // Counters per endpoint and class (aliases count as their endpoint).
    let stats = sim.requests();
    assert_eq!(stats.count(CLASS, Endpoint::UnclaimedTasks), 3);
    assert_eq!(stats.count(CLASS, Endpoint::RunningTasks), 3);
    assert_eq!(stats.count("nobody/nothing", Endpoint::UnclaimedTasks), 1);
    assert_eq!(stats.for_endpoint(Endpoint::RunnerList), 3);
    assert_eq!(stats.with_status(400), 3);
    assert_eq!(stats.total, 12);
    assert_eq!(sim.request_log().len(), 12);
}

// -------------------------------------------------------------------- faults

#[tokio::test]
async fn latency_fault_delays_then_expires() {
    let sim = sim().await;
    let c = client();
    let path = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    sim.inject_fault(Fault::latency(400).for_requests(1))
        .unwrap();
    let t = Instant::now();
    assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert!(sim.faults().is_empty());
}

#[tokio::test]
async fn rate_limit_fault_json_and_plain_text() {
    let sim = sim().await;
    let c = client();
    let path = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    sim.inject_fault(Fault::rate_limited(7).for_requests(1))
        .unwrap();
    sim.inject_fault(
        Fault::new(FaultKind::RateLimited {
            retry_after_secs: Some(3),
            body: RateLimitBody::PlainText,
        })
        .for_requests(1),
    )
    .unwrap();

    let r = get(&c, &sim, &path).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_eq!(r.headers()["ratelimit-reset"], "7");
    assert!(r.headers().contains_key("x-ratelimit-limit-minute"));
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));

    let r = get(&c, &sim, &path).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(r.text().await.unwrap(), "Rate limited.");

    assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
    assert_eq!(sim.requests().with_status(429), 2);
}

#[tokio::test]
async fn server_error_and_malformed_body_faults() {
    let sim = sim().await;
    let c = client();
    let unclaimed = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    let running = format!("/api/v3/runner/tasks/running?resource-class={CLASS}");
    sim.inject_fault(Fault::server_error(503).for_requests(2))
        .unwrap();
    assert_eq!(
        get(&c, &sim, &unclaimed).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&c, &sim, &running).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&c, &sim, &unclaimed).await.status(), StatusCode::OK);

    sim.inject_fault(Fault::malformed().for_requests(2))
        .unwrap();
    let r = get(&c, &sim, &unclaimed).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.json::<Unclaimed>().await.is_err());
    let r = get(&c, &sim, &running).await;
    assert!(r.json::<Running>().await.is_err());
    assert!(
        get(&c, &sim, &running)
            .await
            .json::<Running>()
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn faults_respect_class_and_endpoint_scope() {
    let sim = sim().await;
    let c = client();
    sim.add_resource_class("sim-org/arm", "arm-token");
    sim.inject_fault(Fault::server_error(500).for_class("sim-org/arm"))
        .unwrap();
    sim.inject_fault(Fault::server_error(502).on_endpoint(Endpoint::RunnerList))
        .unwrap();
    let r = get(&c, &sim, "/api/v3/runner/tasks?resource-class=sim-org/arm").await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let r = get(
        &c,
        &sim,
        &format!("/api/v3/runner/tasks?resource-class={CLASS}"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = get(&c, &sim, &format!("/api/v3/runner?resource-class={CLASS}")).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(sim.faults().len(), 2, "until-cleared faults stay");
    sim.clear_faults();
    let r = get(&c, &sim, "/api/v3/runner/tasks?resource-class=sim-org/arm").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn outage_faults_fail_the_connection() {
    let sim = sim().await;
    let c = client();
    let path = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    for mode in [OutageMode::Reset, OutageMode::Close] {
        sim.inject_fault(Fault::outage(mode).for_requests(1))
            .unwrap();
        let err = c
            .get(url(&sim, &path))
            .header("Circle-Token", TEST_API_TOKEN)
            .send()
            .await
            .expect_err("outage must fail the request");
        assert!(!err.is_timeout(), "{mode:?}: {err}");
        assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
    }
    sim.inject_fault(Fault::outage(OutageMode::Hang).for_requests(1))
        .unwrap();
    let err = c
        .get(url(&sim, &path))
        .header("Circle-Token", TEST_API_TOKEN)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("a hung request must time out");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
    assert_eq!(sim.requests().connection_failures, 3);
}

#[tokio::test]
async fn faults_expire_after_wall_seconds() {
    let sim = sim().await;
    let c = client();
    let path = format!("/api/v3/runner/tasks?resource-class={CLASS}");
    sim.inject_fault(Fault::server_error(500).for_duration(Duration::from_millis(400)))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            get(&c, &sim, &path).await.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(get(&c, &sim, &path).await.status(), StatusCode::OK);
}

// -------------------------------------------------------------------- agents

fn find<'a>(ledger: &'a [TaskRecord], id: &str, attempt: u32) -> &'a TaskRecord {
    ledger
        .iter()
        .find(|r| r.id.0 == id && r.attempt == attempt)
        .unwrap_or_else(|| panic!("no record {id}#{attempt} in {ledger:#?}"))
}

#[tokio::test]
async fn valid_guest_claims_runs_finishes_and_powers_off() {
    let sim = sim().await;
    let c = client();
    let id = sim.enqueue(CLASS, Duration::from_secs(60)); // 0.6 s wall
    let g = boot(&sim.guest(), "linux-0", user_data(&sim, TEST_RUNNER_TOKEN));

    sim.wait_until(WAIT, |s| (s.counts(CLASS) == (0, 1)).then_some(()))
        .await
        .unwrap();
    let r = get(
        &c,
        &sim,
        &format!("/api/v3/runner/tasks/running?resource-class={CLASS}"),
    )
    .await;
    assert_eq!(r.json::<Running>().await.unwrap().running_runner_tasks, 1);
    let r = get(&c, &sim, &format!("/api/v3/runner?resource-class={CLASS}")).await;
    let list: Value = r.json().await.unwrap();
    let item = &list["items"][0];
    assert_eq!(item["name"], "linux-0");
    assert_eq!(item["hostname"], "linux-0");
    assert_eq!(item["resource_class"], CLASS);
    assert!(item["last_used"].is_string(), "{list}");
    assert!(
        humantime::parse_rfc3339(item["first_connected"].as_str().unwrap()).is_ok(),
        "{list}"
    );
    assert!(!g.powered_off(), "still running its task");

    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    assert_eq!(sim.counts(CLASS), (0, 0));
    let r = get(
        &c,
        &sim,
        &format!("/api/v3/runner/tasks/running?resource-class={CLASS}"),
    )
    .await;
    assert_eq!(r.json::<Running>().await.unwrap().running_runner_tasks, 0);

    let ledger = sim.ledger();
    assert_eq!(ledger.len(), 1);
    let rec = &ledger[0];
    assert_eq!(rec.id, id);
    assert_eq!(rec.state, TaskState::Finished);
    assert!(!rec.killed);
    let claimed = rec.claimed_at.unwrap();
    let finished = rec.finished_at.unwrap();
    assert!(
        claimed >= 5.0,
        "claims after the 5 s registration delay: {rec:?}"
    );
    let ran = finished - claimed;
    assert!((60.0..75.0).contains(&ran), "ran {ran} simulated s");
    let runner = rec.runner.as_ref().unwrap();
    assert_eq!(runner.vm_name, "linux-0");
    assert_eq!(runner.vmi_uid, g.uid);

    let agent = &sim.agents()[0];
    assert_eq!(agent.state, AgentState::Exited);
    assert_eq!(agent.exit_reason, Some(ExitReason::Completed));
    assert!(agent.powered_off);
    // Exited runners stay listed for a while.
    let r = get(&c, &sim, "/api/v3/runner?namespace=sim-org").await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn base64_encoded_runner_config_works() {
    let sim = sim().await;
    sim.enqueue(CLASS, Duration::from_secs(1));
    let content = format!(
        "api:\n  auth_token: {TEST_RUNNER_TOKEN}\n  url: {}/\nrunner:\n  mode: single-task\n",
        sim.base_url()
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(content);
    let ud = format!(
        "#cloud-config\nwrite_files:\n  - path: {RUNNER_CONFIG_PATH}\n    encoding: b64\n    content: {b64}\n"
    );
    let g = boot(&sim.guest(), "linux-b64", Some(ud));
    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    assert_eq!(sim.ledger()[0].state, TaskState::Finished);
}

#[tokio::test]
async fn wrong_token_or_url_never_claims() {
    let sim = sim().await;
    let c = client();
    sim.enqueue(CLASS, Duration::from_secs(10));
    let other = CircleCiSim::start(CircleCiSimConfig::for_tests())
        .await
        .unwrap();
    let guest = sim.guest();
    let bad_token = boot(&guest, "bad-token", user_data(&sim, "not-a-runner-token"));
    let api_token = boot(&guest, "api-token", user_data(&sim, TEST_API_TOKEN));
    let bad_url = boot(
        &guest,
        "bad-url",
        Some(render_user_data(
            &other.base_url(),
            TEST_RUNNER_TOKEN,
            RunnerMode::SingleTask,
            None,
        )),
    );
    // 100 simulated seconds: 20 times the registration delay.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.counts(CLASS), (1, 0));
    assert_eq!(sim.ledger()[0].state, TaskState::Queued);
    for g in [&bad_token, &api_token, &bad_url] {
        assert!(!g.powered_off());
    }
    let agents = sim.agents();
    let problem = |vm: &str| agents.iter().find(|a| a.vm_name == vm).unwrap().problem;
    assert_eq!(problem("bad-token"), Some(AgentProblem::UnknownToken));
    assert_eq!(problem("api-token"), Some(AgentProblem::UnknownToken));
    assert_eq!(problem("bad-url"), Some(AgentProblem::WrongUrl));
    let r = get(&c, &sim, &format!("/api/v3/runner?resource-class={CLASS}")).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"items": []}));

    // A valid guest still gets the task.
    let good = boot(&guest, "good", user_data(&sim, TEST_RUNNER_TOKEN));
    sim.wait_until(WAIT, |_| good.powered_off().then_some(()))
        .await
        .unwrap();
    assert_eq!(sim.ledger()[0].runner.as_ref().unwrap().vm_name, "good");
}

#[tokio::test]
async fn misconfigured_guest_with_idle_timeout_powers_off_without_claiming() {
    let sim = sim().await;
    sim.enqueue(CLASS, Duration::from_secs(10));
    let ud = render_user_data(
        &sim.base_url(),
        "not-a-runner-token",
        RunnerMode::SingleTask,
        Some(Duration::from_secs(30)),
    );
    let g = boot(&sim.guest(), "bad-token", Some(ud));
    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    assert_eq!(sim.counts(CLASS), (1, 0));
    assert_eq!(sim.agents()[0].exit_reason, Some(ExitReason::IdleTimeout));
}

#[tokio::test]
async fn broken_user_data_never_starts_and_bad_config_exits() {
    let sim = sim().await;
    sim.enqueue(CLASS, Duration::from_secs(10));
    let guest = sim.guest();
    let none = boot(&guest, "no-user-data", None);
    let garbage = boot(&guest, "garbage", Some("\u{0}\u{1}not yaml: [".into()));
    let script = boot(&guest, "script", Some("#!/bin/sh\necho hi\n".into()));
    let no_token = boot(
        &guest,
        "no-token",
        Some(format!(
            "#cloud-config\nwrite_files:\n- path: {RUNNER_CONFIG_PATH}\n  content: |\n    api:\n      url: {}\n",
            sim.base_url()
        )),
    );
    sim.wait_until(WAIT, |_| no_token.powered_off().then_some(()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for g in [&none, &garbage, &script] {
        assert!(!g.powered_off());
    }
    assert_eq!(sim.counts(CLASS), (1, 0));
    for a in sim.agents() {
        let expected = if a.vm_name == "no-token" {
            AgentProblem::InvalidRunnerConfig
        } else {
            AgentProblem::BrokenUserData
        };
        assert_eq!(a.problem, Some(expected), "{a:?}");
    }
}

#[tokio::test]
async fn idle_timeout_powers_off_with_nothing_queued() {
    let sim = sim().await;
    let ud = render_user_data(
        &sim.base_url(),
        TEST_RUNNER_TOKEN,
        RunnerMode::SingleTask,
        Some(Duration::from_secs(30)),
    );
    let t = Instant::now();
    let g = boot(&sim.guest(), "idle-0", Some(ud));
    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    let took = g.powered_off_at.lock().unwrap().unwrap() - t;
    // 5 s registration + 30 s idle, at 100x.
    assert!(took >= Duration::from_millis(350), "{took:?}");
    let agent = &sim.agents()[0];
    assert_eq!(agent.exit_reason, Some(ExitReason::IdleTimeout));
    assert_eq!(agent.tasks_run, 0);
    assert!(sim.ledger().is_empty());
}

#[tokio::test]
async fn vanish_mid_task_kills_and_requeues_at_the_front() {
    let sim = sim().await;
    let guest = sim.guest();
    sim.enqueue_many(EnqueueRequest::new(CLASS, Duration::from_secs(1000)).id("first"))
        .unwrap();
    let a = boot(&guest, "linux-a", user_data(&sim, TEST_RUNNER_TOKEN));
    sim.wait_until(WAIT, |s| (s.counts(CLASS) == (0, 1)).then_some(()))
        .await
        .unwrap();
    sim.enqueue_many(EnqueueRequest::new(CLASS, Duration::from_secs(1)).id("second"))
        .unwrap();

    guest.vanish(&a.uid);
    assert_eq!(sim.counts(CLASS), (2, 0));
    let ledger = sim.ledger();
    let killed = find(&ledger, "first", 1);
    assert_eq!(killed.state, TaskState::Killed);
    assert!(killed.killed && killed.killed_at.is_some());
    assert_eq!(killed.runner.as_ref().unwrap().vmi_uid, a.uid);
    let retry = find(&ledger, "first", 2);
    assert_eq!(retry.state, TaskState::Queued);
    assert_eq!(retry.enqueued_at, killed.killed_at.unwrap());
    assert_eq!(retry.first_enqueued_at, killed.first_enqueued_at);
    // Vanishing again (or an unknown VMI) changes nothing.
    guest.vanish(&a.uid);
    guest.vanish("no-such-uid");
    assert_eq!(sim.ledger().len(), 3);

    // The next runner gets the re-queued attempt before the newer task.
    let b = boot(&guest, "linux-b", user_data(&sim, TEST_RUNNER_TOKEN));
    let rec = sim
        .wait_until(WAIT, |s| {
            s.ledger()
                .into_iter()
                .find(|r| r.id.0 == "first" && r.attempt == 2 && r.claimed_at.is_some())
        })
        .await
        .unwrap();
    assert_eq!(rec.runner.as_ref().unwrap().vm_name, "linux-b");
    assert_eq!(find(&sim.ledger(), "second", 1).state, TaskState::Queued);
    assert!(!a.powered_off(), "a vanished guest does not power off");
    assert!(!b.powered_off());
    assert_eq!(
        sim.agents()
            .iter()
            .find(|x| x.vm_name == "linux-a")
            .unwrap()
            .exit_reason,
        Some(ExitReason::Vanished)
    );
}

#[tokio::test]
async fn continuous_runner_claims_in_fifo_order() {
    let sim = sim().await;
    for id in ["t1", "t2", "t3"] {
        sim.enqueue_many(EnqueueRequest::new(CLASS, Duration::from_secs(10)).id(id))
            .unwrap();
    }
    let ud = render_user_data(
        &sim.base_url(),
        TEST_RUNNER_TOKEN,
        RunnerMode::Continuous,
        Some(Duration::from_secs(20)),
    );
    let g = boot(&sim.guest(), "cont-0", Some(ud));
    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    let ledger = sim.ledger();
    let claims: Vec<f64> = ["t1", "t2", "t3"]
        .iter()
        .map(|id| find(&ledger, id, 1).claimed_at.unwrap())
        .collect();
    assert!(claims[0] < claims[1] && claims[1] < claims[2], "{claims:?}");
    assert!(ledger.iter().all(|r| r.state == TaskState::Finished));
    let agent = &sim.agents()[0];
    assert_eq!(agent.tasks_run, 3);
    assert_eq!(agent.exit_reason, Some(ExitReason::IdleTimeout));
}

#[tokio::test]
async fn single_task_runners_take_tasks_oldest_first() {
    let sim = sim().await;
    for id in ["t1", "t2", "t3"] {
        sim.enqueue_many(EnqueueRequest::new(CLASS, Duration::from_secs(1000)).id(id))
            .unwrap();
    }
    let guest = sim.guest();
    for (n, expected) in ["t1", "t2", "t3"].iter().enumerate() {
        let vm = format!("linux-{n}");
        boot(&guest, &vm, user_data(&sim, TEST_RUNNER_TOKEN));
        let rec = sim
            .wait_until(WAIT, |s| {
                s.ledger()
                    .into_iter()
                    .find(|r| r.runner.as_ref().is_some_and(|x| x.vm_name == vm))
            })
            .await
            .unwrap();
        assert_eq!(rec.id.0, *expected);
    }
    assert_eq!(sim.counts(CLASS), (0, 3));
}

#[tokio::test]
async fn concurrency_limit_keeps_tasks_unclaimed() {
    let sim = CircleCiSim::start(CircleCiSimConfig::for_tests().with_concurrency_limit(Some(1)))
        .await
        .unwrap();
    sim.enqueue_many(EnqueueRequest::new(CLASS, Duration::from_secs(1000)).count(2))
        .unwrap();
    let guest = sim.guest();
    boot(&guest, "linux-0", user_data(&sim, TEST_RUNNER_TOKEN));
    boot(&guest, "linux-1", user_data(&sim, TEST_RUNNER_TOKEN));
    sim.wait_until(WAIT, |s| (s.counts(CLASS) == (1, 1)).then_some(()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.counts(CLASS), (1, 1), "the limit holds");
    sim.set_concurrency_limit(None);
    sim.wait_until(WAIT, |s| (s.counts(CLASS) == (0, 2)).then_some(()))
        .await
        .unwrap();
}

#[tokio::test]
async fn time_scale_runs_a_600s_task_in_about_a_second() {
    let sim = CircleCiSim::start(CircleCiSimConfig::for_tests().with_time_scale(600.0))
        .await
        .unwrap();
    sim.enqueue(CLASS, Duration::from_secs(600));
    let t = Instant::now();
    let g = boot(&sim.guest(), "fast-0", user_data(&sim, TEST_RUNNER_TOKEN));
    sim.wait_until(WAIT, |_| g.powered_off().then_some(()))
        .await
        .unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    let rec = &sim.ledger()[0];
    let ran = rec.finished_at.unwrap() - rec.claimed_at.unwrap();
    assert!((600.0..660.0).contains(&ran), "ran {ran} simulated s");
    assert!(sim.now_simulated() >= Duration::from_secs(600));
}

// ------------------------------------------------------ control API, logging

#[tokio::test]
async fn control_api_round_trip() {
    let sim = CircleCiSim::start(CircleCiSimConfig::default().with_time_scale(100.0))
        .await
        .unwrap();
    let c = client();
    let ctl = sim.control_url();
    let post = |path: &str, body: Value| c.post(format!("{ctl}{path}")).json(&body).send();

    let r = post("/api-tokens", json!({"token": "tok-1"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = post(
        "/resource-classes",
        json!({"resource_class": "acme/big", "runner_token": "rt-1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = post(
        "/resource-classes",
        json!({"resource_class": "Acme/big", "runner_token": "rt-1"}),
    )
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "namespace must be lowercase"
    );
    let r = post(
        "/tasks",
        json!({"resource_class": "acme/big", "duration_secs": 30, "count": 3, "label": "build"}),
    )
    .await
    .unwrap();
    let ids: Value = r.json().await.unwrap();
    assert_eq!(ids["ids"].as_array().unwrap().len(), 3);

    let api = |path: &str| {
        c.get(format!("{}{path}", sim.base_url()))
            .header("Circle-Token", "tok-1")
            .send()
    };
    let r = api("/api/v3/runner/tasks?resource-class=acme/big")
        .await
        .unwrap();
    assert_eq!(r.json::<Unclaimed>().await.unwrap().unclaimed_task_count, 3);

    let r = post(
        "/faults",
        json!({"resource_class": "acme/big", "kind": {"type": "server_error", "status": 504}, "limit": {"requests": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let faults: Value = get_json(&c, format!("{ctl}/faults")).await;
    assert_eq!(faults.as_array().unwrap().len(), 1);
    let r = api("/api/v3/runner/tasks?resource-class=acme/big")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let r = post(
        "/faults",
        json!({"kind": {"type": "server_error", "status": 200}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let counts: Value = get_json(&c, format!("{ctl}/counts?resource-class=acme%2Fbig")).await;
    assert_eq!(counts, json!({"unclaimed": 3, "running": 0}));
    let ledger: Vec<TaskRecord> = get_json(&c, format!("{ctl}/ledger")).await;
    assert_eq!(ledger.len(), 3);
    assert_eq!(ledger[0].label.as_deref(), Some("build"));
    let stats: rp_testenv::circleci::RequestStats = get_json(&c, format!("{ctl}/requests")).await;
    assert_eq!(stats.count("acme/big", Endpoint::UnclaimedTasks), 2);
    assert_eq!(stats.with_status(504), 1);

    let r = c
        .put(format!("{ctl}/settings"))
        .json(&json!({"concurrency_limit": 4, "registration_delay_secs": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(sim.settings().concurrency_limit, Some(4));
    let clock: Value = get_json(&c, format!("{ctl}/clock")).await;
    assert_eq!(clock["time_scale"], 100.0);

    let r = post("/reset", json!({})).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(sim.ledger().is_empty());
    assert_eq!(sim.requests().total, 0);
    assert_eq!(sim.resource_classes(), vec!["acme/big".to_string()]);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let sim = sim().await;
    let c = client();
    let base = sim.base_url();
    let guest = sim.guest();
    assert!(c.get(format!("{base}/api/v3/runner")).send().await.is_ok());
    drop(sim);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh = client();
    assert!(
        fresh
            .get(format!("{base}/api/v3/runner"))
            .send()
            .await
            .is_err()
    );
    // Booting into a stopped simulator is a harmless no-op.
    let g = boot(&guest, "late", None);
    assert!(!g.powered_off());
}

/// Captures log output of the current thread (tokio tests run agents on it).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let secret_runner = "runner-secret-XYZ123";
    let secret_api = "api-secret-ABC987";
    let sim = CircleCiSim::start(CircleCiSimConfig {
        api_tokens: vec![secret_api.into()],
        ..CircleCiSimConfig::for_tests()
    })
    .await
    .unwrap();
    sim.add_resource_class("sim-org/secret", secret_runner);
    sim.enqueue("sim-org/secret", Duration::from_secs(1));
    let guest = sim.guest();
    let good = boot(&guest, "good", user_data(&sim, secret_runner));
    boot(&guest, "wrong", user_data(&sim, "wrong-token-QQQ"));
    boot(
        &guest,
        "bad-type",
        Some(format!(
            "#cloud-config\nwrite_files:\n- path: {RUNNER_CONFIG_PATH}\n  content: \"api: {{auth_token: [\\\"list-token-WWW\\\"]}}\"\n"
        )),
    );
    sim.wait_until(WAIT, |_| good.powered_off().then_some(()))
        .await
        .unwrap();
    let r = client()
        .get(format!(
            "{}/api/v3/runner/tasks?resource-class=sim-org/secret",
            sim.base_url()
        ))
        .header("Circle-Token", "bad-api-token-PPP")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("never claims"),
        "the wrong token is reported:\n{text}"
    );
    assert!(text.contains("rejects its config"), "{text}");
    for secret in [
        secret_runner,
        secret_api,
        "wrong-token-QQQ",
        "list-token-WWW",
        "bad-api-token-PPP",
    ] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    let debug = format!("{:?}", CircleCiSimConfig::for_tests());
    assert!(
        !debug.contains(TEST_RUNNER_TOKEN) && !debug.contains(TEST_API_TOKEN),
        "{debug}"
    );
}

//! A real Kubernetes control plane on loopback, started the way
//! controller-runtime's envtest does it: etcd, kube-apiserver (TLS, a generated
//! CA, an admin client certificate, a kubeconfig) and kube-controller-manager
//! (garbage-collector and namespace controllers only), all built from their Go
//! modules by `tests/tools/build.sh`.
//!
//! Every process runs in its own process group with `PR_SET_PDEATHSIG`, so
//! nothing outlives the test: [`Drop`] sends SIGTERM (then SIGKILL) and removes
//! the temporary directory.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::{Client, Config};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

const VERSIONS_ENV: &str = include_str!("../../tools/versions.env");
const FIELD_MANAGER: &str = "rp-testenv";

/// Installs ring as rustls' process-wide default crypto provider (reqwest is
/// built without one). Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A pinned version from `tests/tools/versions.env`.
pub fn pinned_version(key: &str) -> &'static str {
    VERSIONS_ENV
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("{key} missing from tests/tools/versions.env"))
}

/// Where `tests/tools/build.sh` puts the binaries: `$RP_TOOLS_BIN`, else the
/// version-keyed directory under `$RP_TOOLS_CACHE` (default
/// `~/.cache/runner-provisioner/tools`).
pub fn tools_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RP_TOOLS_BIN") {
        return dir.into();
    }
    let cache = std::env::var_os("RP_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/runner-provisioner/tools")
        });
    cache
        .join(format!(
            "k8s-{}-etcd-{}-helm-{}",
            pinned_version("KUBE_VERSION"),
            pinned_version("ETCD_VERSION"),
            pinned_version("HELM_VERSION")
        ))
        .join("bin")
}

/// Path of one tool, or an error that says how to build it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = tools_bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} not found: the test control plane is built from Go modules. \
             Run `make tools` (tests/tools/build.sh) first; it needs Go and the Go module proxy \
             and takes 10-20 minutes cold, then it is cached by version",
            path.display()
        )
    }
}

/// What to set up before the control plane is handed out.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// Multi-document YAML of CustomResourceDefinitions, installed (and waited
    /// for until Established) before kube-controller-manager starts, so its
    /// garbage collector sees them at once.
    pub crds: Vec<String>,
}

struct Proc {
    name: &'static str,
    child: Child,
}

/// A running control plane. Dropping it stops every process.
pub struct ControlPlane {
    procs: Vec<Proc>,
    dir: Option<tempfile::TempDir>,
    kubeconfig: PathBuf,
    client: Client,
    server: String,
    /// Wall time from `start` until the apiserver answered and the CRDs were
    /// established (kube-controller-manager was started by then too).
    pub startup: Duration,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(name: &'static str, bin: &Path, args: &[String], log_dir: &Path) -> Result<Proc> {
    let log = File::create(log_dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc { name, child })
}

/// The first process of `procs` that has exited.
fn first_exited(procs: &mut [Proc]) -> Option<&'static str> {
    procs
        .iter_mut()
        .find_map(|p| matches!(p.child.try_wait(), Ok(Some(_))).then_some(p.name))
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct Pki {
    ca_pem: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    /// Service-account token signing key (private) and its public half: the
    /// apiserver's `--service-account-key-file` accepts only public keys.
    sa_key: String,
    sa_pub: String,
}

fn make_pki() -> Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rp-testenv-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    let sa = KeyPair::generate()?;
    Ok(Pki {
        ca_pem: ca.pem(),
        serving_cert: serving_cert.pem(),
        serving_key: serving_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        sa_key: sa.serialize_pem(),
        sa_pub: sa.public_key_pem(),
    })
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: rp-testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: rp-testenv\n  context:\n    cluster: rp-testenv\n    user: admin\n    namespace: default\ncurrent-context: rp-testenv\n",
        b64(&pki.ca_pem),
        b64(&pki.admin_cert),
        b64(&pki.admin_key)
    )
}

/// A kube client for a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    wait_while_alive(what, timeout, || None, check).await
}

/// Polls `check` until it answers true; fails at once when `exited` names a
/// process that died meanwhile (a crashed apiserver does not come back).
async fn wait_while_alive<E, F, Fut>(
    what: &str,
    timeout: Duration,
    mut exited: E,
    mut check: F,
) -> Result<()>
where
    E: FnMut() -> Option<&'static str>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if let Some(name) = exited() {
            return Err(anyhow!("{name} exited while waiting for {what}"));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "timed out after {timeout:?} waiting for {what}; last error: {last_err:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager on free
    /// loopback ports and waits until they serve.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane> {
        init_crypto();
        let t0 = Instant::now();
        let etcd_bin = tool("etcd")?;
        let apiserver_bin = tool("kube-apiserver")?;
        let kcm_bin = tool("kube-controller-manager")?;

        let dir = tempfile::Builder::new().prefix("rp-testenv-").tempdir()?;
        let root = dir.path().to_path_buf();
        let pki = make_pki()?;
        let certs = root.join("pki");
        std::fs::create_dir_all(&certs)?;
        let write = |name: &str, body: &str| -> Result<PathBuf> {
            let p = certs.join(name);
            std::fs::write(&p, body)?;
            Ok(p)
        };
        let ca = write("ca.crt", &pki.ca_pem)?;
        let tls_cert = write("apiserver.crt", &pki.serving_cert)?;
        let tls_key = write("apiserver.key", &pki.serving_key)?;
        let sa_key = write("sa.key", &pki.sa_key)?;
        let sa_pub = write("sa.pub", &pki.sa_pub)?;

        let mut cp = ControlPlane {
            procs: Vec::new(),
            dir: Some(dir),
            kubeconfig: root.join("kubeconfig"),
            client: Client::try_from(Config::new("https://127.0.0.1:1".parse()?))?,
            server: String::new(),
            startup: Duration::ZERO,
        };

        // etcd
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_args: Vec<String> = vec![
            "--name=rp-testenv".into(),
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=rp-testenv=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        cp.procs.push(spawn("etcd", &etcd_bin, &etcd_args, &root)?);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let health = format!("{etcd_url}/health");
        let procs = &mut cp.procs;
        let exited = || first_exited(procs);
        wait_while_alive("etcd /health", Duration::from_secs(60), exited, || {
            let (http, health) = (http.clone(), health.clone());
            async move {
                let body = http.get(&health).send().await?.text().await?;
                Ok(body.contains("\"health\":\"true\""))
            }
        })
        .await
        .map_err(|e| anyhow!("{e}\netcd log:\n{}", log_tail(&root, "etcd")))?;

        // kube-apiserver
        let port = free_port()?;
        cp.server = format!("https://127.0.0.1:{port}");
        let api_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", certs.display()),
            format!("--tls-cert-file={}", tls_cert.display()),
            format!("--tls-private-key-file={}", tls_key.display()),
            format!("--client-ca-file={}", ca.display()),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // A loopback advertise address is refused by the lease endpoint
            // reconciler (1.37: "may not be in the loopback range"); nothing
            // here needs the `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--authorization-mode=RBAC".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            format!("--service-account-issuer=https://127.0.0.1:{port}/"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--v=1".into(),
        ];
        cp.procs
            .push(spawn("kube-apiserver", &apiserver_bin, &api_args, &root)?);
        std::fs::write(&cp.kubeconfig, kubeconfig_yaml(&cp.server, &pki))?;
        cp.client = client_from_kubeconfig(&cp.kubeconfig).await?;
        let client = cp.client.clone();
        let procs = &mut cp.procs;
        let exited = || first_exited(procs);
        let what = "kube-apiserver /readyz and the default namespace";
        wait_while_alive(what, Duration::from_secs(120), exited, || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                let text = client.request_text(req).await?;
                if text.trim() != "ok" {
                    return Ok(false);
                }
                let ns: Api<Namespace> = Api::all(client);
                Ok(ns.get_opt("default").await?.is_some())
            }
        })
        .await
        .map_err(|e| {
            anyhow!(
                "{e}\nkube-apiserver log:\n{}",
                log_tail(&root, "kube-apiserver")
            )
        })?;

        for yaml in &opts.crds {
            cp.apply_yaml(yaml).await?;
        }

        // kube-controller-manager: garbage collector and namespace controller.
        let kcm_args: Vec<String> = vec![
            format!("--kubeconfig={}", cp.kubeconfig.display()),
            "--controllers=garbage-collector-controller,namespace-controller".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--use-service-account-credentials=false".into(),
            "--concurrent-gc-syncs=5".into(),
        ];
        cp.procs.push(spawn(
            "kube-controller-manager",
            &kcm_bin,
            &kcm_args,
            &root,
        )?);
        cp.startup = t0.elapsed();
        Ok(cp)
    }

    /// The admin client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig file.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The temporary directory holding certificates, data and process logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir is kept until drop").path()
    }

    /// Name and pid of each control-plane process (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`). Each is the leader of its own process group.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs.iter().map(|p| (p.name, p.child.id())).collect()
    }

    /// Whether a control-plane process has exited (it should not have).
    pub fn exited(&mut self) -> Vec<&'static str> {
        self.procs
            .iter_mut()
            .filter_map(|p| matches!(p.child.try_wait(), Ok(Some(_))).then_some(p.name))
            .collect()
    }

    /// Server-side applies every document of a multi-document YAML string.
    /// CustomResourceDefinitions are waited for until Established.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<()> {
        apply_yaml(&self.client, yaml).await
    }
}

/// Server-side applies every document of a multi-document YAML string with the
/// given client; namespaced objects without a namespace go to `default`.
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<()> {
    use serde::Deserialize;
    let mut discovery: Option<Discovery> = None;
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone())?;
        let tm = obj
            .types
            .clone()
            .ok_or_else(|| anyhow!("document without apiVersion/kind"))?;
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("{} without a name", tm.kind))?;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        if tm.kind == "CustomResourceDefinition" {
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            api.patch(&name, &pp, &Patch::Apply(&value)).await?;
            wait_for(
                &format!("CRD {name} Established"),
                Duration::from_secs(60),
                || {
                    let api = api.clone();
                    let name = name.clone();
                    async move {
                        let crd = api.get(&name).await?;
                        Ok(crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        }))
                    }
                },
            )
            .await?;
            discovery = None;
            continue;
        }
        let (group, version) = match tm.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), tm.api_version.clone()),
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &tm.kind);
        if discovery
            .as_ref()
            .and_then(|d| d.resolve_gvk(&gvk))
            .is_none()
        {
            discovery = Some(Discovery::new(client.clone()).run().await?);
        }
        let (ar, caps) = discovery
            .as_ref()
            .and_then(|d| d.resolve_gvk(&gvk))
            .ok_or_else(|| anyhow!("the apiserver does not serve {gvk:?}"))?;
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let ns = obj
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(&name, &pp, &Patch::Apply(&value))
            .await
            .with_context(|| format!("applying {} {name}", tm.kind))?;
    }
    Ok(())
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stop in reverse order: controller-manager, apiserver, etcd.
        for p in self.procs.iter_mut().rev() {
            let pgid = Pid::from_raw(p.child.id() as i32);
            let _ = killpg(pgid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = killpg(pgid, Signal::SIGKILL);
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
        }
        if std::env::var_os("RP_KEEP_TESTENV").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("rp-testenv: kept {}", dir.keep().display());
        }
    }
}

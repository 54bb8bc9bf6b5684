//! The Kubernetes manifests, checked offline.
//!
//! `kubectl kustomize manifests/` renders the base (and
//! `manifests/overlays/ha/` the three-member etcd overlay; every check
//! below runs on both); `kubernetes-validate
//! --strict` checks the result against the schema of [`K8S_VERSION`]; then
//! every object is read into `k8s-openapi` types of the same version with
//! any unknown field reported (serde_ignored), and the things a schema
//! cannot see are asserted: selectors match template labels, Services
//! select a workload and target a port it has, probes point at real ports,
//! every container's args parse with the real binaries' clap definitions
//! and agree with the ports and Services around them, grace periods fit
//! the drain, images are pinned and non-root.
//!
//! kubectl and kubernetes-validate come from `scripts/setup.sh`; a missing
//! tool fails the test with the command that installs it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, Namespace, PodTemplateSpec, Probe, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

/// The Kubernetes version everything is validated against (k8s-openapi's
/// feature in Cargo.toml must match).
const K8S_VERSION: &str = "1.33.0";

/// The image repository of our binaries; the tag is the workspace version.
const REPO: &str = "localhost/greet-etcd/";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

fn tool_missing(tool: &str, install: &str) -> ! {
    panic!(
        "{tool} not found on PATH: this test needs it. `./scripts/setup.sh` installs it ({install})."
    )
}

/// `kubectl kustomize <dir>`.
fn render(dir: &Path) -> String {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tool_missing("kubectl", "Debian's kubernetes-client")
        }
        Err(e) => panic!("running kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// Runs `kubernetes-validate --strict` on `yaml`; Ok(output) or Err(output).
fn validate(yaml: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).expect("writing the rendered YAML");
    let args = ["--strict", "--kubernetes-version", K8S_VERSION];
    // The console script, or the module where pip's scripts dir is not on PATH.
    let out = match Command::new("kubernetes-validate")
        .args(args)
        .arg(&file)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Command::new("python3")
            .args(["-m", "kubernetes_validate"])
            .args(args)
            .arg(&file)
            .output(),
        other => other,
    };
    let out = match out {
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No module named") => {
            tool_missing("kubernetes-validate", "pip install kubernetes-validate")
        }
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tool_missing("kubernetes-validate", "pip install kubernetes-validate")
        }
        Err(e) => panic!("running kubernetes-validate: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn rendered_manifests_pass_strict_schema_validation() {
    let overlay = render(&repo_root().join("manifests/overlays/ha"));
    let report = validate(&overlay)
        .unwrap_or_else(|e| panic!("kubernetes-validate failed on the HA overlay:\n{e}"));
    for kind in [
        "poddisruptionbudget/etcd",
        "poddisruptionbudget/controller",
        "statefulset/etcd",
    ] {
        assert!(
            report.contains(&format!("resource {kind} ")),
            "{kind} was validated:\n{report}"
        );
    }
    let yaml = render(&repo_root().join("manifests"));
    let report = validate(&yaml).unwrap_or_else(|e| panic!("kubernetes-validate failed:\n{e}"));
    for kind in [
        "namespace/greet-etcd",
        "statefulset/etcd",
        "deployment/greet-server",
        "deployment/controller",
        "deployment/greet-client",
        "service/controller",
        "networkpolicy/controller",
    ] {
        assert!(
            report.contains(&format!("resource {kind} ")),
            "{kind} was validated:\n{report}"
        );
    }
    // --strict has teeth: a misspelt field is an error, not a warning.
    let broken = yaml.replacen("readinessProbe:", "readynessProbe:", 1);
    assert_ne!(broken, yaml);
    let err = validate(&broken).expect_err("a misspelt field fails --strict");
    assert!(err.contains("readynessProbe"), "{err}");
}

/// One rendered object, typed.
enum Object {
    Namespace(Box<Namespace>),
    Service(Box<Service>),
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
    NetworkPolicy(Box<NetworkPolicy>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
}

/// Deserializes `value` as `T`, failing on any field `T` does not know.
fn strict<T: DeserializeOwned>(value: serde_norway::Value, what: &str) -> Result<T> {
    let mut unknown = Vec::new();
    let t = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
        .with_context(|| format!("{what} does not deserialize"))?;
    ensure!(unknown.is_empty(), "{what}: unknown fields {unknown:?}");
    Ok(t)
}

fn parse_objects(yaml: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value: serde_norway::Value = serde::Deserialize::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let what = format!("{kind}/{name}");
        objects.push(match kind.as_str() {
            "Namespace" => Object::Namespace(strict(value, &what)?),
            "Service" => Object::Service(strict(value, &what)?),
            "Deployment" => Object::Deployment(strict(value, &what)?),
            "StatefulSet" => Object::StatefulSet(strict(value, &what)?),
            "NetworkPolicy" => Object::NetworkPolicy(strict(value, &what)?),
            "PodDisruptionBudget" => Object::PodDisruptionBudget(strict(value, &what)?),
            other => bail!("{what}: no check written for kind {other:?}; add one"),
        });
    }
    Ok(objects)
}

/// A Deployment or StatefulSet, reduced to what the checks need.
struct Workload {
    kind: &'static str,
    name: String,
    namespace: Option<String>,
    replicas: i32,
    selector: BTreeMap<String, String>,
    template: PodTemplateSpec,
    /// A StatefulSet's governing (headless) Service.
    service_name: Option<String>,
}

impl Workload {
    fn labels(&self) -> BTreeMap<String, String> {
        self.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default()
    }

    fn selected_by(&self, selector: &BTreeMap<String, String>) -> bool {
        !selector.is_empty() && subset(selector, &self.labels())
    }

    fn spec(&self) -> &k8s_openapi::api::core::v1::PodSpec {
        self.template
            .spec
            .as_ref()
            .expect("pod template has a spec")
    }

    fn containers(&self) -> &[Container] {
        &self.spec().containers
    }

    fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

fn subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// The container port a probe or Service names (by name or number).
fn container_port(c: &Container, port: &IntOrString) -> Option<i32> {
    let ports = c.ports.as_deref().unwrap_or_default();
    match port {
        IntOrString::Int(n) => ports
            .iter()
            .find(|p| p.container_port == *n)
            .map(|p| p.container_port),
        IntOrString::String(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}

fn probe_ports(c: &Container, probe: &Probe) -> Vec<IntOrString> {
    let _ = c;
    let mut v = Vec::new();
    if let Some(h) = &probe.http_get {
        v.push(h.port.clone());
    }
    if let Some(t) = &probe.tcp_socket {
        v.push(t.port.clone());
    }
    if let Some(g) = &probe.grpc {
        v.push(IntOrString::Int(g.port));
    }
    v
}

/// `$(VAR)` expanded as the kubelet does, from the container's env, with
/// downward-API fields given sample values. Unknown references stay as
/// they are (as in Kubernetes), so a test sees them.
fn expand(arg: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) if env.contains_key(&after[..j]) => {
                out.push_str(&env[&after[..j]]);
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn container_env(w: &Workload, c: &Container) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for e in c.env.as_deref().unwrap_or_default() {
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(field) = e
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
        {
            match field {
                "status.podIP" => "10.244.1.7".to_owned(),
                "metadata.name" => format!("{}-0", w.name),
                "metadata.namespace" => w.namespace.clone().unwrap_or_default(),
                other => panic!("{}: fieldRef {other} has no sample value here", w.id()),
            }
        } else {
            continue;
        };
        env.insert(e.name.clone(), value);
    }
    env
}

/// The container's argv as the kubelet would start it: the image's
/// entrypoint (the binary named like the image) and the expanded args.
fn argv(w: &Workload, c: &Container) -> Vec<String> {
    assert!(
        c.command.is_none(),
        "{}: our images have the binary as ENTRYPOINT; set args, not command",
        w.id()
    );
    let env = container_env(w, c);
    let mut argv = vec![binary_of(c).to_owned()];
    for a in c.args.as_deref().unwrap_or_default() {
        let a = expand(a, &env);
        assert!(
            !a.contains("$("),
            "{}: unresolved reference in {a:?}",
            w.id()
        );
        argv.push(a);
    }
    argv
}

/// `localhost/greet-etcd/greet-server:0.1.0` -> `greet-server`.
fn binary_of(c: &Container) -> &str {
    let image = c.image.as_deref().expect("image set");
    let path = image.strip_prefix(REPO).expect("one of our images");
    path.split(':').next().expect("image name")
}

/// (host, port) of `host:port`.
fn host_port(s: &str) -> (String, i32) {
    let s = s
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let (h, p) = s.rsplit_once(':').expect("host:port");
    (h.to_owned(), p.parse().expect("numeric port"))
}

struct Rendered {
    namespace: String,
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: Vec<NetworkPolicy>,
    budgets: Vec<PodDisruptionBudget>,
    /// Which kustomization this is (for messages).
    source: &'static str,
}

impl Rendered {
    fn load(yaml: &str) -> Result<Self> {
        let mut namespaces = Vec::new();
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        let mut policies = Vec::new();
        let mut budgets = Vec::new();
        for o in parse_objects(yaml)? {
            match o {
                Object::Namespace(n) => {
                    namespaces.push(n.metadata.name.clone().unwrap_or_default())
                }
                Object::Service(s) => services.push(*s),
                Object::NetworkPolicy(p) => policies.push(*p),
                Object::PodDisruptionBudget(b) => budgets.push(*b),
                Object::Deployment(d) => {
                    let spec = d.spec.context("deployment spec")?;
                    workloads.push(Workload {
                        kind: "Deployment",
                        name: d.metadata.name.unwrap_or_default(),
                        namespace: d.metadata.namespace,
                        replicas: spec.replicas.unwrap_or(1),
                        selector: spec.selector.match_labels.unwrap_or_default(),
                        template: spec.template,
                        service_name: None,
                    })
                }
                Object::StatefulSet(s) => {
                    let spec = s.spec.context("statefulset spec")?;
                    workloads.push(Workload {
                        kind: "StatefulSet",
                        name: s.metadata.name.unwrap_or_default(),
                        namespace: s.metadata.namespace,
                        replicas: spec.replicas.unwrap_or(1),
                        selector: spec.selector.match_labels.unwrap_or_default(),
                        template: spec.template,
                        service_name: spec.service_name,
                    })
                }
            }
        }
        ensure!(
            namespaces.len() == 1,
            "exactly one Namespace: {namespaces:?}"
        );
        Ok(Self {
            namespace: namespaces.remove(0),
            workloads,
            services,
            policies,
            budgets,
            source: "",
        })
    }

    fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Service {name}"))
    }

    /// The (workload, container port) a client reaches through `host:port`,
    /// where host is a Service name, short or qualified with the namespace.
    fn resolve(&self, host: &str, port: i32) -> Result<(&Workload, i32)> {
        let name = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        // `<pod>.<headless service>[.<namespace>]`: one StatefulSet pod.
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() >= 2 {
            if let Some(w) = self.workloads.iter().find(|w| {
                w.service_name.as_deref() == Some(labels[1])
                    && (0..w.replicas).any(|i| labels[0] == format!("{}-{i}", w.name))
            }) {
                ensure!(
                    labels.len() == 2 || labels[2] == self.namespace,
                    "{host}: another namespace"
                );
                let svc = self
                    .services
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(labels[1]))
                    .with_context(|| format!("{host}: no Service named {}", labels[1]))?;
                let spec = svc.spec.as_ref().context("service spec")?;
                ensure!(
                    spec.cluster_ip.as_deref() == Some("None"),
                    "{host}: pod names resolve only under a headless Service"
                );
                ensure!(
                    w.selected_by(&spec.selector.clone().unwrap_or_default()),
                    "{host}: the headless Service does not select {}",
                    w.id()
                );
                let cport = w
                    .containers()
                    .iter()
                    .find_map(|c| container_port(c, &IntOrString::Int(port)))
                    .with_context(|| format!("{host}: {} has no port {port}", w.id()))?;
                return Ok((w, cport));
            }
        }
        let name = match name.split_once('.') {
            Some((svc, ns)) => {
                ensure!(ns == self.namespace, "{host}: another namespace");
                svc
            }
            None => name,
        };
        let svc = self
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .with_context(|| format!("{host}: no Service named {name}"))?;
        let spec = svc.spec.as_ref().context("service spec")?;
        let sp = spec
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.port == port)
            .with_context(|| format!("Service {name} has no port {port}"))?;
        let selector = spec.selector.clone().unwrap_or_default();
        let w = self
            .workloads
            .iter()
            .find(|w| w.selected_by(&selector))
            .with_context(|| format!("Service {name} selects no workload"))?;
        let target = sp.target_port.clone().unwrap_or(IntOrString::Int(port));
        let cport = w
            .containers()
            .iter()
            .find_map(|c| container_port(c, &target))
            .with_context(|| format!("Service {name}: {} has no port {target:?}", w.id()))?;
        Ok((w, cport))
    }
}

/// The kustomizations every check runs on: the base and the HA overlay.
const SOURCES: [&str; 2] = ["manifests", "manifests/overlays/ha"];

fn rendered_from(source: &'static str) -> Rendered {
    let mut r = Rendered::load(&render(&repo_root().join(source)))
        .unwrap_or_else(|e| panic!("{source} rendered: {e:#}"));
    r.source = source;
    r
}

/// Every kustomization, rendered and loaded.
fn rendered_all() -> Vec<Rendered> {
    SOURCES.into_iter().map(rendered_from).collect()
}

#[test]
fn every_object_is_typed_with_no_unknown_field() {
    let overlay =
        parse_objects(&render(&repo_root().join("manifests/overlays/ha"))).expect("typed");
    assert!(
        overlay
            .iter()
            .any(|o| matches!(o, Object::PodDisruptionBudget(_))),
        "the HA overlay's budgets are checked too"
    );
    let yaml = render(&repo_root().join("manifests"));
    let objects = parse_objects(&yaml).expect("typed");
    assert!(objects.len() >= 8, "{} objects", objects.len());
    // The check has teeth: a field k8s-openapi does not know is reported.
    let broken = yaml.replacen("enableServiceLinks: false", "enableServiceLink: false", 1);
    assert_ne!(broken, yaml);
    let err = parse_objects(&broken)
        .err()
        .expect("an unknown field fails");
    assert!(format!("{err:#}").contains("enableServiceLink"), "{err:#}");
}

#[test]
fn workloads_are_consistent_pinned_and_locked_down() {
    for r in rendered_all() {
        assert_eq!(r.namespace, "greet-etcd");
        let version = env!("CARGO_PKG_VERSION");
        for w in &r.workloads {
            let id = w.id();
            assert_eq!(w.namespace.as_deref(), Some(r.namespace.as_str()), "{id}");
            assert!(!w.selector.is_empty(), "{id}: a selector");
            assert!(
                subset(&w.selector, &w.labels()),
                "{id}: selector {:?} matches template labels {:?}",
                w.selector,
                w.labels()
            );
            let spec = w.spec();
            assert_eq!(spec.enable_service_links, Some(false), "{id}");
            assert_eq!(spec.automount_service_account_token, Some(false), "{id}");
            let psc = spec.security_context.as_ref().expect("pod securityContext");
            assert_eq!(psc.run_as_non_root, Some(true), "{id}");
            assert!(psc.run_as_user.is_some_and(|u| u > 0), "{id}: non-root uid");
            for c in &spec.containers {
                let cid = format!("{id}/{}", c.name);
                let image = c.image.as_deref().unwrap_or_default();
                let (_, tag) = image.rsplit_once(':').unwrap_or_default();
                assert!(
                    !tag.is_empty() && tag != "latest",
                    "{cid}: pinned tag: {image}"
                );
                if image.starts_with(REPO) {
                    assert_eq!(
                        tag, version,
                        "{cid}: our images carry the workspace version"
                    );
                } else {
                    assert!(
                        image.starts_with("quay.io/coreos/etcd:v3.5."),
                        "{cid}: only the upstream etcd image besides ours: {image}"
                    );
                }
                assert_eq!(
                    c.image_pull_policy.as_deref(),
                    Some("IfNotPresent"),
                    "{cid}"
                );
                let sc = c
                    .security_context
                    .as_ref()
                    .expect("container securityContext");
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{cid}");
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{cid}");
                let drop = sc
                    .capabilities
                    .as_ref()
                    .and_then(|c| c.drop.clone())
                    .unwrap_or_default();
                assert_eq!(drop, ["ALL"], "{cid}: drops every capability");
                let res = c.resources.as_ref().expect("resources");
                for (what, m) in [("requests", &res.requests), ("limits", &res.limits)] {
                    let m = m.as_ref().unwrap_or_else(|| panic!("{cid}: {what}"));
                    assert!(
                        m.contains_key("cpu") && m.contains_key("memory"),
                        "{cid}: {what} for cpu and memory"
                    );
                }
                for (which, probe) in [
                    ("readiness", &c.readiness_probe),
                    ("liveness", &c.liveness_probe),
                    ("startup", &c.startup_probe),
                ] {
                    let Some(probe) = probe else { continue };
                    let ports = probe_ports(c, probe);
                    assert!(!ports.is_empty(), "{cid}: {which} probe has a port");
                    for p in ports {
                        assert!(
                            container_port(c, &p).is_some(),
                            "{cid}: {which} probe port {p:?} is a container port"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn services_select_workloads_and_target_real_ports() {
    for r in rendered_all() {
        assert!(!r.services.is_empty());
        for s in &r.services {
            let name = s.metadata.name.clone().unwrap_or_default();
            assert_eq!(
                s.metadata.namespace.as_deref(),
                Some(r.namespace.as_str()),
                "{name}"
            );
            for p in s
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .expect("ports")
            {
                let (w, _) = r
                    .resolve(&name, p.port)
                    .unwrap_or_else(|e| panic!("Service {name} port {}: {e:#}", p.port));
                assert!(w.replicas > 0, "{name} selects {} with replicas", w.id());
            }
        }
        // The headless Service of the StatefulSet exists and is headless.
        let etcd = r
            .workloads
            .iter()
            .find(|w| w.kind == "StatefulSet")
            .expect("etcd");
        let headless = r.services.iter().find(|s| {
            s.spec
                .as_ref()
                .is_some_and(|sp| sp.cluster_ip.as_deref() == Some("None"))
        });
        let headless = headless.expect("a headless Service");
        assert!(etcd.selected_by(
            &headless
                .spec
                .as_ref()
                .unwrap()
                .selector
                .clone()
                .unwrap_or_default()
        ));
        for p in &r.policies {
            assert_eq!(p.metadata.namespace.as_deref(), Some(r.namespace.as_str()));
        }
    }
}

/// The etcd StatefulSet: one member in the base, three in the HA overlay,
/// and its initial cluster lists exactly its replicas under names the
/// headless Service resolves.
#[test]
fn etcd_members_match_the_initial_cluster() {
    for r in rendered_all() {
        let etcd = r.workload("etcd");
        assert_eq!(etcd.kind, "StatefulSet");
        let members = if r.source == "manifests" { 1 } else { 3 };
        assert_eq!(etcd.replicas, members, "{}: etcd members", r.source);
        let c = &etcd.containers()[0];
        let env = container_env(etcd, c);
        let cluster = &env["INITIAL_CLUSTER"];
        let members: Vec<&str> = cluster.split(',').collect();
        assert_eq!(members.len(), etcd.replicas as usize, "{cluster}");
        for (i, m) in members.iter().enumerate() {
            let (name, url) = m.split_once('=').expect("name=url");
            assert_eq!(name, format!("etcd-{i}"));
            let (host, port) = host_port(url);
            assert_eq!(host, format!("etcd-{i}.etcd-headless"), "{m}");
            let peer = IntOrString::String("peer".into());
            assert_eq!(container_port(c, &peer), Some(port), "{m}");
        }
        let args = c.args.clone().unwrap_or_default();
        assert!(args.contains(&"--initial-cluster=$(INITIAL_CLUSTER)".to_owned()));
    }
}

fn server_args(r: &Rendered) -> (Vec<String>, greet_server::Args) {
    let w = r.workload("greet-server");
    let c = &w.containers()[0];
    let argv = argv(w, c);
    let args = greet_server::Args::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("greet-server args {argv:?}: {e}"));
    (argv, args)
}

fn controller_args(r: &Rendered) -> controller::Args {
    let w = r.workload("controller");
    let argv = argv(w, &w.containers()[0]);
    controller::Args::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("controller args {argv:?}: {e}"))
}

fn prestop_seconds(c: &Container) -> i64 {
    c.lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map_or(0, |s| s.seconds)
}

#[test]
fn greet_server_args_parse_and_agree_with_ports_probes_and_grace() {
    for r in rendered_all() {
        let w = r.workload("greet-server");
        assert_eq!((w.kind, w.replicas), ("Deployment", 3));
        let c = &w.containers()[0];
        assert_eq!(binary_of(c), "greet-server");
        let (argv, args) = server_args(&r);
        let cfg = args.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"));

        // POD_IP from the downward API, advertised with the listen port.
        let pod_ip = c
            .env
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|e| e.name == "POD_IP")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(pod_ip.as_deref(), Some("status.podIP"));
        let advertise = cfg.advertise.expect("--advertise set").as_str().to_owned();
        assert_eq!(advertise, format!("10.244.1.7:{}", args.listen.port()));
        assert!(
            args.listen.ip().is_unspecified(),
            "listens on every address"
        );

        // The gRPC port, the probes and the listen address agree.
        let grpc = container_port(c, &IntOrString::String("grpc".into())).expect("port grpc");
        assert_eq!(grpc, i32::from(args.listen.port()));
        for (which, p) in [
            ("readiness", &c.readiness_probe),
            ("liveness", &c.liveness_probe),
        ] {
            let p = p.as_ref().unwrap_or_else(|| panic!("{which} probe"));
            let g = p
                .grpc
                .as_ref()
                .unwrap_or_else(|| panic!("{which}: a gRPC probe"));
            assert_eq!(g.port, grpc, "{which} probe on the gRPC port");
            assert!(
                g.service.as_deref().unwrap_or_default().is_empty(),
                "{which}: the server's overall health"
            );
        }
        // Liveness must not kill a pod that is draining on purpose (NOT_SERVING).
        let live = c.liveness_probe.as_ref().unwrap();
        let patience = live.period_seconds.unwrap_or(10) * live.failure_threshold.unwrap_or(3);
        assert!(
            Duration::from_secs(patience as u64) > cfg.drain + cfg.shutdown_timeout,
            "liveness tolerates {patience}s of NOT_SERVING; drain {:?} + shutdown {:?}",
            cfg.drain,
            cfg.shutdown_timeout
        );

        // Grace: preStop, then the drain, then in-flight calls, then revoking.
        let grace = w
            .spec()
            .termination_grace_period_seconds
            .expect("grace period");
        let needed = Duration::from_secs(prestop_seconds(c) as u64)
            + cfg.drain
            + cfg.shutdown_timeout
            + Duration::from_secs(2);
        assert!(
            Duration::from_secs(grace as u64) >= needed,
            "terminationGracePeriodSeconds {grace} < preStop + drain + shutdown + 2s = {needed:?}"
        );
        assert!(cfg.drain >= Duration::from_secs(1), "a real drain");

        // etcd through its Service, to the etcd container's client port.
        for e in &args.etcd.endpoints {
            let (host, port) = host_port(e);
            let (etcd, cport) = r.resolve(&host, port).expect("etcd endpoint resolves");
            assert_eq!(etcd.name, "etcd");
            assert_eq!(cport, 2379);
        }
    }
}

#[test]
fn controller_args_parse_and_agree_with_service_and_network_policy() {
    for r in rendered_all() {
        let w = r.workload("controller");
        assert_eq!(
            (w.kind, w.replicas),
            ("Deployment", 2),
            "two replicas: leader election"
        );
        let c = &w.containers()[0];
        assert_eq!(binary_of(c), "controller");
        let args = controller_args(&r);
        let cfg = args.config().expect("controller flags are consistent");
        let listen = i32::from(args.listen.port());

        // Each replica's identity comes from its pod name (downward API): the
        // replicas share PID 1 and --listen, so nothing else tells them apart.
        let pod_name = c
            .env
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|e| e.name == "POD_NAME")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(pod_name.as_deref(), Some("metadata.name"));
        assert_eq!(
            cfg.name.as_deref(),
            Some("controller-0"),
            "--replica-name is the pod name"
        );
        assert!(
            args.listen.ip().is_unspecified(),
            "reachable through its Service"
        );
        let http = container_port(c, &IntOrString::String("http".into())).expect("port http");
        assert_eq!(http, listen);
        for (p, path) in [
            (&c.readiness_probe, "/readyz"),
            (&c.liveness_probe, "/healthz"),
        ] {
            let h = p
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("HTTP probe");
            assert_eq!(h.path.as_deref(), Some(path));
            assert_eq!(container_port(c, &h.port), Some(listen));
        }
        let grace = w.spec().termination_grace_period_seconds.expect("grace");
        let needed = Duration::from_secs(prestop_seconds(c) as u64) + cfg.shutdown_timeout;
        assert!(
            Duration::from_secs(grace as u64) > needed,
            "grace {grace}s > {needed:?}"
        );

        // `kubectl port-forward svc/controller 8080` reaches the HTTP view.
        let svc = r.service("controller");
        let port = svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
        assert_eq!(port, 8080);
        let (target, cport) = r.resolve("controller", 8080).expect("Service resolves");
        assert_eq!((target.name.as_str(), cport), ("controller", listen));

        // etcd endpoints.
        let mut etcd_port = 0;
        for e in &args.etcd.endpoints {
            let (host, port) = host_port(e);
            let (etcd, cport) = r.resolve(&host, port).expect("etcd endpoint resolves");
            assert_eq!(etcd.name, "etcd");
            etcd_port = cport;
        }

        // The NetworkPolicy covers the controller pods, lets HTTP in, and lets
        // the controller reach etcd, the servers' gRPC port (its probes) and DNS.
        let np = r
            .policies
            .iter()
            .find(|p| {
                let sel = p.spec.as_ref().and_then(|s| s.pod_selector.clone());
                w.selected_by(&sel.and_then(|s| s.match_labels).unwrap_or_default())
            })
            .expect("a NetworkPolicy selects the controller pods");
        let spec = np.spec.as_ref().unwrap();
        let types = spec.policy_types.clone().unwrap_or_default();
        assert!(types.contains(&"Ingress".into()) && types.contains(&"Egress".into()));
        let ingress_ports: Vec<IntOrString> = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.ports.iter().flatten())
            .filter_map(|p| p.port.clone())
            .collect();
        assert!(
            ingress_ports
                .iter()
                .any(|p| container_port(c, p) == Some(listen)),
            "ingress allows the HTTP port: {ingress_ports:?}"
        );
        let (_, server) = server_args(&r);
        let server_port = i32::from(server.listen.port());
        // A silently dead server is the controller's to remove, not its lease's.
        assert!(
            server.ttl > cfg.dead_after + 2 * cfg.probe_interval + cfg.probe_timeout,
            "greet-server --ttl {:?} leaves the controller (--dead-after {:?}) time to act",
            server.ttl,
            cfg.dead_after
        );
        let egress_to = |workload: &str, port: i32| {
            let target = r.workload(workload);
            spec.egress.iter().flatten().any(|rule| {
                let to_it = rule.to.iter().flatten().any(|peer| {
                    peer.pod_selector.as_ref().is_some_and(|s| {
                        target.selected_by(&s.match_labels.clone().unwrap_or_default())
                    })
                });
                let on_port = rule
                    .ports
                    .iter()
                    .flatten()
                    .any(|p| p.port == Some(IntOrString::Int(port)));
                to_it && on_port
            })
        };
        assert!(egress_to("etcd", etcd_port), "egress to etcd:{etcd_port}");
        assert!(
            egress_to("greet-server", server_port),
            "egress to servers:{server_port}"
        );
        let dns = spec.egress.iter().flatten().any(|rule| {
            rule.ports.iter().flatten().any(|p| {
                p.port == Some(IntOrString::Int(53)) && p.protocol.as_deref() == Some("UDP")
            })
        });
        assert!(dns, "egress to DNS");
    }
}

#[test]
fn greet_client_args_parse_and_find_etcd() {
    for r in rendered_all() {
        let w = r.workload("greet-client");
        let c = &w.containers()[0];
        assert_eq!(binary_of(c), "greet-client");
        let argv = argv(w, c);
        let args = greet_client::config::Args::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("greet-client args {argv:?}: {e}"));
        assert!(
            args.command.is_none(),
            "the default mode: prints who answered"
        );
        assert!(args.count.is_none(), "runs until stopped");
        let (_, server) = server_args(&r);
        assert_eq!(
            args.common.service, server.service,
            "calls the servers' service"
        );
        assert_eq!(args.common.prefix, server.prefix);
        for e in &args.common.etcd.endpoints {
            let (host, port) = host_port(e);
            let (etcd, _) = r.resolve(&host, port).expect("etcd endpoint resolves");
            assert_eq!(etcd.name, "etcd");
        }
    }
}

/// The Dockerfile's final stages run the binary the manifests expect, as
/// the non-root user the pods run as (the image test checks built images).
#[test]
fn dockerfile_stages_match_the_manifests() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    for r in rendered_all() {
        for w in &r.workloads {
            for c in w.containers() {
                let Some(path) = c.image.as_deref().and_then(|i| i.strip_prefix(REPO)) else {
                    continue;
                };
                let bin = path.split(':').next().unwrap();
                let stage = text
                    .split("\nFROM ")
                    .find(|s| s.starts_with(&format!("scratch AS {bin}\n")))
                    .unwrap_or_else(|| panic!("Dockerfile has a `FROM scratch AS {bin}` stage"));
                assert!(
                    stage.contains(&format!("ENTRYPOINT [\"/{bin}\"]")),
                    "{bin}: ENTRYPOINT"
                );
                let uid = w
                    .spec()
                    .security_context
                    .as_ref()
                    .and_then(|s| s.run_as_user)
                    .unwrap();
                assert!(stage.contains(&format!("USER {uid}:")), "{bin}: USER {uid}");
            }
        }
    }
}

#[test]
fn expand_follows_kubelet_rules() {
    let env = HashMap::from([("A".to_owned(), "x".to_owned())]);
    assert_eq!(expand("$(A):1", &env), "x:1");
    assert_eq!(expand("$(B)-$(A)", &env), "$(B)-x");
    assert_eq!(expand("plain", &env), "plain");
}

/// Scrapers find every server's and client's metrics: `--metrics-listen`
/// parsed by the real binaries, a container port named `metrics` on it, and
/// the `prometheus.io/*` pod annotations agreeing with both.
#[test]
fn servers_and_clients_expose_metrics_where_scrapers_look() {
    for r in rendered_all() {
        let (_, server) = server_args(&r);
        let client = {
            let w = r.workload("greet-client");
            let argv = argv(w, &w.containers()[0]);
            greet_client::config::Args::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("greet-client args {argv:?}: {e}"))
        };
        for (name, listen) in [
            ("greet-server", server.metrics_listen),
            ("greet-client", client.common.metrics_listen),
        ] {
            let w = r.workload(name);
            let listen = listen.unwrap_or_else(|| panic!("{name}: --metrics-listen set"));
            let c = &w.containers()[0];
            assert_eq!(
                container_port(c, &IntOrString::String("metrics".into())),
                Some(i32::from(listen.port())),
                "{name}: a port named metrics on --metrics-listen"
            );
            let annotations = w
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default();
            assert_eq!(
                annotations.get("prometheus.io/scrape").map(String::as_str),
                Some("true"),
                "{name}"
            );
            assert_eq!(
                annotations.get("prometheus.io/port"),
                Some(&listen.port().to_string()),
                "{name}"
            );
        }
    }
}

/// The HA overlay: three etcd members that a drain takes one at a time and
/// that never share a node; every client of etcd given all three members;
/// the controller's replicas spread and one always kept.
#[test]
fn ha_overlay_survives_losing_a_member() {
    let r = rendered_from("manifests/overlays/ha");
    let etcd = r.workload("etcd");
    assert_eq!(etcd.replicas, 3);
    let anti = etcd
        .spec()
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("etcd: required pod anti-affinity");
    assert!(
        anti.iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname"
                && t.label_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    == Some(&etcd.selector)),
        "one etcd member per node"
    );
    let budget = |name: &str| {
        r.budgets
            .iter()
            .find(|b| b.metadata.name.as_deref() == Some(name))
            .and_then(|b| b.spec.as_ref())
            .unwrap_or_else(|| panic!("a PodDisruptionBudget for {name}"))
    };
    let etcd_pdb = budget("etcd");
    assert_eq!(
        etcd_pdb.max_unavailable,
        Some(IntOrString::Int(1)),
        "one member down at a time"
    );
    assert_eq!(
        etcd_pdb
            .selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref()),
        Some(&etcd.selector)
    );
    let ctl = r.workload("controller");
    let ctl_pdb = budget("controller");
    assert_eq!(ctl_pdb.min_available, Some(IntOrString::Int(1)));
    assert_eq!(
        ctl_pdb
            .selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref()),
        Some(&ctl.selector)
    );
    assert!(
        ctl.spec()
            .topology_spread_constraints
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname"),
        "controller replicas spread over nodes"
    );

    // Every etcd client, as the real binaries parse their args: all three
    // members, each resolving to one pod of the etcd StatefulSet.
    let (_, server) = server_args(&r);
    let client = {
        let w = r.workload("greet-client");
        let argv = argv(w, &w.containers()[0]);
        greet_client::config::Args::try_parse_from(&argv).expect("greet-client args")
    };
    let controller = controller_args(&r);
    for (who, endpoints) in [
        ("greet-server", &server.etcd.endpoints),
        ("greet-client", &client.common.etcd.endpoints),
        ("controller", &controller.etcd.endpoints),
    ] {
        let mut pods = Vec::new();
        for e in endpoints {
            let (host, port) = host_port(e);
            let (w, _) = r
                .resolve(&host, port)
                .unwrap_or_else(|err| panic!("{who}: {e}: {err:#}"));
            assert_eq!(w.name, "etcd", "{who}: {e}");
            pods.push(host);
        }
        pods.sort();
        pods.dedup();
        assert_eq!(
            pods.len(),
            3,
            "{who} knows all three members: {endpoints:?}"
        );
    }
}

//! An in-cluster rehearsal without a cluster: the rendered manifests played
//! on one machine, one network namespace per pod.
//!
//! Pods sit on a private bridge the test makes inside a "switch" namespace;
//! their addresses exist only inside the namespaces. A tiny authoritative
//! DNS (dnsmasq, `--local=/cluster.local/`) answers for the Services'
//! `*.svc.cluster.local` names, and every pod's resolv.conf searches
//! `<ns>.svc.cluster.local` as the kubelet's does, so the manifests' short
//! names (`etcd:2379`) resolve as in a cluster. Each container runs its
//! command and args from the manifests with the environment the kubelet
//! would set (`POD_IP`, `HOSTNAME`, `KUBERNETES_SERVICE_*`, downward-API
//! fields). Then it checks what a user would after `kubectl apply`.
//!
//! Safety: before any namespace exists, a blackhole route for the test's
//! subnet goes into the root namespace, so no stray packet for it can leave
//! the machine; the root namespace never addresses a pod (every request is
//! made from inside a pod's namespace); everything is removed at the end,
//! also when the test fails.
//!
//! Needs root, network namespaces, iproute2, dnsmasq, curl and etcd
//! (`scripts/setup.sh`); skips with a message where namespaces are not
//! allowed, fails on CI (`CI` set) when a tool is missing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etcd_lb_testkit::{bin_path, eventually, Proc};
use nix::sys::signal::Signal;
use serde_json::Value as Json;
use serde_norway::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One container of the rendered manifests, ready to run.
#[derive(Debug, Clone)]
struct Spec {
    /// The binary (image entrypoint or `command[0]`).
    program: String,
    args: Vec<String>,
    /// `name -> value`, downward-API fields still to fill in per pod.
    env: Vec<(String, EnvValue)>,
    /// The `preStop` sleep the kubelet runs before SIGTERM.
    pre_stop: Duration,
}

#[derive(Debug, Clone)]
enum EnvValue {
    Literal(String),
    Field(String),
}

/// Workload name -> (replicas, container spec, pod labels), and the
/// Services (name -> selector).
struct Rendered {
    namespace: String,
    workloads: HashMap<String, (usize, Spec)>,
    services: Vec<(String, Value)>,
    labels: HashMap<String, Value>,
}

/// Renders the kustomization at `source` (relative to the repository).
fn load(source: &str) -> Result<Rendered> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(source))
        .output()
        .context("kubectl not found: ./scripts/setup.sh installs it")?;
    ensure!(out.status.success(), "kubectl kustomize failed");
    let yaml = String::from_utf8(out.stdout)?;
    let mut r = Rendered {
        namespace: String::new(),
        workloads: HashMap::new(),
        services: Vec::new(),
        labels: HashMap::new(),
    };
    for doc in serde_norway::Deserializer::from_str(&yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        let kind = v["kind"].as_str().unwrap_or_default();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match kind {
            "Namespace" => r.namespace = name,
            "Service" => r.services.push((name, v["spec"]["selector"].clone())),
            "Deployment" | "StatefulSet" => {
                let replicas = v["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
                let pod = &v["spec"]["template"];
                let c = &pod["spec"]["containers"][0];
                let image = c["image"].as_str().unwrap_or_default();
                let strings = |x: &Value| -> Vec<String> {
                    x.as_sequence()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                };
                let mut command = strings(&c["command"]);
                let program = if command.is_empty() {
                    // Our images: the binary named like the image.
                    let path = image.rsplit('/').next().unwrap_or_default();
                    path.split(':').next().unwrap_or_default().to_owned()
                } else {
                    command.remove(0)
                };
                let mut args = command;
                args.extend(strings(&c["args"]));
                let env = c["env"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        let n = e["name"].as_str().unwrap_or_default().to_owned();
                        let val = match e["value"].as_str() {
                            Some(s) => EnvValue::Literal(s.to_owned()),
                            None => EnvValue::Field(
                                e["valueFrom"]["fieldRef"]["fieldPath"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            ),
                        };
                        (n, val)
                    })
                    .collect();
                let pre_stop = Duration::from_secs(
                    c["lifecycle"]["preStop"]["sleep"]["seconds"]
                        .as_u64()
                        .unwrap_or(0),
                );
                r.labels
                    .insert(name.clone(), pod["metadata"]["labels"].clone());
                r.workloads.insert(
                    name.clone(),
                    (
                        replicas,
                        Spec {
                            program,
                            args,
                            env,
                            pre_stop,
                        },
                    ),
                );
            }
            _ => {}
        }
    }
    ensure!(!r.namespace.is_empty(), "no Namespace rendered");
    Ok(r)
}

/// `$(VAR)` expansion as the kubelet does it.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Everything the test made, removed on drop in reverse order.
struct Net {
    tag: String,
    subnet: String,
    namespaces: Vec<String>,
    route: bool,
}

impl Net {
    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.tag)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        if self.route {
            let _ = Command::new("ip")
                .args(["route", "del", "blackhole", &self.subnet])
                .status();
        }
    }
}

/// A pod: its namespace and address.
#[derive(Clone)]
struct Pod {
    name: String,
    ns: String,
    ip: String,
}

fn add_pod(net: &mut Net, name: &str, host: u8, dns: &str, search: &str) -> Result<Pod> {
    let ns = net.ns(name);
    let base = net.subnet.trim_end_matches(".0/24");
    let ip = format!("{base}.{host}");
    sh(&["ip", "netns", "add", &ns])?;
    net.namespaces.push(ns.clone());
    // veth names are at most 15 bytes: <tag-hash><host>{a,b}.
    let short = &net.tag[net.tag.len() - 6..];
    let (inner, outer) = (format!("v{short}{host}a"), format!("v{short}{host}b"));
    let sw = net.ns("switch");
    sh(&[
        "ip", "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer, "netns",
        &sw,
    ])?;
    sh(&[
        "ip", "-n", &sw, "link", "set", &outer, "master", "br0", "up",
    ])?;
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", &ns, "link", "set", &inner, "name", "eth0"])?;
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
    // `ip netns exec` bind-mounts these over /etc/resolv.conf and /etc/hosts.
    let etc = PathBuf::from(format!("/etc/netns/{ns}"));
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("resolv.conf"),
        format!(
            "nameserver {dns}\nsearch {search} svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
    )?;
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{ip} {name}\n"),
    )?;
    Ok(Pod {
        name: name.to_owned(),
        ns,
        ip,
    })
}

/// Runs `curl` inside `pod`'s namespace.
fn curl_in(pod: &Pod, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.ns,
            "curl",
            "-fsS",
            "--max-time",
            "3",
            url,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn listed(body: &str) -> Vec<String> {
    let v: Json = serde_json::from_str(body).unwrap_or(Json::Null);
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["members"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["addr"].as_str().map(str::to_owned))
        .collect()
}

/// Which precondition is missing, if any: Err = skip (namespaces not
/// allowed), Ok(Some) = a tool is missing.
fn preconditions() -> Result<Option<String>, String> {
    let uid = sh(&["id", "-u"]).unwrap_or_default();
    if uid.trim() != "0" {
        return Err("not root".into());
    }
    if !have("ip") {
        return Ok(Some("ip (iproute2)".into()));
    }
    // Unique per call: the rehearsals run in parallel in one process.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let probe = format!("e2e-probe-{}-{n}", std::process::id());
    if Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        return Err("network namespaces are not allowed here".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    for (tool, pkg) in [
        ("dnsmasq", "dnsmasq-base"),
        ("curl", "curl"),
        ("etcd", "etcd-server"),
        ("kubectl", "kubernetes-client"),
    ] {
        if !have(tool) {
            return Ok(Some(format!("{tool} (Debian's {pkg})")));
        }
    }
    Ok(None)
}

/// The rendered manifests of `source` running, one namespace per pod.
/// Fields drop in order: processes first, then their data, then the
/// namespaces and the route.
struct Rehearsal {
    r: Rendered,
    procs: Vec<(String, Proc)>,
    pods: HashMap<String, Vec<Pod>>,
    base: String,
    search: String,
    tmp: tempfile::TempDir,
    /// Held for its `Drop`: namespaces and the route go last.
    _net: Net,
}

/// Brings up every workload of `source`; `None` when the machine cannot
/// (skipped with a message; on CI a missing tool fails instead).
async fn up(source: &str, test: &str) -> Result<Option<Rehearsal>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static RUNS: AtomicU32 = AtomicU32::new(0);
    match preconditions() {
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            return Ok(None);
        }
        Ok(Some(tool)) => {
            let msg = format!("the rehearsal needs {tool}; ./scripts/setup.sh installs it");
            if std::env::var_os("CI").is_some() {
                bail!(msg);
            }
            eprintln!("SKIPPED {test}: {msg}");
            return Ok(None);
        }
        Ok(None) => {}
    }
    let r = load(source)?;
    let pid = std::process::id();
    // Unique per rehearsal in this process (tests run in parallel).
    let run = RUNS.fetch_add(1, Ordering::SeqCst);
    let mut net = Net {
        tag: format!("e2e{:05}{run}", pid % 100_000),
        subnet: String::new(),
        namespaces: Vec::new(),
        route: false,
    };
    // Safety first: nothing for this subnet leaves the root namespace. A
    // subnet with any route already (a stale run, something else) is
    // skipped for the next one.
    for i in 0..20 {
        let subnet = format!("10.213.{}.0/24", 20 + (pid + i + run * 7) % 200);
        if sh(&["ip", "route", "add", "blackhole", &subnet]).is_ok() {
            net.subnet = subnet;
            net.route = true;
            break;
        }
    }
    ensure!(
        net.route,
        "no free 10.213.x.0/24 subnet for the blackhole route"
    );

    let sw = net.ns("switch");
    sh(&["ip", "netns", "add", &sw])?;
    net.namespaces.push(sw.clone());
    sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;

    let base = net.subnet.trim_end_matches(".0/24").to_owned();
    let dns_ip = format!("{base}.2");
    let search = format!("{}.svc.cluster.local", r.namespace);
    let dns = add_pod(&mut net, "dns", 2, &dns_ip, &search)?;

    // Pods: every replica of every workload, addresses by workload.
    let mut pods: HashMap<String, Vec<Pod>> = HashMap::new();
    let mut names: Vec<&String> = r.workloads.keys().collect();
    names.sort();
    for (i, w) in names.iter().enumerate() {
        let (replicas, _) = &r.workloads[*w];
        for k in 0..*replicas {
            let host = 10 + (i as u8) * 10 + k as u8;
            let pod = add_pod(&mut net, &format!("{w}-{k}"), host, &dns_ip, &search)?;
            pods.entry((*w).clone()).or_default().push(pod);
        }
    }

    // DNS: each Service name -> the pods it selects (as a headless
    // Service would answer; a ClusterIP's kube-proxy is not rehearsed),
    // and each StatefulSet pod under its headless Service.
    let mut hosts = String::new();
    for (svc, selector) in &r.services {
        let sel = selector.as_mapping().cloned().unwrap_or_default();
        for (w, labels) in &r.labels {
            let l = labels.as_mapping().cloned().unwrap_or_default();
            if !sel.is_empty() && sel.iter().all(|(k, v)| l.get(k) == Some(v)) {
                for p in &pods[w] {
                    hosts.push_str(&format!("{} {svc}.{search}\n", p.ip));
                    hosts.push_str(&format!("{} {}.{svc}.{search}\n", p.ip, p.name));
                }
            }
        }
    }
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("hosts"), &hosts)?;
    let mut procs: Vec<(String, Proc)> = Vec::new();
    procs.push((
        "dns".into(),
        Proc::spawn(
            "dnsmasq",
            "ip",
            &[
                "netns",
                "exec",
                &dns.ns,
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--local=/cluster.local/",
                "--bind-interfaces",
                &format!("--listen-address={dns_ip}"),
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
            ]
            .map(str::to_owned)
            .into_iter()
            .chain([format!(
                "--addn-hosts={}",
                tmp.path().join("hosts").display()
            )])
            .collect::<Vec<_>>(),
            &[],
        )?,
    ));

    let mut reh = Rehearsal {
        r,
        procs,
        pods,
        base,
        search,
        tmp,
        _net: net,
    };
    // Containers, in the order a cluster would settle: etcd, then the rest.
    for w in ["etcd", "greet-server", "controller"] {
        for pod in reh.pods[w].clone() {
            let p = reh.spawn(w, &pod, &[])?;
            reh.procs.push((pod.name.clone(), p));
        }
    }
    Ok(Some(reh))
}

impl Rehearsal {
    /// Starts `w`'s container in `pod` as the kubelet would, plus `extra` args.
    fn spawn(&self, w: &str, pod: &Pod, extra: &[&str]) -> Result<Proc> {
        let (r, base, tmp) = (&self.r, &self.base, &self.tmp);
        let (_, spec) = &r.workloads[w];
        let mut env: Vec<(String, String)> = vec![
            ("HOSTNAME".into(), pod.name.clone()),
            ("KUBERNETES_SERVICE_HOST".into(), format!("{base}.1")),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        ];
        for (k, v) in &spec.env {
            let value = match v {
                EnvValue::Literal(s) => expand(s, &env),
                EnvValue::Field(f) => match f.as_str() {
                    "status.podIP" => pod.ip.clone(),
                    "metadata.name" => pod.name.clone(),
                    "metadata.namespace" => r.namespace.clone(),
                    other => bail!("{w}: fieldRef {other} not rehearsed"),
                },
            };
            env.push((k.clone(), value));
        }
        let program = match spec.program.as_str() {
            "/usr/local/bin/etcd" => PathBuf::from("etcd"),
            name => bin_path(name),
        };
        let data = tmp.path().join(&pod.name);
        let mut argv: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            pod.ns.clone(),
            program.display().to_string(),
        ];
        for a in &spec.args {
            // The etcd volume's mount path becomes a temp dir.
            let a = expand(a, &env).replace("/var/lib/etcd", &data.display().to_string());
            ensure!(!a.contains("$("), "{w}: unresolved {a}");
            argv.push(a);
        }
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn(&pod.name, "ip", &argv, &envs)
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|(n, p)| format!("--- {n}\n{}", p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn client(&self) -> Pod {
        self.pods["greet-client"][0].clone()
    }

    fn controller_url(&self) -> String {
        format!("http://controller.{}:8080/services", self.search)
    }

    /// The client container in load mode (`bench --json` plus `extra`).
    fn bench(&self, extra: &[&str]) -> Result<Proc> {
        let mut args = vec!["bench", "--json"];
        args.extend_from_slice(extra);
        self.spawn("greet-client", &self.client(), &args)
    }

    /// Waits until the controller, read from the client's pod, lists every
    /// server by pod IP; returns what it lists.
    async fn controller_lists_servers(&self) -> Result<Vec<String>> {
        let (client, url) = (self.client(), self.controller_url());
        let server_addrs: Vec<String> = self.pods["greet-server"]
            .iter()
            .map(|p| format!("{}:3000", p.ip))
            .collect();
        eventually(
            Duration::from_secs(60),
            "controller lists 3 servers",
            || {
                let body = curl_in(&client, &url);
                let want = server_addrs.clone();
                async move {
                    let got = listed(&body?);
                    want.iter().all(|a| got.contains(a)).then_some(got)
                }
            },
        )
        .await
        .with_context(|| self.logs())
    }

    /// Deletes `pod` as the kubelet does (preStop sleep, then SIGTERM) and
    /// checks it exits 0.
    async fn delete_server_pod(&mut self, pod: &Pod) -> Result<()> {
        let idx = self
            .procs
            .iter()
            .position(|(n, _)| *n == pod.name)
            .context("pod running")?;
        let (_, mut gone) = self.procs.remove(idx);
        tokio::time::sleep(self.r.workloads["greet-server"].1.pre_stop).await;
        gone.signal(Signal::SIGTERM)?;
        ensure!(
            gone.wait_exit(Duration::from_secs(30)).await? == Some(0),
            "{}",
            gone.log()
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_rehearsed_in_network_namespaces() -> Result<()> {
    let Some(mut reh) = up("manifests", "manifests_rehearsed_in_network_namespaces").await? else {
        return Ok(());
    };
    let (r, pods) = (&reh.r, reh.pods.clone());
    let client = reh.client();
    let controller_url = reh.controller_url();

    // 1. The controller lists the three servers by pod IP.
    let found = reh.controller_lists_servers().await?;
    assert_eq!(found.len(), 3, "{found:?}");
    eprintln!("controller lists {found:?}");

    // 2. The client, in its own namespace with the manifest's flags, spreads
    //    calls by weight (equal weights here: a third each).
    let mut b = reh.bench(&["--concurrency", "4", "--requests", "600"])?;
    ensure!(
        b.wait_exit(Duration::from_secs(60)).await? == Some(0),
        "bench: {}",
        b.log()
    );
    let report = b.json_report()?;
    assert_eq!(report["errors"], 0, "{report}");
    let shares = report["endpoints"].as_array().context("endpoints")?;
    eprintln!("client shares: {}", serde_json::to_string(shares)?);
    assert_eq!(shares.len(), 3, "{report}");
    for e in shares {
        let s = e["observed_share"].as_f64().unwrap_or_default();
        assert!((s - 1.0 / 3.0).abs() < 0.05, "share {s}: {report}");
    }

    // 3. Cutting a pod's link: it stops answering probes and renewing its
    //    lease. The controller's leader deletes it after --dead-after of
    //    failed probes, well before the lease (--ttl, longer) would expire.
    let server_args = &r.workloads["greet-server"].1.args;
    let flag = |name: &str| -> Result<Duration> {
        let v = server_args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .with_context(|| format!("greet-server --{name} in the manifest"))?;
        Ok(humantime::parse_duration(v)?)
    };
    let ttl = flag("ttl")?;
    let cut = pods["greet-server"][0].clone();
    let cut_at = std::time::Instant::now();
    sh(&["ip", "-n", &cut.ns, "link", "set", "eth0", "down"])?;
    let cut_addr = format!("{}:3000", cut.ip);
    let left = eventually(Duration::from_secs(45), "cut pod removed", || {
        let body = curl_in(&client, &controller_url);
        let c = cut_addr.clone();
        async move {
            let got = listed(&body?);
            // An empty list is a failed or unready read, not the answer:
            // wait for a view that still holds the two other pods.
            (got.len() == 2 && !got.contains(&c)).then_some(got)
        }
    })
    .await
    .with_context(|| reh.logs())?;
    let took = cut_at.elapsed();
    assert_eq!(left.len(), 2, "{left:?}");
    let deleted_by_controller = reh
        .procs
        .iter()
        .filter(|(n, _)| n.starts_with("controller"))
        .any(|(_, p)| {
            p.log()
                .lines()
                .any(|l| l.contains("deleted stale registration") && l.contains(&cut_addr))
        });
    assert!(
        deleted_by_controller,
        "the controller deleted {cut_addr} (after {took:?}; lease TTL {ttl:?}):\n{}",
        reh.logs()
    );
    assert!(
        took < ttl,
        "removed after {took:?}, before the lease TTL {ttl:?}"
    );
    eprintln!("cut pod removed by the controller after {took:?}");

    // 4. Deleting a pod (SIGTERM) drains it: zero failed calls under load,
    //    it exits 0 and leaves the view.
    let mut b = reh.bench(&["--concurrency", "4", "--duration", "8s"])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = pods["greet-server"][1].clone();
    reh.delete_server_pod(&victim).await?;
    ensure!(
        b.wait_exit(Duration::from_secs(60)).await? == Some(0),
        "bench: {}",
        b.log()
    );
    let report = b.json_report()?;
    assert_eq!(report["errors"], 0, "a drained pod costs no call: {report}");
    eprintln!("{} calls while a pod drained, 0 failed", report["calls"]);
    let victim_addr = format!("{}:3000", victim.ip);
    eventually(
        Duration::from_secs(20),
        "drained pod leaves the view",
        || {
            let body = curl_in(&client, &controller_url);
            let v = victim_addr.clone();
            async move { (!listed(&body?).contains(&v)).then_some(()) }
        },
    )
    .await?;

    drop(reh);
    Ok(())
}

/// The HA overlay: three etcd members, everyone given all three. One member
/// is SIGKILLed while the client is under load: zero failed calls, and the
/// registry still works on the two left (a drained pod leaves the view).
#[tokio::test(flavor = "multi_thread")]
async fn ha_overlay_rehearsed_with_an_etcd_member_killed() -> Result<()> {
    let Some(mut reh) = up(
        "manifests/overlays/ha",
        "ha_overlay_rehearsed_with_an_etcd_member_killed",
    )
    .await?
    else {
        return Ok(());
    };
    ensure!(reh.pods["etcd"].len() == 3, "three etcd members");
    let found = reh.controller_lists_servers().await?;
    eprintln!("controller lists {found:?} over a three-member etcd");

    let mut b = reh.bench(&["--concurrency", "4", "--duration", "10s"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let member = reh.pods["etcd"][0].name.clone();
    let idx = reh
        .procs
        .iter()
        .position(|(n, _)| *n == member)
        .context("etcd member running")?;
    reh.procs[idx].1.signal(Signal::SIGKILL)?;
    eprintln!("SIGKILLed etcd member {member}");
    ensure!(
        b.wait_exit(Duration::from_secs(60)).await? == Some(0),
        "bench: {}",
        b.log()
    );
    let report = b.json_report()?;
    assert_eq!(
        report["errors"], 0,
        "an etcd member lost costs no call: {report}"
    );
    eprintln!(
        "{} calls while an etcd member died, 0 failed",
        report["calls"]
    );

    // The two members left still take writes and serve watches: a drained
    // pod's key is revoked and the controller's view follows.
    let victim = reh.pods["greet-server"][2].clone();
    reh.delete_server_pod(&victim).await?;
    let (client, url) = (reh.client(), reh.controller_url());
    let victim_addr = format!("{}:3000", victim.ip);
    eventually(
        Duration::from_secs(30),
        "drained pod leaves the view with one etcd member down",
        || {
            let body = curl_in(&client, &url);
            let v = victim_addr.clone();
            async move {
                let got = listed(&body?);
                (got.len() == 2 && !got.contains(&v)).then_some(())
            }
        },
    )
    .await
    .with_context(|| reh.logs())?;
    drop(reh);
    Ok(())
}

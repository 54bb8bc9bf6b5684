//! A secured etcd: TLS with client-certificate auth, and username/password
//! auth with roles. Every binary connects with the real flags
//! (`--etcd-ca/--etcd-cert/--etcd-key`, `--etcd-user` with the password from
//! `ETCD_PASSWORD` or `--etcd-password-file`, never a plain flag); what
//! lacks the right credentials or rights gets nowhere, logs why, keeps
//! retrying and does not panic. Certificates are made at test time.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{
    controller, controller_with, greeter, http_get, http_request, key_of, key_set, keys, server,
    PREFIX,
};
use etcd_client::{Client, ConnectOptions, Permission};
use etcd_lb_testkit::{eventually, free_port, Etcd, Pki, Proc, SecureEtcd};

async fn wait_exact_keys(
    c: &Client,
    want: &std::collections::BTreeSet<String>,
    limit: Duration,
) -> Result<()> {
    eventually(limit, &format!("keys {want:?}"), || async {
        (&keys(c, PREFIX).await.ok()? == want).then_some(())
    })
    .await
}

async fn replies_from(cl: &Proc, ports: &[u16]) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        "replies from every server",
        || async {
            let log = cl.log();
            ports
                .iter()
                .all(|p| log.contains(&format!("(from 127.0.0.1:{p})")))
                .then_some(())
        },
    )
    .await
    .with_context(|| cl.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() -> Result<()> {
    let pki = Pki::new("greet test CA")?;
    let etcd = SecureEtcd::start(&pki).await?;
    let root = etcd.client(&pki).await?;
    let ca = pki.ca.to_string_lossy().into_owned();
    let id = pki.issue("greet")?;
    let (cert, key) = (
        id.cert.to_string_lossy().into_owned(),
        id.key.to_string_lossy().into_owned(),
    );
    let tls = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];

    // Two servers: one given `host:port` (TLS implied by the CA), one an
    // https:// URL.
    let (a, b) = (free_port(), free_port());
    let _a = server(&etcd.endpoint(), a, &tls, &[])?;
    let _b = server(&etcd.url(), b, &tls, &[])?;

    // What must not get in: no client certificate, a certificate from
    // another CA, no TLS at all.
    let rogue_pki = Pki::new("rogue CA")?;
    let rogue = rogue_pki.issue("greet")?;
    let (rogue_cert, rogue_key) = (
        rogue.cert.to_string_lossy().into_owned(),
        rogue.key.to_string_lossy().into_owned(),
    );
    let (n1, n2, n3) = (free_port(), free_port(), free_port());
    let mut no_cert = server(&etcd.endpoint(), n1, &["--etcd-ca", &ca], &[])?;
    let mut wrong_ca = server(
        &etcd.endpoint(),
        n2,
        &[
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &rogue_cert,
            "--etcd-key",
            &rogue_key,
        ],
        &[],
    )?;
    let mut plain = server(&etcd.endpoint(), n3, &[], &[])?;

    wait_exact_keys(&root, &key_set(&[a, b]), Duration::from_secs(20)).await?;

    // The client and the controller over TLS too.
    let cl = greeter(&etcd.endpoint(), "100ms", &tls, &[])?;
    replies_from(&cl, &[a, b]).await?;
    let http = free_port();
    let mut ctl = controller_with(&etcd.endpoint(), http, &tls, &[])?;
    eventually(
        Duration::from_secs(20),
        "the controller lists both servers",
        || async {
            let (status, body) = http_get(http, "/services").await.ok()?;
            (status == 200
                && body.contains(&format!("127.0.0.1:{a}"))
                && body.contains(&format!("127.0.0.1:{b}")))
            .then_some(())
        },
    )
    .await
    .with_context(|| ctl.log())?;

    // A client without a certificate cannot read the registry either.
    let blind = greeter(&etcd.endpoint(), "100ms", &["--etcd-ca", &ca], &[])?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(keys(&root, PREFIX).await?, key_set(&[a, b]));
    for p in [&mut no_cert, &mut wrong_ca, &mut plain] {
        assert!(p.is_running(), "{} keeps retrying:\n{}", p.name, p.log());
        let log = p.log();
        assert!(
            log.contains("etcd unreachable or failing"),
            "{} says why:\n{log}",
            p.name
        );
        assert!(!log.contains("panicked"), "{log}");
    }
    assert!(
        !blind.log().contains("Good morning"),
        "no certificate, no endpoints:\n{}",
        blind.log()
    );
    assert!(ctl.is_running(), "{}", ctl.log());
    assert!(!cl.log().contains("call failed"), "{}", cl.log());
    Ok(())
}

const SERVER_PW: &str = "s3rver-pw";
const READER_PW: &str = "r3ader-pw";
const ROOT_PW: &str = "r00t-pw";
const OPERATOR_PW: &str = "0perator-pw";
/// Where operators' overrides live (the controller's default).
const OVERRIDES: &str = "/lb-overrides/";

/// Users and roles, as docs/operator.md lists them: root; `server`
/// read-write on `/ns/`; `reader` (clients) read-only on `/ns/` and on the
/// overrides `/lb-overrides/`; `controller` read-write on `/ns/`, its
/// election prefix and the overrides (its leader removes lapsed ones);
/// `operator` read-only on `/ns/` (to name the registration an override is
/// made for) and read-write on the overrides, nothing else. Then auth is
/// switched on.
async fn secure(c: &mut Client) -> Result<()> {
    c.user_add("root", ROOT_PW, None).await?;
    if let Err(e) = c.role_add("root").await {
        ensure!(e.to_string().contains("exist"), "role root: {e}");
    }
    c.user_grant_role("root", "root").await?;
    c.role_add("greet-rw").await?;
    c.role_grant_permission("greet-rw", Permission::read_write("/ns/").with_prefix())
        .await?;
    c.role_add("greet-ro").await?;
    c.role_grant_permission("greet-ro", Permission::read("/ns/").with_prefix())
        .await?;
    c.role_grant_permission("greet-ro", Permission::read(OVERRIDES).with_prefix())
        .await?;
    c.role_add("greet-operator").await?;
    c.role_grant_permission("greet-operator", Permission::read("/ns/").with_prefix())
        .await?;
    c.role_grant_permission(
        "greet-operator",
        Permission::read_write(OVERRIDES).with_prefix(),
    )
    .await?;
    c.role_add("controller").await?;
    c.role_grant_permission("controller", Permission::read_write("/ns/").with_prefix())
        .await?;
    c.role_grant_permission(
        "controller",
        Permission::read_write("/greet-etcd/").with_prefix(),
    )
    .await?;
    c.role_grant_permission(
        "controller",
        Permission::read_write(OVERRIDES).with_prefix(),
    )
    .await?;
    for (user, pw, role) in [
        ("server", SERVER_PW, "greet-rw"),
        ("reader", READER_PW, "greet-ro"),
        ("controller", SERVER_PW, "controller"),
        ("operator", OPERATOR_PW, "greet-operator"),
    ] {
        c.user_add(user, pw, None).await?;
        c.user_grant_role(user, role).await?;
    }
    c.auth_enable().await?;
    Ok(())
}

async fn login(etcd: &Etcd, user: &str, pw: &str) -> Result<Client> {
    let opts = ConnectOptions::new().with_user(user, pw);
    Ok(Client::connect([etcd.endpoint()], Some(opts)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_and_roles() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    secure(&mut etcd.client().await?).await?;
    let root = login(&etcd, "root", ROOT_PW).await?;
    let eps = etcd.endpoint();
    let pw_dir = tempfile::tempdir()?;
    let pw_file = pw_dir.path().join("etcd-password");
    std::fs::write(&pw_file, format!("{SERVER_PW}\n"))?;
    let pw_file = pw_file.to_string_lossy().into_owned();

    // Servers: password from the environment, and from a file.
    let (a, b) = (free_port(), free_port());
    let _a = server(
        &eps,
        a,
        &["--etcd-user", "server"],
        &[("ETCD_PASSWORD", SERVER_PW)],
    )?;
    let b_proc = server(
        &eps,
        b,
        &["--etcd-user", "server", "--etcd-password-file", &pw_file],
        &[],
    )?;
    // A read-only user cannot register; a wrong password gets nowhere.
    let (ro, bad) = (free_port(), free_port());
    let mut read_only = server(
        &eps,
        ro,
        &["--etcd-user", "reader"],
        &[("ETCD_PASSWORD", READER_PW)],
    )?;
    let mut wrong_pw = server(
        &eps,
        bad,
        &["--etcd-user", "server"],
        &[("ETCD_PASSWORD", "guess")],
    )?;
    // No password at all is a start-up error, not a hang.
    let mut no_pw = server(&eps, free_port(), &["--etcd-user", "server"], &[])?;
    let code = no_pw.wait_exit(Duration::from_secs(10)).await?;
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {}", no_pw.log());
    assert!(no_pw.log().contains("ETCD_PASSWORD"), "{}", no_pw.log());

    wait_exact_keys(&root, &key_set(&[a, b]), Duration::from_secs(20)).await?;

    // The client with the read-only user sees and calls both; the
    // controller with its own user lists them.
    let cl = greeter(
        &eps,
        "100ms",
        &["--etcd-user", "reader"],
        &[("ETCD_PASSWORD", READER_PW)],
    )?;
    replies_from(&cl, &[a, b]).await?;
    let http = free_port();
    let ctl = controller_with(
        &eps,
        http,
        &["--etcd-user", "controller"],
        &[("ETCD_PASSWORD", SERVER_PW)],
    )?;
    eventually(
        Duration::from_secs(20),
        "the controller lists both",
        || async {
            let (status, body) = http_get(http, "/services").await.ok()?;
            (status == 200
                && body.contains(&format!("127.0.0.1:{a}"))
                && body.contains(&format!("127.0.0.1:{b}")))
            .then_some(())
        },
    )
    .await
    .with_context(|| ctl.log())?;

    // The read-only server says why and keeps trying, without panicking.
    eventually(
        Duration::from_secs(10),
        "the permission error in the log",
        || async { read_only.log().contains("permission denied").then_some(()) },
    )
    .await
    .with_context(|| read_only.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in [&mut read_only, &mut wrong_pw] {
        assert!(p.is_running(), "{} keeps running:\n{}", p.name, p.log());
        assert!(!p.log().contains("panicked"), "{}", p.log());
    }
    assert!(
        wrong_pw.log().contains("authentication failed"),
        "{}",
        wrong_pw.log()
    );
    assert_eq!(keys(&root, PREFIX).await?, key_set(&[a, b]));

    // The server's user cannot step outside /ns/.
    let mut as_server = login(&etcd, "server", SERVER_PW).await?;
    let err = as_server
        .put("/other/greet_service/127.0.0.1:1", "x", None)
        .await
        .expect_err("write outside /ns/ refused");
    assert!(err.to_string().contains("permission denied"), "{err}");
    let err = as_server
        .get("/greet-etcd/controller/leader", None)
        .await
        .expect_err("read outside /ns/ refused");
    assert!(err.to_string().contains("permission denied"), "{err}");
    // The reader cannot write inside it.
    let mut as_reader = login(&etcd, "reader", READER_PW).await?;
    let err = as_reader
        .put(key_of(a), "{}", None)
        .await
        .expect_err("read-only");
    assert!(err.to_string().contains("permission denied"), "{err}");

    // It was retrying all along: once the user gets write rights, the
    // read-only server registers by itself.
    let mut r = root.clone();
    r.user_grant_role("reader", "greet-rw").await?;
    wait_exact_keys(&root, &key_set(&[a, b, ro]), Duration::from_secs(20))
        .await
        .with_context(|| read_only.log())?;

    // etcd restarts: its auth tokens are gone (simple tokens live in
    // memory), so every binary must log in again by itself. A deleted key
    // comes back, and a server started afterwards reaches the client.
    etcd.restart(false).await?;
    let root = login(&etcd, "root", ROOT_PW).await?;
    let mut r = root.clone();
    r.delete(key_of(b), None).await?;
    let c = free_port();
    let c_proc = server(
        &eps,
        c,
        &["--etcd-user", "server"],
        &[("ETCD_PASSWORD", SERVER_PW)],
    )?;
    wait_exact_keys(&root, &key_set(&[a, b, ro, c]), Duration::from_secs(20))
        .await
        .with_context(|| format!("{}\n{}", b_proc.log(), c_proc.log()))?;
    replies_from(&cl, &[c]).await?;
    eventually(
        Duration::from_secs(20),
        "the controller lists the new server",
        || async {
            let (status, body) = http_get(http, "/services").await.ok()?;
            (status == 200 && body.contains(&format!("127.0.0.1:{c}"))).then_some(())
        },
    )
    .await
    .with_context(|| ctl.log())?;
    // The controller still leads and deletes with its own user: a lease-less
    // key whose address does not answer goes.
    let stale = key_of(free_port());
    r.put(stale.as_str(), "{}", None).await?;
    eventually(
        Duration::from_secs(30),
        "the controller deletes a stale key after etcd's restart",
        || async { (!keys(&root, PREFIX).await.ok()?.contains(&stale)).then_some(()) },
    )
    .await
    .with_context(|| ctl.log())?;
    assert_eq!(keys(&root, PREFIX).await?, key_set(&[a, b, ro, c]));
    assert!(!cl.log().contains("call failed"), "{}", cl.log());
    Ok(())
}

/// `controller <command>` as `user` (password from `ETCD_PASSWORD`):
/// (exit code, stdout, stderr).
fn operate(etcd: &Etcd, user: &str, pw: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(etcd_lb_testkit::bin_path("controller"))
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint(), "--etcd-user", user])
        .env("ETCD_PASSWORD", pw)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Issue 35's roles: the operator's role writes overrides and nothing
/// else; the servers' and clients' roles cannot write them; a client with
/// the reader's role applies them (a drained server gets none of its
/// calls); an override says which etcd user made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_role_writes_overrides_and_it_writes_nothing_else() -> Result<()> {
    let etcd = Etcd::start().await?;
    secure(&mut etcd.client().await?).await?;
    let root = login(&etcd, "root", ROOT_PW).await?;
    let eps = etcd.endpoint();
    let (a, b) = (free_port(), free_port());
    let _servers = [a, b]
        .iter()
        .map(|p| {
            server(
                &eps,
                *p,
                &["--etcd-user", "server"],
                &[("ETCD_PASSWORD", SERVER_PW)],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    wait_exact_keys(&root, &key_set(&[a, b]), Duration::from_secs(20)).await?;
    let addr_a = format!("127.0.0.1:{a}");
    let addr_b = format!("127.0.0.1:{b}");
    let svc = "greet_service";

    // The servers' and the clients' users cannot drain anything.
    for (user, pw) in [("server", SERVER_PW), ("reader", READER_PW)] {
        let (code, out, err) = operate(&etcd, user, pw, &["drain", svc, &addr_a])?;
        ensure!(
            code == 1 && err.contains("permission denied"),
            "{user} drained: {code} {out} {err}"
        );
        let mut c = login(&etcd, user, pw).await?;
        let err = c
            .put(format!("{OVERRIDES}{svc}/endpoints/{addr_a}"), "{}", None)
            .await
            .expect_err("an override written by a server or a client");
        ensure!(
            err.to_string().contains("permission denied"),
            "{user}: {err}"
        );
    }

    // The operator's user drains; the override says who.
    let (code, out, err) = operate(&etcd, "operator", OPERATOR_PW, &["drain", svc, &addr_a])?;
    ensure!(code == 0, "the operator could not drain: {out} {err}");
    let mut r = root.clone();
    let stored = r
        .get(format!("{OVERRIDES}{svc}/endpoints/{addr_a}"), None)
        .await?;
    let value: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value())?;
    ensure!(
        value["by"] == "operator" && value["drain"] == true,
        "{value}"
    );

    // A client with the reader's role applies it: A gets no call.
    let mut load = common::bench(
        &eps,
        4,
        Duration::from_secs(2),
        &["--etcd-user", "reader"],
        &[("ETCD_PASSWORD", READER_PW)],
    )?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = common::report(&mut load, Duration::from_secs(30)).await?;
    ensure!(
        common::calls_of(&report, &addr_a) == 0 && common::calls_of(&report, &addr_b) > 0,
        "the reader's client did not apply the drain: {report}"
    );
    ensure!(report["errors"] == 0, "{report}");

    // And the operator's user writes nothing else: not the registry, not
    // the controller's election, nothing outside.
    let mut op = login(&etcd, "operator", OPERATOR_PW).await?;
    for key in [
        format!("/ns/{svc}/127.0.0.1:1"),
        "/greet-etcd/controller/leader/x".to_owned(),
        "/other".to_owned(),
    ] {
        let err = op
            .put(key.as_str(), "{}", None)
            .await
            .expect_err("the operator wrote outside the overrides");
        ensure!(
            err.to_string().contains("permission denied"),
            "{key}: {err}"
        );
    }
    let err = op
        .delete(key_of(b), None)
        .await
        .expect_err("the operator deleted a registration");
    ensure!(err.to_string().contains("permission denied"), "{err}");
    ensure!(keys(&root, PREFIX).await? == key_set(&[a, b]));

    // Undrain with the same role.
    let (code, out, err) = operate(&etcd, "operator", OPERATOR_PW, &["undrain", svc, &addr_a])?;
    ensure!(code == 0, "{out} {err}");
    Ok(())
}

/// The controller's HTTP side is a view: no method but GET (and HEAD)
/// changes or even reaches anything, on any route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_http_view_is_read_only() -> Result<()> {
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let port = free_port();
    let _srv = server(&etcd.endpoint(), port, &[], &[])?;
    wait_exact_keys(&c, &key_set(&[port]), Duration::from_secs(20)).await?;
    let http = free_port();
    let ctl = controller(&etcd.endpoint(), http, "3s")?;
    eventually(Duration::from_secs(20), "controller ready", || async {
        (http_get(http, "/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await
    .with_context(|| ctl.log())?;
    let key = key_of(port);
    let routes = [
        "/".to_owned(),
        "/services".to_owned(),
        "/services/greet_service".to_owned(),
        format!(
            "/services/greet_service/{}",
            key.rsplit('/').next().unwrap_or_default()
        ),
        "/metrics".to_owned(),
        "/healthz".to_owned(),
        "/readyz".to_owned(),
    ];
    for route in &routes {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let (status, body) = http_request(http, method, route).await?;
            assert!(
                status == 405 || status == 404,
                "{method} {route}: {status} {body}"
            );
        }
    }
    assert_eq!(keys(&c, PREFIX).await?, key_set(&[port]), "nothing changed");
    let (status, _) = http_get(http, "/services/greet_service").await?;
    assert_eq!(status, 200);
    Ok(())
}

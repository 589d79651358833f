//! rdzv's etcd password never shows: not in `ps`, not in the workers' environment, not in
//! logs at trace level, not in errors, not in `rdzv status`. It can come from a file
//! (`password_file`) or the environment (`RDZV_ETCD_PASSWORD`) instead of the command line.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{rdzv, run_id, run_to_end, wait_until, Etcd, Proc, WAIT};

/// The password of the etcd user `node`; distinctive, so that any leak is found.
const SECRET: &str = "pw-7f3a9c1e-do-not-leak";

/// An etcd with authentication: `root`, and `node` (password [`SECRET`]) with read-write on
/// the prefix `/rdzv/` only.
fn etcd_with_auth() -> Etcd {
    let etcd = Etcd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = etcd.server.client().await.expect("client");
        c.user_add("root", "root-pw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("rdzv-node").await.unwrap();
        c.role_grant_permission(
            "rdzv-node",
            etcd_client::Permission::read_write("/rdzv/").with_prefix(),
        )
        .await
        .unwrap();
        c.user_add("node", SECRET, None).await.unwrap();
        c.user_grant_role("node", "rdzv-node").await.unwrap();
        c.auth_enable().await.unwrap();
    });
    etcd
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "the password appears in {what}:\n{text}"
    );
}

/// Every command line of the machine, as `ps` shows them.
fn ps() -> String {
    let out = std::process::Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A worker that dumps its environment to `<dir>/env-<RANK>` and waits for `<dir>/gate`.
fn worker_script(dir: &Path) -> String {
    format!(
        "env > {dir}/env-$RANK.tmp && mv {dir}/env-$RANK.tmp {dir}/env-$RANK; \
         while [ ! -e {dir}/gate ]; do sleep 0.05; done",
        dir = dir.display()
    )
}

#[test]
fn the_password_shows_nowhere_in_a_job() {
    let etcd = etcd_with_auth();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = run_id("secrets");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{SECRET}\n")).expect("password file");
    let script = worker_script(dir.path());
    let agent = |i: usize, conf: &str, env: &[(&str, &str)]| {
        let mut cmd = rdzv();
        cmd.arg("run")
            .args(["--nnodes", "2", "--nproc-per-node", "1"])
            .args(["--rdzv-endpoint", &etcd.endpoint(), "--rdzv-id", &id])
            .args(["--local-addr", "127.0.0.1"])
            .args(["--rdzv-conf", conf])
            .args(["--", "sh", "-c", &script])
            .env("RDZV_LOG", "trace");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(cmd, dir.path(), &format!("agent{i}"))
    };
    // Node 0 reads the password from a file (and has the variable too, which its workers
    // must not get); node 1 from the environment variable.
    let file_conf = format!(
        "last_call_timeout=1,username=node,password_file={}",
        password_file.display()
    );
    let mut agents = [
        agent(
            0,
            &file_conf,
            &[("RDZV_ETCD_PASSWORD", "not-used-but-secret")],
        ),
        agent(
            1,
            "last_call_timeout=1,username=node",
            &[("RDZV_ETCD_PASSWORD", SECRET)],
        ),
    ];
    let env_files: Vec<_> = (0..2)
        .map(|r| dir.path().join(format!("env-{r}")))
        .collect();
    wait_until(
        WAIT,
        || {
            agents
                .iter()
                .map(Proc::describe)
                .collect::<Vec<_>>()
                .join("\n")
        },
        || env_files.iter().all(|f| f.exists()),
    );
    // While the job runs: not in any command line.
    assert_no_secret("ps", &ps());
    for f in &env_files {
        let env = std::fs::read_to_string(f).expect("worker environment");
        assert!(env.contains("RANK="), "{env}");
        assert_no_secret(&format!("a worker's environment ({})", f.display()), &env);
        assert!(
            !env.contains("RDZV_ETCD_PASSWORD"),
            "the workers must not get the variable: {env}"
        );
    }
    // `rdzv status` with the same credentials (from the variable), text and JSON.
    for json in [false, true] {
        let mut cmd = rdzv();
        cmd.args([
            "status",
            "--rdzv-endpoint",
            &etcd.endpoint(),
            "--rdzv-id",
            &id,
        ])
        .args(["--rdzv-conf", "username=node"])
        .env("RDZV_ETCD_PASSWORD", SECRET)
        .env("RDZV_LOG", "trace");
        if json {
            cmd.arg("--json");
        }
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "status", WAIT);
        assert_eq!(code, 0, "rdzv status: {stdout}\n{stderr}");
        assert!(stdout.contains(&id), "{stdout}");
        assert_no_secret("rdzv status", &format!("{stdout}\n{stderr}"));
    }
    std::fs::write(dir.path().join("gate"), b"go").expect("gate");
    for (i, a) in agents.iter_mut().enumerate() {
        let code = a.exit_code(WAIT);
        assert_eq!(code, 0, "agent{i}\n{}", a.describe());
        let logs = format!("{}\n{}", a.stdout(), a.stderr());
        assert!(
            logs.contains("TRACE") || logs.contains("DEBUG"),
            "agent{i} did not log at trace level"
        );
        assert_no_secret(&format!("agent{i}'s trace-level logs"), &logs);
    }
}

/// A password given in `PET_RDZV_CONF` (torchrun's variable) reaches the agent but not the
/// workers, who see the rest of the configuration.
#[test]
fn a_password_in_pet_rdzv_conf_is_stripped_from_the_workers_environment() {
    let etcd = etcd_with_auth();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = run_id("secrets-pet");
    let mut cmd = rdzv();
    cmd.arg("run")
        .args(["--nnodes", "1", "--nproc-per-node", "1"])
        .args(["--rdzv-endpoint", &etcd.endpoint(), "--rdzv-id", &id])
        .args(["--local-addr", "127.0.0.1"])
        .args([
            "--",
            "sh",
            "-c",
            &format!("env > {}/env-0", dir.path().display()),
        ])
        .env(
            "PET_RDZV_CONF",
            format!("last_call_timeout=1,username=node,password={SECRET}"),
        );
    let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "agent", WAIT);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("password_file"),
        "a password in the configuration is warned about: {stderr}"
    );
    let env = std::fs::read_to_string(dir.path().join("env-0")).expect("worker environment");
    assert_no_secret("the worker's environment", &env);
    assert!(
        env.contains("PET_RDZV_CONF=last_call_timeout=1,username=node"),
        "{env}"
    );
    assert_no_secret("the agent's output", &format!("{stdout}\n{stderr}"));
}

/// Errors never echo the password: a malformed configuration, a wrong password, a password
/// file that cannot be read.
#[test]
fn errors_do_not_echo_the_password() {
    let etcd = etcd_with_auth();
    let dir = tempfile::tempdir().expect("tempdir");
    let id = run_id("secrets-errors");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, format!("{SECRET}-but-wrong\n")).expect("file");
    let cases: Vec<(&str, String)> = vec![
        (
            "a malformed configuration",
            format!("username=node,password={SECRET},,timeout=5"),
        ),
        (
            "a wrong password",
            format!("username=node,password_file={}", wrong.display()),
        ),
        (
            "an unreadable password file",
            format!(
                "username=node,password_file={}/missing",
                dir.path().display()
            ),
        ),
    ];
    for (what, conf) in cases {
        let mut cmd = rdzv();
        cmd.args(["join", "--nnodes", "1"])
            .args(["--rdzv-endpoint", &etcd.endpoint(), "--rdzv-id", &id])
            .args(["--rdzv-conf", &conf])
            .env("RDZV_LOG", "trace");
        let (code, stdout, stderr) = run_to_end(cmd, dir.path(), "join", Duration::from_secs(20));
        assert_ne!(code, 0, "{what} must fail: {stdout}\n{stderr}");
        assert!(stderr.contains("error"), "{what}: {stderr}");
        assert_no_secret(what, &format!("{stdout}\n{stderr}"));
    }
}

//! The etcd backend over TLS against a real etcd with client-certificate authentication:
//! `protocol=https` with `cacert`, `cert` and `key` connects and completes a round; plain
//! HTTP, a CA that did not sign the server certificate, or a missing client certificate are
//! connection errors within the connect timeout.
//!
//! The certificates are made on the fly with the `openssl` command line tool.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdzv::etcd::server::{EtcdServerOptions, EtcdTls};
use rdzv::etcd::{EtcdRendezvousHandler, EtcdServer};
use rdzv::{RendezvousError, RendezvousHandler, RendezvousParameters};
use tempfile::TempDir;

/// Upper bound of starting etcd and of one rendezvous round.
const WAIT: Duration = Duration::from_secs(30);

/// Upper bound of a failing connect (`connect_timeout=2` plus slack).
const FAIL_WITHIN: Duration = Duration::from_secs(10);

/// A throw-away PKI: a CA, a server certificate it signed (for `127.0.0.1` and `localhost`),
/// a client certificate it signed, and a second CA that signed neither.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }
    fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }
    fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }
    fn server_tls(&self, client_cert_auth: bool) -> EtcdTls {
        EtcdTls {
            ca: self.ca(),
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_cert_auth,
        }
    }
}

/// Runs `openssl` with `args` in `dir`, panicking with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}); these tests need the openssl command line tool \
                 (e.g. `apt-get install openssl`)"
            )
        });
    assert!(
        output.status.success(),
        "openssl {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA `<name>.pem` with key `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    let (key, cert, subject) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN=rdzv test {name}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate `<name>.pem` with key `<name>.key`, signed by `ca.pem`, with the extensions
/// `extensions` (an openssl extension file's lines).
fn make_leaf(dir: &Path, name: &str, extensions: &str) {
    let (key, csr, cert, ext, subject) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
        format!("/CN=rdzv test {name}"),
    );
    std::fs::write(dir.join(&ext), extensions).expect("write extension file");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

fn make_pki() -> Pki {
    let dir = tempfile::Builder::new()
        .prefix("rdzv-tls-")
        .tempdir()
        .expect("temporary directory");
    let path = dir.path();
    make_ca(path, "ca");
    make_ca(path, "other-ca");
    make_leaf(
        path,
        "server",
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    );
    make_leaf(
        path,
        "client",
        "basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n",
    );
    Pki { dir }
}

async fn start_tls_server(pki: &Pki, client_cert_auth: bool) -> EtcdServer {
    let options = EtcdServerOptions {
        ready_timeout: WAIT,
        tls: Some(pki.server_tls(client_cert_auth)),
        ..Default::default()
    };
    EtcdServer::start_with(options)
        .await
        .unwrap_or_else(|e| panic!("cannot start etcd with TLS: {e}"))
}

fn params(server: &EtcdServer, run_id: &str) -> RendezvousParameters {
    RendezvousParameters::new("etcd", server.endpoint(), run_id, 1, 1)
        .expect("parameters")
        .with_config("connect_timeout", "2")
        .with_config("timeout", "20")
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 temporary path").to_owned()
}

/// Connects with `params`, expecting a connection error within [`FAIL_WITHIN`]; returns its
/// message.
async fn expect_connection_error(params: &RendezvousParameters) -> String {
    let started = Instant::now();
    let result = tokio::time::timeout(FAIL_WITHIN, EtcdRendezvousHandler::connect(params))
        .await
        .unwrap_or_else(|_| panic!("connect did not return within {FAIL_WITHIN:?}"));
    let elapsed = started.elapsed();
    let err = match result {
        Ok(_) => panic!("connect succeeded with {params:?}"),
        Err(e) => e,
    };
    assert!(
        matches!(err, RendezvousError::Connection(_)),
        "expected a connection error, got: {err:?}"
    );
    assert!(elapsed < FAIL_WITHIN, "took {elapsed:?}");
    eprintln!("connection error after {elapsed:?}: {err}");
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_client_certificate_completes_a_round() {
    let pki = make_pki();
    let server = start_tls_server(&pki, true).await;
    assert_eq!(
        server.endpoint_url(),
        format!("https://127.0.0.1:{}", server.port())
    );

    // The helper's own client speaks TLS too.
    let mut client = tokio::time::timeout(WAIT, server.client())
        .await
        .expect("client timed out")
        .expect("client");
    tokio::time::timeout(WAIT, client.put("tls-key", "v", None))
        .await
        .expect("put timed out")
        .expect("put");

    let p = params(&server, "tls-job")
        .with_config("protocol", "https")
        .with_config("cacert", path_str(&pki.ca()))
        .with_config("cert", path_str(&pki.client_cert()))
        .with_config("key", path_str(&pki.client_key()));
    let handler = tokio::time::timeout(WAIT, EtcdRendezvousHandler::connect(&p))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect over TLS: {e}\netcd log:\n{}", server.log_tail()));
    let info = tokio::time::timeout(WAIT, handler.next_rendezvous())
        .await
        .expect("next_rendezvous timed out")
        .expect("next_rendezvous over TLS");
    assert_eq!((info.rank, info.world_size), (0, 1));
    let _ = tokio::time::timeout(WAIT, handler.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_against_tls_is_a_connection_error() {
    let pki = make_pki();
    let server = start_tls_server(&pki, true).await;
    let p = params(&server, "tls-job").with_config("protocol", "http");
    let message = expect_connection_error(&p).await;
    assert!(message.contains(&server.endpoint()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_a_connection_error() {
    let pki = make_pki();
    let server = start_tls_server(&pki, true).await;
    let p = params(&server, "tls-job")
        .with_config("protocol", "https")
        .with_config("cacert", path_str(&pki.other_ca()))
        .with_config("cert", path_str(&pki.client_cert()))
        .with_config("key", path_str(&pki.client_key()));
    let message = expect_connection_error(&p).await;
    assert!(message.contains(&server.endpoint()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_a_connection_error() {
    let pki = make_pki();
    let server = start_tls_server(&pki, true).await;
    let p = params(&server, "tls-job")
        .with_config("protocol", "https")
        .with_config("cacert", path_str(&pki.ca()));
    let message = expect_connection_error(&p).await;
    assert!(message.contains(&server.endpoint()), "{message}");
}

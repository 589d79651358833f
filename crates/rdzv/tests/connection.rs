//! Connection errors: nothing listening, bad options. They come back within the connect
//! timeout, never hang.

use std::time::{Duration, Instant};

use rdzv::etcd::EtcdRendezvousHandler;
use rdzv::{RendezvousError, RendezvousParameters};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_connection_error_within_the_timeout() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let p = RendezvousParameters::new("etcd", &endpoint, "job", 1, 1)
        .unwrap()
        .with_config("connect_timeout", "1");
    let started = Instant::now();
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(matches!(err, RendezvousError::Connection(_)), "{err}");
    assert!(
        err.to_string().contains(&endpoint),
        "the error names the endpoint: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_address_is_a_connection_error_within_the_timeout() {
    // TEST-NET-1: nothing answers, packets are dropped or refused.
    let p = RendezvousParameters::new("etcd", "192.0.2.1:2379", "job", 1, 1)
        .unwrap()
        .with_config("connect_timeout", "1");
    let started = Instant::now();
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(matches!(err, RendezvousError::Connection(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_protocol_is_a_configuration_error() {
    let p = RendezvousParameters::new("etcd", "127.0.0.1:1", "job", 1, 1)
        .unwrap()
        .with_config("protocol", "gopher");
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(
        matches!(err, RendezvousError::InvalidConfig { ref key, .. } if key == "protocol"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_duration_is_a_parameter_error() {
    let p = RendezvousParameters::new("etcd", "127.0.0.1:1", "job", 1, 1)
        .unwrap()
        .with_config("timeout", "soon");
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(matches!(err, RendezvousError::Parameters(_)), "{err}");
    assert!(err.to_string().contains("timeout"), "{err}");
}

#[tokio::test]
async fn malformed_endpoint_is_a_configuration_error() {
    for endpoint in ["", ":2379", "host:99999", "host:abc", "a,,b"] {
        let p = RendezvousParameters::new("etcd", endpoint, "job", 1, 1).unwrap();
        let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
        assert!(
            matches!(err, RendezvousError::InvalidConfig { ref key, .. } if key == "endpoint"),
            "{endpoint:?}: {err}"
        );
    }
}

#[tokio::test]
async fn cert_without_key_is_a_configuration_error() {
    let p = RendezvousParameters::new("etcd", "127.0.0.1:1", "job", 1, 1)
        .unwrap()
        .with_config("cert", "/nonexistent.pem");
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(
        matches!(err, RendezvousError::InvalidConfig { ref key, .. } if key == "cert"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_backend_lists_the_known_ones() {
    let p = RendezvousParameters::new("zookeeper", "127.0.0.1:1", "job", 1, 1).unwrap();
    let err = rdzv::create_handler(p).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("zookeeper") && msg.contains("etcd"), "{msg}");
}

#[tokio::test]
async fn tls_files_with_plain_http_are_a_configuration_error() {
    let p = RendezvousParameters::new("etcd", "127.0.0.1:1", "job", 1, 1)
        .unwrap()
        .with_config("protocol", "http")
        .with_config("cacert", "/some/ca.pem");
    let err = EtcdRendezvousHandler::connect(&p).await.unwrap_err();
    assert!(
        matches!(err, RendezvousError::InvalidConfig { ref key, .. } if key == "protocol"),
        "{err}"
    );
}

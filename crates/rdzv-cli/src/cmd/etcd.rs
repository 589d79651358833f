//! `rdzv etcd`: a local etcd for standalone use.
//!
//! Starts an [`EtcdServer`] on free loopback ports with a temporary data dir, prints its
//! endpoint (`127.0.0.1:<port>`) alone on the first line of standard output, logs
//! `data_dir=<path>` (and the pid) on standard error, and runs until Ctrl-C, SIGTERM or SIGHUP;
//! then kills etcd and removes the data dir, and exits 0. If etcd dies on its own, exits 1.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdzv::etcd::server::EtcdServerOptions;
use rdzv::etcd::EtcdServer;
use tokio::signal::unix::{signal, SignalKind};

/// How often to check that etcd is still alive.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(250);

/// Arguments of `rdzv etcd`.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// How long to wait for etcd to answer, e.g. `30s`, `500ms`, `2m` or a number of seconds
    /// (1ms to 7d).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,

    /// Extra arguments for etcd, after `--` (e.g. `-- --max-txn-ops=1024`).
    #[arg(last = true, value_name = "ETCD_ARGS")]
    etcd_args: Vec<OsString>,
}

/// Parses `250ms`, `1.5s`, `2m`, `1h` or a bare number of seconds (the library's rules), from
/// 1ms to 7d ([`rdzv::MAX_TIMEOUT`]).
fn parse_duration(text: &str) -> Result<Duration, String> {
    rdzv::parse_duration_in(text, Duration::from_millis(1)..=rdzv::MAX_TIMEOUT)
        .map_err(|e| format!("`{}` is not a duration: {e}", text.trim()))
}

/// Runs `rdzv etcd`.
///
/// # Errors
/// If etcd cannot be started, the endpoint cannot be written to standard output, or a signal
/// handler cannot be installed.
pub async fn run(args: EtcdArgs) -> anyhow::Result<ExitCode> {
    // Install the handlers before anyone learns the endpoint, so a SIGTERM sent right after
    // reading it cannot hit the default action (which would leave the data dir behind).
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

    let options = EtcdServerOptions {
        ready_timeout: args.ready_timeout,
        extra_args: args.etcd_args,
        ..Default::default()
    };
    // A signal during the start cancels it; the cancelled start kills etcd and removes its
    // directory.
    let mut server = tokio::select! {
        started = EtcdServer::start_with(options) => started.context("cannot start etcd")?,
        _ = sigint.recv() => return Ok(interrupted("SIGINT")),
        _ = sigterm.recv() => return Ok(interrupted("SIGTERM")),
        _ = sighup.recv() => return Ok(interrupted("SIGHUP")),
    };

    let printed = {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", server.endpoint()).and_then(|()| stdout.flush())
    };
    if let Err(e) = printed {
        server.stop();
        return Err(e).context("cannot write the endpoint to standard output");
    }
    tracing::info!(
        endpoint = %server.endpoint(),
        data_dir = %server.data_dir().display(),
        pid = server.pid(),
        "etcd is running; stop it with Ctrl-C or SIGTERM"
    );

    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sighup.recv() => break Ok("SIGHUP"),
            _ = liveness.tick() => {
                if let Some(status) = server.try_wait() {
                    break Err(status);
                }
            }
        }
    };
    match outcome {
        Ok(signal) => {
            tracing::info!(signal, "stopping etcd");
            server.stop();
            tracing::info!("etcd stopped and its data dir removed");
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            let log = server.log_tail();
            server.stop();
            tracing::error!(%status, "etcd exited on its own; last lines of its log:\n{log}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn interrupted(signal: &str) -> ExitCode {
    tracing::warn!(signal, "interrupted while starting etcd");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        for bad in ["0", "8d", "18446744073709551615"] {
            let reason = parse_duration(bad).unwrap_err();
            assert!(reason.contains("1ms to 7d"), "{bad}: {reason}");
        }
    }
}

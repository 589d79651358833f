//! What the parent and the children of `rdzv bench --processes` say to each other (see
//! [`super::processes`]): the child's spec, the parent's commands, the child's messages, and
//! timestamps that mean the same in every process.

use serde::Deserialize;

use super::*;

/// The hidden subcommand a child runs.
pub(super) const CHILD_COMMAND: &str = "bench-child";

/// A command of the parent to a child, one a line after the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Command {
    /// `call [NODE...]`: these participants (all of the child's when none) call
    /// `next_rendezvous`; each reports `Ranked`.
    Call(Vec<usize>),
    /// `react departure|waiting`: every participant waits for such a membership event, then
    /// calls `next_rendezvous` (timed from then); answered `Armed` once all listen.
    React(ReactTo),
    /// `settle`: wait (bounded) for the watches of the participants ranked since the last
    /// `settle` or `mark`; answered `Settled`.
    Settle,
    /// `mark`: the measured part starts (counters, CPU, peak memory); answered `Marked`.
    Mark,
    /// `stats`: settle, then answer `Stats` since `mark`.
    Stats,
    /// `exit`: leave gracefully and exit.
    Exit,
}

/// The membership events a `react` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReactTo {
    /// A peer lost or left, or peers already waiting in the next round (`kill`, `leave`).
    Departure,
    /// Nodes waiting to join (`scale-up`).
    Waiting,
}

impl ReactTo {
    /// The events it accepts.
    pub(super) fn wanted(self) -> fn(&MembershipEvent) -> bool {
        match self {
            ReactTo::Departure => departure_event,
            ReactTo::Waiting => waiting_event,
        }
    }
}

impl Command {
    /// The command on `line`.
    pub(super) fn parse(line: &str) -> anyhow::Result<Self> {
        let mut words = line.split_whitespace();
        let command = match (words.next(), words.next()) {
            (Some("call"), first) => {
                let nodes: Result<Vec<usize>, _> =
                    first.into_iter().chain(words).map(str::parse).collect();
                return Ok(Command::Call(
                    nodes.with_context(|| format!("a bad call: {line:?}"))?,
                ));
            }
            (Some("react"), Some("departure")) => Command::React(ReactTo::Departure),
            (Some("react"), Some("waiting")) => Command::React(ReactTo::Waiting),
            (Some("settle"), None) => Command::Settle,
            (Some("mark"), None) => Command::Mark,
            (Some("stats"), None) => Command::Stats,
            (Some("exit"), None) => Command::Exit,
            _ => bail!("not a bench child's command: {line:?}"),
        };
        ensure!(
            words.next().is_none(),
            "not a bench child's command: {line:?}"
        );
        Ok(command)
    }

    /// The command as a line (without its end).
    pub(super) fn line(&self) -> String {
        match self {
            Command::Call(nodes) => {
                let mut line = "call".to_string();
                for n in nodes {
                    line.push_str(&format!(" {n}"));
                }
                line
            }
            Command::React(ReactTo::Departure) => "react departure".into(),
            Command::React(ReactTo::Waiting) => "react waiting".into(),
            Command::Settle => "settle".into(),
            Command::Mark => "mark".into(),
            Command::Stats => "stats".into(),
            Command::Exit => "exit".into(),
        }
    }
}

/// What a child is to do: the first line of its standard input (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChildSpec {
    pub(super) endpoint: String,
    pub(super) run_id: String,
    /// Its participants' indices in the measurement.
    pub(super) nodes: Vec<usize>,
    pub(super) min: usize,
    pub(super) max: usize,
    pub(super) last_call: f64,
    pub(super) ttl: u64,
    pub(super) round_timeout_s: u64,
    pub(super) conf: String,
    pub(super) setup_concurrency: usize,
}

/// What a child reports: one JSON object a line on its standard output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ChildMsg {
    /// All its handlers are created.
    Ready { setup_s: f64, setup_requests: u64 },
    /// One participant has its rank; times are `CLOCK_MONOTONIC` in nanoseconds.
    Ranked {
        node: usize,
        start_ns: u64,
        end_ns: u64,
        rank: usize,
        world_size: usize,
        round: u64,
    },
    /// Answers `react`.
    Armed,
    /// Answers `settle`.
    Settled,
    /// Answers `mark`.
    Marked,
    /// Answers `stats`: its clients' counts since `mark`, its CPU since then, its resident
    /// set then and its peak since.
    Stats {
        requests: u64,
        watch_creates: u64,
        watch_events: u64,
        keep_alives: u64,
        overloaded: u64,
        cpu_s: f64,
        rss_start_bytes: u64,
        peak_rss_bytes: u64,
    },
    /// It failed (and exits).
    Error { message: String },
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `at` as a `CLOCK_MONOTONIC` reading, comparable across the machine's processes.
pub(super) fn mono_ns(at: Instant) -> u64 {
    let (now, clock) = (Instant::now(), clock_ns());
    (clock + at.saturating_duration_since(now).as_nanos() as u64)
        .saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

/// The [`Instant`] of a `CLOCK_MONOTONIC` reading.
pub(super) fn instant_of(ns: u64) -> Instant {
    let (now, clock) = (Instant::now(), clock_ns());
    if ns <= clock {
        now.checked_sub(Duration::from_nanos(clock - ns))
            .unwrap_or(now)
    } else {
        now + Duration::from_nanos(ns - clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_readings_round_trip() {
        let at = Instant::now();
        let back = instant_of(mono_ns(at));
        let skew = if back > at { back - at } else { at - back };
        assert!(skew < Duration::from_millis(1), "{skew:?}");
        let later = at + Duration::from_secs(2);
        let apart = mono_ns(later) - mono_ns(at);
        assert!((1_999_000_000..=2_001_000_000).contains(&apart), "{apart}");
    }

    #[test]
    fn commands_are_lines() {
        for command in [
            Command::Call(Vec::new()),
            Command::Call(vec![3, 14]),
            Command::React(ReactTo::Departure),
            Command::React(ReactTo::Waiting),
            Command::Settle,
            Command::Mark,
            Command::Stats,
            Command::Exit,
        ] {
            assert_eq!(Command::parse(&command.line()).unwrap(), command);
        }
        assert_eq!(
            Command::parse("call 1 2\n").unwrap(),
            Command::Call(vec![1, 2])
        );
        for bad in ["", "go", "call x", "react", "react sometimes", "exit now"] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_are_one_json_line() {
        let msg = ChildMsg::Ready {
            setup_s: 1.5,
            setup_requests: 3,
        };
        let line = serde_json::to_string(&msg).unwrap();
        assert_eq!(line, r#"{"ready":{"setup_s":1.5,"setup_requests":3}}"#);
        assert!(matches!(
            serde_json::from_str(&line).unwrap(),
            ChildMsg::Ready {
                setup_requests: 3,
                ..
            }
        ));
    }
}

//! A tiny worker for the end-to-end tests of `rdzv run` (standard library only).
//!
//! It checks torchrun's environment contract, then performs an all-reduce (a sum) over TCP
//! through `MASTER_ADDR:MASTER_PORT`: rank 0 listens, every other rank sends `RANK + 1`, rank 0
//! adds everything up (its own value included) and sends the sum back; every rank checks that
//! the sum is `W (W + 1) / 2`. Any mismatch exits non-zero (after writing torch's error file).
//!
//! Test hooks (all optional environment variables):
//!
//! - `WORKER_RECORD=<path>`: append `rank=R world=W local_rank=L group_rank=G restart=C pid=P
//!   run_id=X master=ADDR:PORT round=N` after the environment checks (before the all-reduce), and
//!   `done rank=R world=W restart=C` after success; each line is one `write_all` on a file
//!   opened for appending, so concurrent workers do not interleave.
//! - `WORKER_FAIL_AT=r@c,...`: the worker with `RANK == r` fails (as below) when
//!   `TORCHELASTIC_RESTART_COUNT == c`.
//! - `WORKER_FAIL_RANK=r` (+ `WORKER_FAIL_UNTIL_RESTART=n`): the worker with `RANK == r` writes
//!   an error file and exits 1 while `TORCHELASTIC_RESTART_COUNT < n` (always without `n`).
//! - `WORKER_SLEEP_SECS=s` (+ `WORKER_SLEEP_IF_WORLD=w`): sleep `s` seconds before the
//!   all-reduce (only if `WORLD_SIZE == w` when that is set).
//! - `WORKER_GATE_FILE=<path>`: before the all-reduce (after any sleep), wait until `<path>`
//!   exists (checked every 20 ms, for at most `WORKER_GATE_TIMEOUT_SECS`, 120 by default; then
//!   exit with the all-reduce's code). The chaos tests hold every round's workers here while
//!   they inject faults, and create the file when the job may finish.

use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::exit;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bound of every socket operation and of the whole connection phase.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit code for an environment that breaks the contract.
const EXIT_ENV: i32 = 3;
/// Exit code for a failed all-reduce.
const EXIT_ALLREDUCE: i32 = 4;
/// Exit code of the injected failure.
const EXIT_INJECTED: i32 = 1;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Writes torch's error file (`TORCHELASTIC_ERROR_FILE`) if the variable is set.
fn write_error_file(message: &str) {
    let Some(path) = var("TORCHELASTIC_ERROR_FILE").filter(|p| !p.is_empty()) else {
        return;
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let json = format!(
        "{{\"message\": {{\"message\": \"{}\", \"extraInfo\": {{\"py_callstack\": \"\", \"timestamp\": \"{timestamp}\"}}}}}}\n",
        json_escape(message)
    );
    if let Err(e) = std::fs::write(&path, json) {
        let _ = std::io::stderr()
            .write_all(format!("worker: cannot write the error file {path}: {e}\n").as_bytes());
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Reports `message` on stderr and in the error file, and exits with `code`.
fn fail(code: i32, message: impl Display) -> ! {
    let message = format!("worker: {message}");
    let _ = std::io::stderr().write_all(format!("{message}\n").as_bytes());
    write_error_file(&message);
    exit(code)
}

fn required(name: &str) -> String {
    match var(name) {
        Some(v) if !v.is_empty() => v,
        Some(_) => fail(EXIT_ENV, format!("{name} is empty")),
        None => fail(EXIT_ENV, format!("{name} is not set")),
    }
}

fn number<T: FromStr>(name: &str) -> T {
    let text = required(name);
    text.trim()
        .parse()
        .unwrap_or_else(|_| fail(EXIT_ENV, format!("{name}={text:?} is not a valid number")))
}

fn optional_number<T: FromStr>(name: &str) -> Option<T> {
    let text = var(name).filter(|v| !v.trim().is_empty())?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| fail(EXIT_ENV, format!("{name}={text:?} is not a valid number"))),
    )
}

fn check(ok: bool, what: impl Display) {
    if !ok {
        fail(EXIT_ENV, format!("environment mismatch: {what}"));
    }
}

/// Appends one line (a single `write_all`) to the record file, if one is set.
fn record(line: &str) {
    let Some(path) = var("WORKER_RECORD").filter(|p| !p.is_empty()) else {
        return;
    };
    let result = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = result {
        fail(
            EXIT_ENV,
            format!("cannot append to WORKER_RECORD={path}: {e}"),
        );
    }
}

/// The environment the worker was started with.
struct Env {
    local_rank: u64,
    rank: u64,
    group_rank: u64,
    world_size: u64,
    restart_count: u64,
    run_id: String,
    master_addr: String,
    master_port: u16,
    round: String,
}

fn read_env() -> Env {
    let local_rank: u64 = number("LOCAL_RANK");
    let rank: u64 = number("RANK");
    let group_rank: u64 = number("GROUP_RANK");
    let role_rank: u64 = number("ROLE_RANK");
    let _role_name = required("ROLE_NAME");
    let local_world_size: u64 = number("LOCAL_WORLD_SIZE");
    let world_size: u64 = number("WORLD_SIZE");
    let group_world_size: u64 = number("GROUP_WORLD_SIZE");
    let role_world_size: u64 = number("ROLE_WORLD_SIZE");
    let master_addr = required("MASTER_ADDR");
    let master_port: u16 = number("MASTER_PORT");
    let restart_count: u64 = number("TORCHELASTIC_RESTART_COUNT");
    let _max_restarts: u64 = number("TORCHELASTIC_MAX_RESTARTS");
    let run_id = required("TORCHELASTIC_RUN_ID");
    let use_agent_store = required("TORCHELASTIC_USE_AGENT_STORE");
    let _nccl = required("TORCH_NCCL_ASYNC_ERROR_HANDLING");
    // torchrun sets OMP_NUM_THREADS=1 only with more than one worker per node.
    if local_world_size > 1 {
        let _omp = required("OMP_NUM_THREADS");
    }
    let _error_file = required("TORCHELASTIC_ERROR_FILE");

    check(
        use_agent_store == "False",
        format!("TORCHELASTIC_USE_AGENT_STORE={use_agent_store:?}, expected \"False\""),
    );
    check(master_port != 0, "MASTER_PORT=0");
    check(
        local_rank < local_world_size,
        format!("LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world_size}"),
    );
    check(
        rank < world_size,
        format!("RANK={rank} is not below WORLD_SIZE={world_size}"),
    );
    // With the same number of workers on every node (unless the test says they differ).
    let homogeneous = var("WORKER_HETEROGENEOUS").is_none();
    check(
        !homogeneous || rank == group_rank * local_world_size + local_rank,
        format!(
            "RANK={rank} != GROUP_RANK={group_rank} * LOCAL_WORLD_SIZE={local_world_size} + \
             LOCAL_RANK={local_rank}"
        ),
    );
    check(
        !homogeneous || world_size == group_world_size * local_world_size,
        format!(
            "WORLD_SIZE={world_size} != GROUP_WORLD_SIZE={group_world_size} * \
             LOCAL_WORLD_SIZE={local_world_size}"
        ),
    );
    check(
        role_rank == rank,
        format!("ROLE_RANK={role_rank} != RANK={rank} (single role)"),
    );
    check(
        role_world_size == world_size,
        format!("ROLE_WORLD_SIZE={role_world_size} != WORLD_SIZE={world_size} (single role)"),
    );
    Env {
        local_rank,
        rank,
        group_rank,
        world_size,
        restart_count,
        run_id,
        master_addr,
        master_port,
        round: var("RDZV_ROUND").unwrap_or_default(),
    }
}

fn master_socket_addrs(env: &Env) -> Vec<SocketAddr> {
    // `(&str, u16)` accepts IP literals (IPv6 without brackets) and host names.
    let host = env.master_addr.trim_matches(|c| c == '[' || c == ']');
    match (host, env.master_port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                fail(
                    EXIT_ALLREDUCE,
                    format!("MASTER_ADDR={} resolves to nothing", env.master_addr),
                );
            }
            addrs
        }
        Err(e) => fail(
            EXIT_ALLREDUCE,
            format!("cannot resolve MASTER_ADDR={}: {e}", env.master_addr),
        ),
    }
}

fn set_timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(())
}

fn read_line(reader: &mut BufReader<TcpStream>, from: &str) -> String {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => fail(
            EXIT_ALLREDUCE,
            format!("{from} closed the connection early"),
        ),
        Ok(_) => line.trim().to_string(),
        Err(e) => fail(EXIT_ALLREDUCE, format!("cannot read from {from}: {e}")),
    }
}

/// Rank 0: accepts every peer, sums, answers.
fn reduce_as_master(env: &Env, expected: u64) -> u64 {
    let addrs = master_socket_addrs(env);
    let listener = TcpListener::bind(&addrs[..]).unwrap_or_else(|e| {
        fail(
            EXIT_ALLREDUCE,
            format!("rank 0 cannot listen on {addrs:?}: {e}"),
        )
    });
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| fail(EXIT_ALLREDUCE, format!("set_nonblocking: {e}")));
    let peers = env.world_size - 1;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut seen = vec![false; env.world_size as usize];
    seen[0] = true;
    let mut sum = env.rank + 1;
    let mut conns = Vec::new();
    while (conns.len() as u64) < peers {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    fail(
                        EXIT_ALLREDUCE,
                        format!(
                            "rank 0: only {} of {peers} peers connected within {IO_TIMEOUT:?}",
                            conns.len()
                        ),
                    );
                }
                // Waiting for a connection on a non-blocking socket: poll, bounded above.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => fail(EXIT_ALLREDUCE, format!("rank 0: accept failed: {e}")),
        };
        set_timeouts(&stream)
            .unwrap_or_else(|e| fail(EXIT_ALLREDUCE, format!("rank 0: socket options: {e}")));
        let mut reader = BufReader::new(stream);
        let line = read_line(&mut reader, "a peer");
        let (peer_rank, value) = line
            .split_once(' ')
            .and_then(|(r, v)| Some((r.parse::<u64>().ok()?, v.parse::<u64>().ok()?)))
            .unwrap_or_else(|| fail(EXIT_ALLREDUCE, format!("rank 0: bad message {line:?}")));
        if peer_rank == 0 || peer_rank >= env.world_size || seen[peer_rank as usize] {
            fail(
                EXIT_ALLREDUCE,
                format!("rank 0: unexpected or duplicate peer rank {peer_rank}"),
            );
        }
        if value != peer_rank + 1 {
            fail(
                EXIT_ALLREDUCE,
                format!(
                    "rank 0: rank {peer_rank} sent {value}, expected {}",
                    peer_rank + 1
                ),
            );
        }
        seen[peer_rank as usize] = true;
        sum += value;
        conns.push(reader.into_inner());
    }
    for mut conn in conns {
        if let Err(e) = conn.write_all(format!("{sum}\n").as_bytes()) {
            fail(EXIT_ALLREDUCE, format!("rank 0: cannot send the sum: {e}"));
        }
    }
    if sum != expected {
        fail(
            EXIT_ALLREDUCE,
            format!("rank 0: sum {sum}, expected {expected}"),
        );
    }
    sum
}

/// Other ranks: connect (retrying while rank 0 is not listening yet), send, read the sum.
fn reduce_as_peer(env: &Env) -> u64 {
    let addrs = master_socket_addrs(env);
    let deadline = Instant::now() + IO_TIMEOUT;
    let stream = 'connect: loop {
        let mut last_error = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, Duration::from_secs(5)) {
                Ok(s) => break 'connect s,
                Err(e) => last_error = Some(e),
            }
        }
        if Instant::now() >= deadline {
            fail(
                EXIT_ALLREDUCE,
                format!(
                    "rank {}: cannot connect to {}:{} within {IO_TIMEOUT:?}: {}",
                    env.rank,
                    env.master_addr,
                    env.master_port,
                    last_error.map(|e| e.to_string()).unwrap_or_default()
                ),
            );
        }
        // Rank 0 may start later: retry, bounded by the deadline above.
        std::thread::sleep(Duration::from_millis(50));
    };
    set_timeouts(&stream).unwrap_or_else(|e| fail(EXIT_ALLREDUCE, format!("socket options: {e}")));
    let mut writer = stream
        .try_clone()
        .unwrap_or_else(|e| fail(EXIT_ALLREDUCE, format!("cannot clone the socket: {e}")));
    if let Err(e) = writer.write_all(format!("{} {}\n", env.rank, env.rank + 1).as_bytes()) {
        fail(
            EXIT_ALLREDUCE,
            format!("rank {}: cannot send: {e}", env.rank),
        );
    }
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader, "rank 0");
    line.parse()
        .unwrap_or_else(|_| fail(EXIT_ALLREDUCE, format!("rank 0 sent {line:?}, not a sum")))
}

fn main() {
    let env = read_env();
    let pid = std::process::id();
    record(&format!(
        "rank={} world={} local_rank={} group_rank={} restart={} pid={pid} run_id={} master={}:{} round={}",
        env.rank,
        env.world_size,
        env.local_rank,
        env.group_rank,
        env.restart_count,
        env.run_id,
        env.master_addr,
        env.master_port,
        env.round
    ));

    let fail_at = var("WORKER_FAIL_AT").unwrap_or_default();
    if fail_at.split(',').any(|item| {
        item.split_once('@').is_some_and(|(r, c)| {
            r.trim().parse::<u64>() == Ok(env.rank)
                && c.trim().parse::<u64>() == Ok(env.restart_count)
        })
    }) {
        fail(
            EXIT_INJECTED,
            format!(
                "injected failure of rank {} at restart {}",
                env.rank, env.restart_count
            ),
        );
    }

    if optional_number::<u64>("WORKER_FAIL_RANK") == Some(env.rank) {
        let until = optional_number::<u64>("WORKER_FAIL_UNTIL_RESTART");
        if until.is_none_or(|n| env.restart_count < n) {
            fail(
                EXIT_INJECTED,
                format!(
                    "injected failure of rank {} at restart {}",
                    env.rank, env.restart_count
                ),
            );
        }
    }

    if let Some(secs) = optional_number::<f64>("WORKER_SLEEP_SECS") {
        let only_world = optional_number::<u64>("WORKER_SLEEP_IF_WORLD");
        if only_world.is_none_or(|w| w == env.world_size) {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
        }
    }

    if let Some(gate) = var("WORKER_GATE_FILE").filter(|p| !p.is_empty()) {
        let limit = optional_number::<f64>("WORKER_GATE_TIMEOUT_SECS").unwrap_or(120.0);
        let deadline = Instant::now() + Duration::from_secs_f64(limit.max(0.0));
        // A file is the only signal the test can give a worker it did not start: poll it,
        // bounded by the deadline.
        while !std::path::Path::new(&gate).exists() {
            if Instant::now() >= deadline {
                fail(
                    EXIT_ALLREDUCE,
                    format!("the gate file {gate} did not appear within {limit} s"),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let expected = env.world_size * (env.world_size + 1) / 2;
    let sum = if env.rank == 0 {
        reduce_as_master(&env, expected)
    } else {
        reduce_as_peer(&env)
    };
    if sum != expected {
        fail(
            EXIT_ALLREDUCE,
            format!("rank {}: sum {sum}, expected {expected}", env.rank),
        );
    }
    record(&format!(
        "done rank={} world={} restart={}",
        env.rank, env.world_size, env.restart_count
    ));
    // One write per line, so that lines of concurrent workers sharing a console do not mix.
    let _ = std::io::stdout()
        .write_all(format!("worker rank {} of {} ok\n", env.rank, env.world_size).as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(format!("worker rank {} stderr\n", env.rank).as_bytes());
}

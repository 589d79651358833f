//! The failure summary, as torchrun prints it: the root cause (the first observed failure, by
//! the time in its error file) with the Python traceback that `@record` wrote, then the other
//! failures; and the root cause copied to the agent's own `TORCHELASTIC_ERROR_FILE`, where
//! schedulers read it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::workers::Failure;

/// What torch's `@record` writes in a worker's error file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFile {
    /// The exception message.
    pub message: String,
    /// The Python traceback (`py_callstack`), if any.
    pub traceback: Option<String>,
    /// When it was written (seconds since the epoch), if the file says.
    pub timestamp: Option<u64>,
}

/// Reads a worker's error file; a file that is not torch's JSON gives its text as the message.
pub fn read_error_file(path: &Path) -> Option<ErrorFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Some(ErrorFile {
            message: text.trim().chars().take(2000).collect(),
            ..ErrorFile::default()
        });
    };
    let msg = &json["message"];
    let (message, extra) = match msg {
        serde_json::Value::String(s) => (s.clone(), &serde_json::Value::Null),
        serde_json::Value::Object(o) => (
            o.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| msg.to_string()),
            o.get("extraInfo").unwrap_or(&serde_json::Value::Null),
        ),
        _ => (
            text.trim().chars().take(2000).collect(),
            &serde_json::Value::Null,
        ),
    };
    let traceback = extra["py_callstack"]
        .as_str()
        .filter(|t| !t.trim().is_empty())
        .map(str::to_string);
    let timestamp = match &extra["timestamp"] {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    };
    Some(ErrorFile {
        message,
        traceback,
        timestamp,
    })
}

/// When a failure happened: its error file's time if it has one, else when it was noticed.
fn failure_time(f: &Failure) -> SystemTime {
    f.error_file
        .as_deref()
        .and_then(read_error_file)
        .and_then(|e| e.timestamp)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or(f.time)
}

/// The index of the root cause among `failures`: the earliest (ties: the lowest rank).
pub fn root_cause(failures: &[Failure]) -> Option<usize> {
    (0..failures.len()).min_by_key(|&i| (failure_time(&failures[i]), failures[i].rank))
}

/// Where and what failed, for the summary's header lines.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The training script (or module, or program).
    pub entrypoint: &'a str,
    /// This node's host name.
    pub hostname: &'a str,
    /// The run id.
    pub run_id: &'a str,
    /// The round the workers were started for.
    pub round: u64,
    /// This node's group rank.
    pub group_rank: usize,
}

fn describe(out: &mut String, index: usize, f: &Failure, hostname: &str) {
    let time = humantime::format_rfc3339_seconds(failure_time(f));
    let _ = writeln!(out, "[{index}]:");
    let _ = writeln!(out, "  time      : {time}");
    let _ = writeln!(out, "  host      : {hostname}");
    let _ = writeln!(
        out,
        "  rank      : {} (local_rank: {})",
        f.rank, f.local_rank
    );
    let _ = writeln!(
        out,
        "  {} (pid: {})",
        f.describe_exit().replacen(':', "  :", 1),
        f.pid
    );
    match &f.error_file {
        Some(path) => {
            let _ = writeln!(out, "  error_file: {}", path.display());
            match read_error_file(path) {
                Some(e) => {
                    let text = e.traceback.unwrap_or(e.message);
                    let _ = writeln!(out, "  traceback : {}", text.trim_end());
                }
                None => {
                    let _ = writeln!(out, "  traceback : <the error file cannot be read>");
                }
            }
        }
        None => {
            let _ = writeln!(out, "  error_file: <N/A>");
            let _ = writeln!(
                out,
                "  traceback : To enable traceback see: \
                 https://pytorch.org/docs/stable/elastic/errors.html"
            );
        }
    }
}

/// The summary of `failures` (not empty), torchrun's layout with rdzv's run and round.
pub fn format_summary(ctx: &Context<'_>, failures: &[Failure]) -> String {
    let root = root_cause(failures).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "{}", "=".repeat(60));
    let _ = writeln!(out, "{} FAILED", ctx.entrypoint);
    let _ = writeln!(
        out,
        "(rdzv run '{}', round {}, group rank {})",
        ctx.run_id, ctx.round, ctx.group_rank
    );
    let _ = writeln!(out, "{}", "-".repeat(60));
    let _ = writeln!(out, "Failures:");
    let others: Vec<&Failure> = failures
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != root)
        .map(|(_, f)| f)
        .collect();
    if others.is_empty() {
        let _ = writeln!(out, "  <NO_OTHER_FAILURES>");
    }
    for (i, f) in others.iter().enumerate() {
        describe(&mut out, i + 1, f, ctx.hostname);
    }
    let _ = writeln!(out, "{}", "-".repeat(60));
    let _ = writeln!(out, "Root Cause (first observed failure):");
    if let Some(f) = failures.get(root) {
        describe(&mut out, 0, f, ctx.hostname);
    }
    let _ = write!(out, "{}", "=".repeat(60));
    out
}

/// Writes the root cause to `dest` (the agent's `TORCHELASTIC_ERROR_FILE`): a copy of the
/// worker's error file, or a message of the same format if it wrote none.
///
/// # Errors
/// If `dest` cannot be written.
pub fn write_agent_error_file(dest: &Path, root: &Failure) -> std::io::Result<()> {
    if let Some(src) = &root.error_file {
        if let Ok(text) = std::fs::read_to_string(src) {
            return std::fs::write(dest, text);
        }
    }
    let timestamp = root
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "message": {
            "message": format!(
                "worker rank {} (local_rank {}) failed: {}",
                root.rank,
                root.local_rank,
                root.describe_exit()
            ),
            "extraInfo": {"py_callstack": "", "timestamp": timestamp.to_string()},
        }
    });
    std::fs::write(dest, json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn failure(rank: usize, error_file: Option<&Path>, noticed: u64) -> Failure {
        Failure {
            local_rank: rank,
            rank,
            pid: 1000 + rank as u32,
            status: std::process::ExitStatus::from_raw(1 << 8),
            time: UNIX_EPOCH + Duration::from_secs(noticed),
            error_file: error_file.map(Path::to_path_buf),
        }
    }

    fn torch_error_file(
        dir: &Path,
        name: &str,
        message: &str,
        timestamp: u64,
    ) -> std::path::PathBuf {
        let path = dir.join(name);
        let json = serde_json::json!({"message": {"message": message, "extraInfo": {
            "py_callstack": format!("Traceback (most recent call last):\n  File \"train.py\"\n{message}"),
            "timestamp": timestamp.to_string()}}});
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[test]
    fn the_root_cause_is_the_earliest_error_file_then_the_lowest_rank() {
        let dir = tempfile::tempdir().unwrap();
        let late = torch_error_file(dir.path(), "a.json", "late", 2000);
        let early = torch_error_file(dir.path(), "b.json", "early", 1000);
        let failures = vec![
            failure(0, Some(&late), 900),
            failure(1, Some(&early), 3000),
            failure(2, None, 5000),
        ];
        assert_eq!(root_cause(&failures), Some(1));
        assert_eq!(
            root_cause(&[failure(3, None, 7), failure(2, None, 7)]),
            Some(1)
        );
        assert_eq!(root_cause(&[]), None);
    }

    #[test]
    fn the_summary_shows_the_root_cause_traceback_and_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let early = torch_error_file(dir.path(), "b.json", "ValueError: boom", 1000);
        let failures = vec![failure(0, None, 2000), failure(1, Some(&early), 3000)];
        let ctx = Context {
            entrypoint: "train.py",
            hostname: "node-a",
            run_id: "job",
            round: 3,
            group_rank: 0,
        };
        let text = format_summary(&ctx, &failures);
        let root_at = text.find("Root Cause").expect("root cause section");
        assert!(text.starts_with(&"=".repeat(60)), "{text}");
        assert!(text.contains("train.py FAILED"), "{text}");
        assert!(
            text[root_at..].contains("rank      : 1 (local_rank: 1)"),
            "{text}"
        );
        assert!(
            text[root_at..].contains("Traceback (most recent call last)"),
            "{text}"
        );
        assert!(text[root_at..].contains("ValueError: boom"), "{text}");
        assert!(
            text[..root_at].contains("rank      : 0 (local_rank: 0)"),
            "{text}"
        );
        assert!(text[..root_at].contains("error_file: <N/A>"), "{text}");
        let single = format_summary(&ctx, &failures[1..]);
        assert!(single.contains("<NO_OTHER_FAILURES>"), "{single}");
    }

    #[test]
    fn the_agent_error_file_is_the_root_causes_or_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let src = torch_error_file(dir.path(), "w.json", "ValueError: boom", 1000);
        let dest = dir.path().join("agent.json");
        write_agent_error_file(&dest, &failure(1, Some(&src), 5)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            std::fs::read_to_string(&src).unwrap()
        );
        write_agent_error_file(&dest, &failure(2, None, 5)).unwrap();
        let e = read_error_file(&dest).unwrap();
        assert!(e.message.contains("worker rank 2"), "{e:?}");
        assert_eq!(e.timestamp, Some(5));
    }
}

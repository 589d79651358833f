//! What a worker runs, as torchrun decides it: `python -u train.py args…` by default,
//! `python -u -m module args…` with `-m`, the command itself with `--no-python` (or after
//! `--`), and torchrun's `${local_rank}` macro replaced in every argument.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// torchrun's macro for the worker's local rank in the training script's arguments.
pub const LOCAL_RANK_MACRO: &str = "${local_rank}";

/// How the entry point is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A Python script (`--run-path` too): `python -u script args…`.
    Script,
    /// A Python module (`-m`): `python -u -m module args…`.
    Module,
    /// Any program (`--no-python`, or the `-- command` form): `command args…`.
    Program,
}

impl Mode {
    /// The mode for torchrun's flags; `dashed` is the `-- command` form.
    ///
    /// # Errors
    /// `-m` with `--no-python` (torchrun refuses it too).
    pub fn from_flags(module: bool, no_python: bool, dashed: bool) -> Result<Self, String> {
        match (module, no_python || dashed) {
            (true, true) => Err(
                "don't use both the '--no-python' flag (or the `-- command` form) and the \
                 '--module' flag at the same time"
                    .into(),
            ),
            (true, false) => Ok(Self::Module),
            (false, true) => Ok(Self::Program),
            (false, false) => Ok(Self::Script),
        }
    }
}

/// The Python interpreter: `explicit` (`--python` or `$PYTHON`), else the first of `python3`
/// and `python` that `find` locates on `PATH`.
///
/// # Errors
/// No interpreter found: a message that says how to give one.
pub fn python(
    explicit: Option<&OsStr>,
    find: impl Fn(&str) -> Option<PathBuf>,
) -> Result<OsString, String> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        return Ok(p.to_os_string());
    }
    ["python3", "python"]
        .into_iter()
        .find_map(find)
        .map(PathBuf::into_os_string)
        .ok_or_else(|| {
            "no Python interpreter on PATH (python3 or python): give one with --python (or \
             $PYTHON), or run a program with --no-python"
                .into()
        })
}

/// Looks `name` up in the directories of `path` (a `PATH` value), as a shell does.
pub fn find_on_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path?;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Where `program` is: itself if it has a `/` (and is executable), else its place on `path`.
pub fn resolve_program(program: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    let as_path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return is_executable(as_path).then(|| as_path.to_path_buf());
    }
    find_on_path(program.to_str()?, path)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The worker command line for `entry` (the script, module or program, then its arguments).
pub fn command_line(mode: Mode, python: Option<&OsStr>, entry: &[OsString]) -> Vec<OsString> {
    let mut line = Vec::with_capacity(entry.len() + 3);
    match (mode, python) {
        (Mode::Program, _) | (_, None) => {}
        (Mode::Script, Some(py)) => line.extend([py.to_os_string(), "-u".into()]),
        (Mode::Module, Some(py)) => line.extend([py.to_os_string(), "-u".into(), "-m".into()]),
    }
    line.extend(entry.iter().cloned());
    line
}

/// `args` with torchrun's `${local_rank}` replaced by `local_rank` (arguments that are not
/// valid UTF-8 are kept as they are).
pub fn substitute_local_rank(args: &[OsString], local_rank: usize) -> Vec<OsString> {
    let rank = local_rank.to_string();
    args.iter()
        .map(|a| match a.to_str() {
            Some(s) if s.contains(LOCAL_RANK_MACRO) => s.replace(LOCAL_RANK_MACRO, &rank).into(),
            _ => a.clone(),
        })
        .collect()
}

/// True if `argv` ends with `-- <command…>`: the `--` form, where `command` is what the
/// command line parser collected as the worker command.
pub fn is_dashed_form(argv: &[OsString], command: &[OsString]) -> bool {
    let n = command.len();
    argv.len() > n && argv[argv.len() - n - 1] == "--" && argv[argv.len() - n..] == *command
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn modes_follow_torchrun_flags() {
        assert_eq!(Mode::from_flags(false, false, false), Ok(Mode::Script));
        assert_eq!(Mode::from_flags(true, false, false), Ok(Mode::Module));
        assert_eq!(Mode::from_flags(false, true, false), Ok(Mode::Program));
        assert_eq!(Mode::from_flags(false, false, true), Ok(Mode::Program));
        assert!(Mode::from_flags(true, true, false).is_err());
        assert!(Mode::from_flags(true, false, true).is_err());
    }

    #[test]
    fn command_lines_are_torchruns() {
        let py = OsString::from("/usr/bin/python3");
        let entry = os(&["train.py", "--lr", "0.1"]);
        assert_eq!(
            command_line(Mode::Script, Some(&py), &entry),
            os(&["/usr/bin/python3", "-u", "train.py", "--lr", "0.1"])
        );
        assert_eq!(
            command_line(Mode::Module, Some(&py), &os(&["pkg.train", "x"])),
            os(&["/usr/bin/python3", "-u", "-m", "pkg.train", "x"])
        );
        assert_eq!(
            command_line(Mode::Program, Some(&py), &os(&["./run.sh", "a"])),
            os(&["./run.sh", "a"])
        );
    }

    #[test]
    fn the_interpreter_is_explicit_then_python3_then_python() {
        let none = |_: &str| None;
        let only_python = |n: &str| (n == "python").then(|| PathBuf::from("/bin/python"));
        let both = |n: &str| Some(PathBuf::from(format!("/bin/{n}")));
        assert_eq!(
            python(Some(OsStr::new("/opt/py")), both),
            Ok("/opt/py".into())
        );
        assert_eq!(
            python(Some(OsStr::new("")), both),
            Ok("/bin/python3".into())
        );
        assert_eq!(python(None, both), Ok("/bin/python3".into()));
        assert_eq!(python(None, only_python), Ok("/bin/python".into()));
        let err = python(None, none).unwrap_err();
        assert!(
            err.contains("--python") && err.contains("--no-python"),
            "{err}"
        );
    }

    #[test]
    fn local_rank_macro_is_replaced_everywhere() {
        assert_eq!(
            substitute_local_rank(
                &os(&[
                    "--local-rank=${local_rank}",
                    "x",
                    "${local_rank}${local_rank}"
                ]),
                3
            ),
            os(&["--local-rank=3", "x", "33"])
        );
    }

    #[test]
    fn the_dashed_form_is_recognised_only_at_the_end() {
        let cmd = os(&["sh", "-c", "true"]);
        assert!(is_dashed_form(
            &os(&["rdzv", "run", "--", "sh", "-c", "true"]),
            &cmd
        ));
        assert!(!is_dashed_form(
            &os(&["rdzv", "run", "sh", "-c", "true"]),
            &cmd
        ));
        // A `--` among the script's own arguments is the script's.
        let cmd = os(&["train.py", "--", "x"]);
        assert!(!is_dashed_form(
            &os(&["rdzv", "run", "train.py", "--", "x"]),
            &cmd
        ));
    }

    #[test]
    fn path_lookup_finds_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("python3");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("python");
        std::fs::write(&plain, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(find_on_path("python3", Some(&path)), Some(exe));
        assert_eq!(find_on_path("python", Some(&path)), None);
        assert_eq!(find_on_path("python3", None), None);
        let exe_os = dir.path().join("python3").into_os_string();
        assert_eq!(
            resolve_program(&exe_os, None),
            Some(dir.path().join("python3"))
        );
        assert_eq!(
            resolve_program(OsStr::new("python3"), Some(&path)),
            Some(dir.path().join("python3"))
        );
        assert_eq!(
            resolve_program(OsStr::new("/nonexistent/py"), Some(&path)),
            None
        );
        assert_eq!(resolve_program(plain.as_os_str(), Some(&path)), None);
    }
}

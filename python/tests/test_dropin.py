"""`rdzv run` as a drop-in for `torchrun`: the same script and flags, one word changed, give the
same ranks, the same worker environment, the same exit code and the same log layout (real
torchrun from PyPI, gloo on the CPU)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[2]
DEADLINE = 120  # seconds for one launcher run

#: What torchrun sets that rdzv sets differently, on purpose.
ALLOWED_DIFFERENCES = {
    "MASTER_ADDR": "torchrun --standalone says localhost, rdzv 127.0.0.1",
    "MASTER_PORT": "a free port, each time",
    "TORCHELASTIC_RUN_ID": "a random id with --standalone",
    "TORCHELASTIC_ERROR_FILE": "under a new /tmp/torchelastic_* directory",
    "TORCHELASTIC_USE_AGENT_STORE": "rdzv's agent has no TCPStore to share (False)",
    "RDZV_ROUND": "rdzv's own: the rendezvous round",
    "_": "the shell's last command",
}

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    with open(os.path.join(sys.argv[1], "env-%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({"env": dict(os.environ), "sum": t.item(), "argv": sys.argv[2:]}, f)
    print("hello from", os.environ["RANK"], flush=True)
    dist.destroy_process_group()
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        sys.exit(3)
    """
)


def rdzv_bin():
    path = os.environ.get("RDZV_BIN") or str(REPO / "target" / "debug" / "rdzv")
    if not os.path.exists(path):
        pytest.fail(f"the rdzv binary is missing at {path}: build it (cargo build -p rdzv-cli) or set RDZV_BIN")
    return path


def launch(launcher, flags, tmp_path, name, env=None):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    first = [sys.executable, "-m", "torch.distributed.run"] if launcher == "torchrun" else [rdzv_bin(), "run"]
    full_env = dict(os.environ, **(env or {}))
    # The interpreter with torch first on PATH, for rdzv's `python -u script`.
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(
        [*first, *flags, str(script), str(out), "--an-arg"],
        env=full_env, capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path,
    )
    envs = {}
    for f in out.glob("env-*.json"):
        data = json.loads(f.read_text())
        envs[int(data["env"]["RANK"])] = data
    return proc, envs


def launched_vars(env):
    return {k: v for k, v in env.items() if os.environ.get(k) != v or k not in os.environ}


@pytest.mark.parametrize("flags", [
    ["--standalone", "--nproc-per-node", "2"],
    # torchrun's default: the static backend, no endpoint.
    ["--nproc-per-node", "2"],
])
def test_same_ranks_and_environment(tmp_path, flags):
    t_proc, t_envs = launch("torchrun", flags, tmp_path, "torchrun")
    r_proc, r_envs = launch("rdzv", flags, tmp_path, "rdzv")
    assert t_proc.returncode == 0, t_proc.stderr[-3000:]
    assert r_proc.returncode == 0, r_proc.stderr[-3000:]
    assert sorted(t_envs) == sorted(r_envs) == [0, 1]
    for rank in (0, 1):
        t, r = t_envs[rank], r_envs[rank]
        assert t["sum"] == r["sum"] == 3.0
        assert t["argv"] == r["argv"] == ["--an-arg"]
        t_vars, r_vars = launched_vars(t["env"]), launched_vars(r["env"])
        missing = set(t_vars) - set(r_vars) - set(ALLOWED_DIFFERENCES)
        assert not missing, f"rdzv does not set {sorted(missing)}"
        differ = {
            k: (t_vars[k], r_vars[k])
            for k in set(t_vars) & set(r_vars)
            if t_vars[k] != r_vars[k] and k not in ALLOWED_DIFFERENCES
        }
        assert not differ, f"rank {rank}: torchrun vs rdzv: {differ}"


def test_same_exit_code_and_log_layout_on_a_failure(tmp_path):
    results = {}
    for launcher in ("torchrun", "rdzv"):
        logs = tmp_path / f"logs-{launcher}"
        flags = ["--nproc-per-node", "2", "--rdzv-id", "job", "--log-dir", str(logs), "-r", "3"]
        proc, _ = launch(launcher, flags, tmp_path, launcher, env={"FAIL_RANK": "1"})
        runs = list(logs.iterdir())
        assert len(runs) == 1, f"{launcher}: {runs}"
        # One node, no endpoint, no master port: torchrun 2.15 makes it a standalone job
        # with a random run id, whatever --rdzv-id says; rdzv does the same.
        # (The random suffix may itself contain `_`.)
        name = runs[0].name
        run_id, sep, suffix = name[:36], name[36:37], name[37:]
        assert run_id.count("-") == 4 and sep == "_" and suffix, f"{launcher}: {name}"
        files = sorted(str(p.relative_to(runs[0])) for p in runs[0].rglob("*") if p.is_file())
        results[launcher] = (proc.returncode, files, proc.stderr)
    t_code, t_files, t_err = results["torchrun"]
    r_code, r_files, r_err = results["rdzv"]
    assert t_code == r_code == 1, (t_code, r_code)
    assert t_files == r_files, (t_files, r_files)
    assert "Root Cause (first observed failure)" in t_err
    assert "Root Cause (first observed failure)" in r_err, r_err[-3000:]
    assert "rank      : 1 (local_rank: 1)" in r_err.split("Root Cause")[1]


def test_module_mode_runs_the_same(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(SCRIPT)
    outs = {}
    for launcher in ("torchrun", "rdzv"):
        out = tmp_path / f"out-{launcher}"
        out.mkdir()
        first = [sys.executable, "-m", "torch.distributed.run"] if launcher == "torchrun" else [rdzv_bin(), "run"]
        env = dict(os.environ, PYTHONPATH=str(tmp_path))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        proc = subprocess.run(
            [*first, "--nproc-per-node", "2", "-m", "pkg.train", str(out)],
            env=env, capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path,
        )
        assert proc.returncode == 0, f"{launcher}: {proc.stderr[-3000:]}"
        outs[launcher] = sorted(p.name for p in out.iterdir())
    assert outs["torchrun"] == outs["rdzv"] == ["env-0.json", "env-1.json"]

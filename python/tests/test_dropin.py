"""`rdzv run` as a drop-in for `torchrun`: the same script and flags, one word changed, give the
same ranks, the same worker environment, the same exit code and the same log layout (real
torchrun from PyPI, gloo on the CPU)."""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[2]
DEADLINE = 120  # seconds for one launcher run

#: What torchrun sets that rdzv sets differently, on purpose.
ALLOWED_DIFFERENCES = {
    # Where rank 0's node is: torchrun's c10d and --standalone give its FQDN (`localhost`
    # here), rdzv the IP it advertises (127.0.0.1 with --standalone, else its default route's).
    "MASTER_ADDR": "rank 0's node: torchrun's FQDN, rdzv's advertised IP",
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
    if os.environ.get("FAIL_EARLY_RANK") == os.environ["RANK"]:
        os._exit(3)  # before the all-reduce: the other ranks' collective fails
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


def free_port():
    """A free port of 127.0.0.1, drawn below the kernel's ephemeral range if it can be (as
    rdzv's `free_port`): no outgoing connection or bind(0) takes it before it is listened on."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(64):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, flags, tmp_path, name, env=None, agents=None):
    """Runs `flags script out --an-arg` under `launcher` (torchrun or rdzv run) and returns its
    result and the workers' reports by global rank. With `agents` (a list of per-agent extra
    flags), starts one launcher process per item, all at once, as the nodes of one job on this
    host, and returns the list of their results."""
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    first = [sys.executable, "-m", "torch.distributed.run"] if launcher == "torchrun" else [rdzv_bin(), "run"]
    full_env = dict(os.environ, **(env or {}))
    # The interpreter with torch first on PATH, for rdzv's `python -u script`.
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    procs = []
    for i, extra in enumerate(agents if agents is not None else [[]]):
        stdout = open(tmp_path / f"{name}-agent{i}.stdout", "w+")
        stderr = open(tmp_path / f"{name}-agent{i}.stderr", "w+")
        proc = subprocess.Popen(
            [*first, *flags, *extra, str(script), str(out), "--an-arg"],
            env=full_env, stdout=stdout, stderr=stderr, text=True, cwd=tmp_path,
        )
        procs.append((proc, stdout, stderr))
    deadline = time.monotonic() + DEADLINE
    results = []
    try:
        for i, (proc, stdout, stderr) in enumerate(procs):
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stderr.seek(0)
                pytest.fail(f"{launcher} agent {i} of {len(procs)} ({name}) still runs after "
                            f"{DEADLINE}s:\n{stderr.read()[-3000:]}")
            stdout.seek(0)
            stderr.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, code, stdout.read(), stderr.read()))
    finally:
        for proc, stdout, stderr in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stdout.close()
            stderr.close()
    envs = {}
    for f in out.glob("env-*.json"):
        data = json.loads(f.read_text())
        envs[int(data["env"]["RANK"])] = data
    return (results if agents is not None else results[0]), envs


def launched_vars(env):
    return {k: v for k, v in env.items() if os.environ.get(k) != v or k not in os.environ}


def assert_same_workers(t_envs, r_envs, world):
    """The same global ranks `0..world-1`, all-reduce sum, arguments and worker environment
    (but for ALLOWED_DIFFERENCES) under torchrun (`t_envs`) and rdzv (`r_envs`)."""
    assert sorted(t_envs) == list(range(world)), f"torchrun's ranks: {sorted(t_envs)}"
    assert sorted(r_envs) == list(range(world)), f"rdzv's ranks: {sorted(r_envs)}"
    for rank in range(world):
        t, r = t_envs[rank], r_envs[rank]
        assert t["sum"] == r["sum"] == world * (world + 1) / 2, (rank, t["sum"], r["sum"])
        assert t["argv"] == r["argv"] == ["--an-arg"]
        t_vars, r_vars = launched_vars(t["env"]), launched_vars(r["env"])
        missing = set(t_vars) - set(r_vars) - set(ALLOWED_DIFFERENCES)
        assert not missing, f"rdzv does not set {sorted(missing)}"
        extra = set(r_vars) - set(t_vars) - set(ALLOWED_DIFFERENCES)
        assert not extra, f"rdzv sets {sorted(extra)}, torchrun does not"
        differ = {
            k: (t_vars[k], r_vars[k])
            for k in set(t_vars) & set(r_vars)
            if t_vars[k] != r_vars[k] and k not in ALLOWED_DIFFERENCES
        }
        assert not differ, f"rank {rank}: torchrun vs rdzv: {differ}"


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
    assert_same_workers(t_envs, r_envs, 2)


def static_two_nodes(port):
    return ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--nproc-per-node", "2"], [["--node-rank", "0"], ["--node-rank", "1"]]


def c10d_two_nodes(port, nnodes="2"):
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job",
            "--nnodes", nnodes, "--nproc-per-node", "2"], [[], []]


# Two agents on this host, as the two nodes of one job, each launcher with its own free port:
# the static backend (--node-rank 0/1), c10d (the first agent to bind the endpoint serves it),
# and an elastic 1:2 job over c10d. Elastic: both launchers' rendezvous, once min (1) node has
# joined, wait `last_call_timeout` (30 s by default in both) for more, and close the round at
# once when max (2) have joined: two agents started together always form one round of 2
# (unless one starts 30 s after the other), so no --rdzv-conf is needed.
MULTI_NODE = {
    "static": static_two_nodes,
    "c10d": c10d_two_nodes,
    "elastic-1:2": lambda port: c10d_two_nodes(port, nnodes="1:2"),
}


@pytest.mark.parametrize("kind", sorted(MULTI_NODE))
def test_two_nodes_same_ranks_and_environment(tmp_path, kind):
    results = {}
    for launcher in ("torchrun", "rdzv"):
        port = free_port()
        flags, agents = MULTI_NODE[kind](port)
        procs, envs = launch(launcher, flags, tmp_path, launcher, agents=agents)
        for i, proc in enumerate(procs):
            assert proc.returncode == 0, f"{launcher} agent {i}: {proc.stderr[-3000:]}"
        for rank, data in envs.items():
            env = data["env"]
            assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("4", "2", "2"), \
                f"{launcher} rank {rank}: one round of two nodes of two workers"
            if kind == "static":
                assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(port)), \
                    f"{launcher} rank {rank}: --master-addr/--master-port"
        results[launcher] = envs
    assert_same_workers(results["torchrun"], results["rdzv"], 4)


@pytest.mark.parametrize("kind", ["static", "c10d"])
def test_two_nodes_same_exit_codes_when_a_worker_of_node_1_fails(tmp_path, kind):
    """Global rank 3 (local rank 1 of node 1 on static; of whichever node gets group rank 1 on
    c10d) exits 3 before the all-reduce: the other workers' collective fails too, and every
    agent of both launchers exits 1."""
    codes = {}
    for launcher in ("torchrun", "rdzv"):
        flags, agents = MULTI_NODE[kind](free_port())
        procs, envs = launch(launcher, flags, tmp_path, launcher, agents=agents,
                             env={"FAIL_EARLY_RANK": "3"})
        assert not envs, f"{launcher}: no worker got past the all-reduce: {sorted(envs)}"
        codes[launcher] = [p.returncode for p in procs]
        for i, proc in enumerate(procs):
            assert proc.returncode == 1, f"{launcher} agent {i}: {proc.stderr[-3000:]}"
        # The agent of rank 3 names it, with its exit code, in torchrun's failure summary.
        assert any("rank      : 3 (local_rank: 1)" in p.stderr and "exitcode  : 3" in p.stderr
                   for p in procs), f"{launcher}: {[p.stderr[-2000:] for p in procs]}"
    assert codes["torchrun"] == codes["rdzv"] == [1, 1], codes


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


def test_rarer_flags_same_logs_and_environment(tmp_path):
    """--duplicate-stdout-filters/--duplicate-stderr-filters (matching tee'd lines copied to
    attempt_0/filtered_std*.log) and --virtual-local-rank (LOCAL_RANK=0, one device each): the
    same files, the same copied lines, the same worker environment."""
    layouts = {}
    envs = {}
    for launcher in ("torchrun", "rdzv"):
        logs = tmp_path / f"logs-{launcher}"
        flags = ["--nproc-per-node", "2", "--log-dir", str(logs), "--tee", "3",
                 "--duplicate-stdout-filters", "hello from 1,no such line",
                 "--duplicate-stderr-filters", "no such line", "--virtual-local-rank"]
        proc, envs[launcher] = launch(launcher, flags, tmp_path, launcher,
                                      env={"CUDA_VISIBLE_DEVICES": "5,7"})
        assert proc.returncode == 0, f"{launcher}: {proc.stderr[-3000:]}"
        runs = list(logs.iterdir())
        assert len(runs) == 1, f"{launcher}: {runs}"
        files = sorted(str(p.relative_to(runs[0])) for p in runs[0].rglob("*") if p.is_file())
        attempt = runs[0] / "attempt_0"
        layouts[launcher] = (
            files,
            (attempt / "filtered_stdout.log").read_text(),
            (attempt / "filtered_stderr.log").read_text(),
        )
    assert layouts["torchrun"] == layouts["rdzv"], layouts
    assert layouts["rdzv"][1:] == ("[default1]:hello from 1\n", ""), layouts["rdzv"]
    for rank in (0, 1):
        env = envs["rdzv"][rank]["env"]
        assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("0", ["5", "7"][rank]), rank
    assert_same_workers(envs["torchrun"], envs["rdzv"], 2)

"""torchrun with `--rdzv-backend etcd-v3`: two agents, two gloo workers each, on rdzv's etcd."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

AGENT_DEADLINE = 180  # seconds: a whole two-agent job, start to end

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    if t.item() != expected:
        sys.exit(f"rank {rank}: all-reduce sum {t.item()} != {expected}")
    out = os.path.join(sys.argv[1], f"rank{rank}.json")
    with open(out, "w") as f:
        json.dump({"rank": rank, "world": world, "sum": t.item(),
                   "group_rank": int(os.environ["GROUP_RANK"]),
                   "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}, f)
    dist.destroy_process_group()
    """
)


def torchrun(etcd, run_id, script, out_dir, nnodes="2", extra=()):
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--rdzv-backend", "etcd-v3",
        "--rdzv-endpoint", etcd.get_endpoint(),
        "--rdzv-id", run_id,
        "--rdzv-conf", "last_call_timeout=1,timeout=120",
        "--nnodes", nnodes,
        "--nproc-per-node", "2",
        "--monitor-interval", "0.1",
        *extra,
        str(script), str(out_dir),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(agents):
    outputs = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=AGENT_DEADLINE)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            pytest.fail(f"torchrun did not finish within {AGENT_DEADLINE}s")
        outputs.append(out)
    return outputs


def test_two_agents_run_a_gloo_all_reduce(etcd, run_id, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    agents = [torchrun(etcd, run_id, script, out_dir) for _ in range(2)]
    outputs = finish(agents)
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert {r["world"] for r in results} == {4}
    assert {r["sum"] for r in results} == {10.0}
    assert sorted(r["group_rank"] for r in results) == [0, 0, 1, 1]

"""torchrun with `--rdzv-backend etcd-v3` on rdzv's etcd: two agents, two gloo workers each; a
failed worker, a lost agent, a third agent, `--rdzv-conf` settings."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

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


# ---------------------------------------------------------------------------------------------
# Elastic cases: worker failure, a lost agent, a third agent arriving, --rdzv-conf.
#
# The workers print one line per round they ran (`WORKER world=.. rank=..`), and exit once the
# world has the size the test expects in the end; before that they wait for their agent to
# restart them. The test follows the agents' output line by line (no polling): each agent's
# output is read by a thread into a shared list, and a condition wakes the waiting test.

ELASTIC_WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist

    final_world = int(sys.argv[1])
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    tag = os.environ.get("AGENT_TAG", "?")
    if os.environ.get("FAIL_FIRST_ATTEMPT") == "1" and restart == 0 and os.environ["LOCAL_RANK"] == "0":
        sys.stdout.write(f"WORKER-FAILS agent={tag}\\n")
        sys.exit(3)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    # One write per line: workers run unbuffered (`python -u`), where print() writes the text
    # and the newline separately, so two workers' lines could be interleaved.
    sys.stdout.write(f"WORKER world={world} rank={rank} restart={restart} agent={tag} "
                     f"sum={t.item()}\\n")
    if world == final_world:
        dist.destroy_process_group()
        sys.exit(0)
    # Not the final world yet: the agent restarts this worker (SIGTERM) when the membership
    # changes. The bound makes a missed restart a failure instead of a hang.
    time.sleep(240)
    sys.exit(f"rank {rank}: not restarted within 240 s in a world of {world}")
    """
)

WORKER_LINE = re.compile(
    r"WORKER world=(\d+) rank=(\d+) restart=(\d+) agent=(\S+) sum=([0-9.]+)"
)


def children(pid):
    """The processes whose parent is pid. torchrun starts each worker in a session of its own,
    so the agent's process group does not hold them."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def sigkill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    """torchrun agents, whose output lines are collected as they come. A lost node is its
    agent and the agent's workers SIGKILLed."""

    def __init__(self, etcd, run_id, tmp_path, final_world, conf="last_call_timeout=1,timeout=120,keep_alive_ttl=2"):
        self.etcd, self.run_id, self.conf = etcd, run_id, conf
        self.script = tmp_path / "elastic_worker.py"
        self.script.write_text(ELASTIC_WORKER)
        self.final_world = final_world
        self.agents = {}
        self.lines = []
        self.cond = threading.Condition()

    def start(self, tag, nnodes, extra=(), env=None):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--rdzv-backend", "etcd-v3",
            "--rdzv-endpoint", self.etcd.get_endpoint(),
            "--rdzv-id", self.run_id,
            "--rdzv-conf", self.conf,
            "--nnodes", nnodes,
            "--nproc-per-node", "2",
            "--monitor-interval", "0.1",
            *extra,
            str(self.script), str(self.final_world),
        ]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", AGENT_TAG=tag, **(env or {}))
        agent = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        self.agents[tag] = agent
        threading.Thread(target=self._read, args=(tag, agent), daemon=True).start()
        return agent

    def _read(self, tag, agent):
        for line in agent.stdout:
            with self.cond:
                self.lines.append((tag, line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((tag, None))  # end of output
            self.cond.notify_all()

    def workers(self, world=None):
        """The parsed worker lines so far (of worlds of size `world`, if given)."""
        found = []
        for _, line in self.lines:
            # finditer: a line may still hold another process's output before or after.
            for m in WORKER_LINE.finditer(line or ""):
                if world is None or int(m.group(1)) == world:
                    found.append(dict(world=int(m.group(1)), rank=int(m.group(2)),
                                      restart=int(m.group(3)), agent=m.group(4),
                                      sum=float(m.group(5))))
        return found

    def wait_for_world(self, world, timeout=AGENT_DEADLINE):
        """Waits until all `world` workers of a world of that size reported."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.workers(world)) >= world, timeout):
                self.fail(f"the {world} workers of a world of {world} did not all report "
                          f"within {timeout}s")
        return self.workers(world)

    def kill(self, tag):
        """SIGKILLs the agent `tag` and its workers (a lost node)."""
        agent = self.agents[tag]
        workers = children(agent.pid)
        sigkill([agent.pid, *workers])
        agent.wait(timeout=30)

    def finish(self, tags, timeout=AGENT_DEADLINE):
        """Waits for the agents `tags` to exit and for the end of their output (the reader
        threads may still be behind when an agent exits); returns their exit codes."""
        deadline = time.monotonic() + timeout
        for tag in tags:
            try:
                self.agents[tag].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail(f"agent {tag} did not exit within {timeout}s")
        with self.cond:
            ended = lambda: {t for t, line in self.lines if line is None} >= set(tags)  # noqa: E731
            if not self.cond.wait_for(ended, max(0.0, deadline - time.monotonic())):
                self.fail(f"the output of agents {tags} did not end within {timeout}s")
        return {tag: self.agents[tag].returncode for tag in tags}

    def output(self):
        return "\n".join(f"[{t}] {line}" for t, line in self.lines if line is not None)

    def fail(self, message):
        self.stop()
        pytest.fail(f"{message}; output:\n{self.output()[-6000:]}")

    def stop(self):
        """SIGKILLs the agents that still run, and their workers."""
        for agent in self.agents.values():
            if agent.poll() is None:
                sigkill([agent.pid, *children(agent.pid)])
                agent.wait(timeout=30)


@pytest.fixture
def cluster_factory(etcd, run_id, tmp_path):
    made = []

    def make(final_world, **kwargs):
        made.append(Cluster(etcd, run_id, tmp_path, final_world, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def assert_all_reduced(workers, world):
    assert sorted(w["rank"] for w in workers) == list(range(world)), workers
    assert {w["sum"] for w in workers} == {world * (world + 1) / 2}, workers


def test_a_failed_worker_restarts_the_job(cluster_factory):
    # Agent a's local rank 0 fails on the first attempt; with --max-restarts 1 agent a restarts
    # its workers and re-joins; agent b sees a node waiting and restarts too (a membership
    # change, which does not use up b's restarts).
    cluster = cluster_factory(final_world=4)
    cluster.start("a", "2", extra=["--max-restarts", "1"], env={"FAIL_FIRST_ATTEMPT": "1"})
    cluster.start("b", "2", extra=["--max-restarts", "1"])
    codes = cluster.finish(["a", "b"])
    assert codes == {"a": 0, "b": 0}, cluster.output()[-6000:]
    fails = re.findall(r"WORKER-FAILS agent=(\S+)", cluster.output())
    assert fails == ["a"], cluster.output()[-6000:]
    final = cluster.workers(4)
    assert_all_reduced(final, 4)
    assert {w["restart"] for w in final if w["agent"] == "a"} == {1}, final
    assert {w["restart"] for w in final if w["agent"] == "b"} == {0}, final


def test_a_failed_worker_without_restarts_fails_the_job(cluster_factory):
    cluster = cluster_factory(final_world=2)
    cluster.start("a", "1", env={"FAIL_FIRST_ATTEMPT": "1"})
    codes = cluster.finish(["a"])
    assert codes["a"] != 0, cluster.output()[-6000:]


def test_a_lost_agent_restarts_the_survivors_in_a_smaller_world(cluster_factory):
    cluster = cluster_factory(final_world=4)
    for tag in "abc":
        cluster.start(tag, "2:3")
    first = cluster.wait_for_world(6)
    assert_all_reduced(first, 6)
    cluster.kill("c")
    final = cluster.wait_for_world(4)
    assert_all_reduced(final, 4)
    assert {w["agent"] for w in final} == {"a", "b"}, final
    codes = cluster.finish(["a", "b"])
    assert codes == {"a": 0, "b": 0}, cluster.output()[-6000:]


def test_a_third_agent_scales_the_job_up(cluster_factory):
    cluster = cluster_factory(final_world=6)
    cluster.start("a", "2:3")
    cluster.start("b", "2:3")
    first = cluster.wait_for_world(4)
    assert_all_reduced(first, 4)
    cluster.start("c", "2:3")
    final = cluster.wait_for_world(6)
    assert_all_reduced(final, 6)
    assert sorted(w["agent"] for w in final) == ["a", "a", "b", "b", "c", "c"], final
    codes = cluster.finish(["a", "b", "c"])
    assert codes == {"a": 0, "b": 0, "c": 0}, cluster.output()[-6000:]


def test_rdzv_conf_timeout_is_honoured(cluster_factory):
    # One agent of two: the round never completes, and `timeout=3` ends the wait (torchrun's
    # default would be 900 s).
    cluster = cluster_factory(final_world=4, conf="timeout=3,last_call_timeout=1")
    started = time.monotonic()
    cluster.start("a", "2")
    codes = cluster.finish(["a"], timeout=60)
    elapsed = time.monotonic() - started
    assert codes["a"] != 0
    assert "RendezvousTimeoutError" in cluster.output(), cluster.output()[-6000:]
    assert 3 <= elapsed < 60, elapsed


def test_rdzv_conf_unknown_key_is_rejected(cluster_factory):
    cluster = cluster_factory(final_world=4, conf="timeuot=3")
    cluster.start("a", "2")
    codes = cluster.finish(["a"], timeout=60)
    assert codes["a"] != 0
    out = cluster.output()
    assert "timeuot" in out and "did you mean 'timeout'" in out, out[-6000:]

"""Failure recovery under torchrun: rdzv's `etcd-v3` backend against torchrun's own `c10d`.

Three agents (`--nnodes 2:3`, `--max-restarts 3`) run a training loop (gloo all-reduce every
50 ms). Once the world of three nodes runs, one agent (not the first, which hosts c10d's
store) is taken away, and the time until the two survivors' workers run again, in a world of
two nodes, is measured. Two ways of losing the node:

- ``agent``: the agent alone is SIGKILLed (its workers, in sessions of their own, keep
  running and keep the all-reduce going);
- ``crash``: the agent and its workers are SIGKILLed (a process crash: the kernel closes
  their sockets, so the survivors' all-reduce fails at once and their agents restart);
- ``vanish``: the agent and its workers are SIGSTOPped (a machine that powered off or fell
  off the network: nothing closes the sockets, the survivors' all-reduce just blocks, and
  only a lease or heartbeat expiry can tell; they are SIGKILLed at the end).

Phases, from the SIGKILL (or SIGSTOP; each line is timestamped when the agent prints it): ``noticed``
(the first survivor agent logs that it restarts its workers), ``rendezvous`` (the last
survivor logs its new round), ``running`` (the last survivor worker finished its first
all-reduce in the new world). Medians over ``--runs``; a run that does not recover within
``--cap`` seconds counts as the cap (shown as ``>cap``).

    .venv/bin/python python/bench/recovery.py --runs 5

Needs torch and the rdzv package in the interpreter that runs it (``./scripts/install-deps.sh
--python`` makes such a ``.venv``), and etcd for rdzv (found as rdzv's EtcdServer finds it).
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    t = torch.ones(1)
    dist.all_reduce(t)
    # One write (workers run with `python -u`, where print() writes the newline separately).
    sys.stdout.write(f"BENCH-RUNNING world={world} rank={dist.get_rank()}\\n")
    while True:  # training steps, until the agent stops this worker
        time.sleep(0.05)
        dist.all_reduce(t)
    """
)

NOTICED = re.compile(r"will restart worker group")
RENDEZVOUS = re.compile(r"Rendezvous complete for workers")
RUNNING = re.compile(r"BENCH-RUNNING world=(\d+)")


def children(pid):
    """The processes whose parent is pid (torchrun starts each worker in a session of its own,
    so the agent's process group does not hold them)."""
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


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_listening(endpoint, timeout):
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {endpoint} after {timeout}s")
            time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agents:
    """The agents of one run; their output lines, stamped with time.monotonic() on arrival."""

    def __init__(self):
        self.procs = []
        self.workers = []  # worker pids to kill at the end
        self.lines = []  # (time, agent index, line)
        self.cond = threading.Condition()

    def start(self, cmd, env):
        index = len(self.procs)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.procs.append(proc)
        threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index, proc):
        for line in proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), index, line.rstrip("\n")))
                self.cond.notify_all()

    def matching(self, pattern, agents, since=0.0, world=None):
        """(time, agent, line) of the lines matching pattern, of agents, after since."""
        found = []
        for t, index, line in self.lines:
            if t < since or index not in agents:
                continue
            for m in pattern.finditer(line):
                if world is None or int(m.group(1)) == world:
                    found.append((t, index, line))
        return found

    def wait(self, predicate, timeout):
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def stop(self):
        self.workers.extend(w for proc in self.procs for w in children(proc.pid))
        signal_all(self.workers, signal.SIGKILL)
        signal_all([proc.pid for proc in self.procs], signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=60)


def one_run(backend, endpoint, how, args, script):
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    nproc = args.nproc_per_node
    if backend == "etcd-v3":
        conf = f"last_call_timeout={args.last_call_timeout},keep_alive_ttl={args.ttl}"
    else:
        # c10d's heartbeat: a node is dead after keep_alive_interval * keep_alive_max_attempt,
        # the same window as rdzv's lease TTL.
        conf = (f"last_call_timeout={args.last_call_timeout},keep_alive_interval=1,"
                f"keep_alive_max_attempt={args.ttl}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
        "--rdzv-conf", conf, "--nnodes", "2:3", "--nproc-per-node", str(nproc),
        "--max-restarts", "3", "--monitor-interval", str(args.monitor_interval),
        script,
    ]
    # LOGLEVEL=INFO: torchrun's agent logs its restarts and rounds (the phases measured).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOGLEVEL="INFO")
    agents = Agents()
    try:
        agents.start(cmd, env)
        if backend == "c10d":
            # The first agent hosts c10d's TCPStore: it must listen before the others start
            # (or one of them would host it).
            wait_listening(endpoint, args.start_timeout)
        agents.start(cmd, env)
        agents.start(cmd, env)
        full = 3 * nproc
        if not agents.wait(lambda: len(agents.matching(RUNNING, {0, 1, 2}, world=full)) >= full,
                           args.start_timeout):
            tail = "\n".join(line for _, _, line in agents.lines[-40:])
            raise RuntimeError(f"{backend}: the world of 3 nodes did not start within "
                               f"{args.start_timeout}s:\n{tail}")
        victim = agents.procs[2]
        victim_workers = children(victim.pid)
        agents.workers.extend(victim_workers)
        if how == "vanish":
            signal_all(victim_workers, signal.SIGSTOP)
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP if how == "vanish" else signal.SIGKILL)
        if how == "crash":
            signal_all(victim_workers, signal.SIGKILL)
        survivors = {0, 1}
        small = 2 * nproc
        recovered = agents.wait(
            lambda: len(agents.matching(RUNNING, survivors, killed, small)) >= small, args.cap)
        noticed = agents.matching(NOTICED, survivors, killed)
        rounds = agents.matching(RENDEZVOUS, survivors, killed)
        running = agents.matching(RUNNING, survivors, killed, small)

        def phase(found, last):
            if not found:
                return None
            if last:
                by_agent = {}
                for t, index, _ in found:
                    by_agent.setdefault(index, t)
                if len(by_agent) < len(survivors):
                    return None
                return max(by_agent.values()) - killed
            return found[0][0] - killed

        if args.verbose:
            for t, index, line in agents.lines:
                if index in survivors and t >= killed - 1:
                    print(f"  {t - killed:+7.2f} [{index}] {line}")
        return {
            "noticed": phase(noticed, last=False),
            "rendezvous": phase(rounds, last=True),
            "running": max(t for t, _, _ in running) - killed if recovered else None,
        }
    finally:
        agents.stop()


def fmt(values, cap):
    done = [v for v in values if v is not None]
    if not done:
        return f">{cap:.0f} s"
    med = statistics.median(v if v is not None else cap for v in values)
    text = f"{med:.1f} s"
    if len(done) < len(values):
        text = f"{text} ({len(values) - len(done)} of {len(values)} >{cap:.0f} s)"
        if med >= cap:
            text = f">{cap:.0f} s"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="etcd-v3,c10d")
    parser.add_argument("--how", default="crash,vanish",
                        help="how the node is lost: crash, vanish, agent (comma-separated)")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--ttl", type=int, default=3,
                        help="rdzv's keep_alive_ttl; c10d's heartbeat window (1 s x this)")
    parser.add_argument("--last-call-timeout", type=int, default=1)
    parser.add_argument("--monitor-interval", type=float, default=0.1)
    parser.add_argument("--cap", type=float, default=60.0,
                        help="seconds after which a run counts as not recovered")
    parser.add_argument("--verbose", action="store_true",
                        help="print the survivors' output around the SIGKILL")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args()

    from rdzv import EtcdServer

    results = {}
    with tempfile.TemporaryDirectory() as tmp, EtcdServer() as etcd:
        script = os.path.join(tmp, "train.py")
        with open(script, "w") as f:
            f.write(WORKER)
        for how in args.how.split(","):
            for backend in args.backends.split(","):
                for i in range(args.runs):
                    endpoint = (etcd.get_endpoint() if backend == "etcd-v3"
                                else f"127.0.0.1:{free_port()}")
                    r = one_run(backend, endpoint, how, args, script)
                    print(f"{how} {backend} run {i + 1}: "
                          + ", ".join(f"{k} {'-' if v is None else f'{v:.2f} s'}"
                                      for k, v in r.items()), flush=True)
                    results.setdefault((how, backend), []).append(r)

    print()
    print(f"{args.runs} runs each; nproc-per-node {args.nproc_per_node}, last_call_timeout "
          f"{args.last_call_timeout} s, lease TTL / heartbeat window {args.ttl} s, "
          f"monitor-interval {args.monitor_interval} s; medians, from the SIGKILL")
    print()
    print("| node lost | backend | survivors notice | new round | workers running |")
    print("|---|---|---:|---:|---:|")
    for (how, backend), runs in results.items():
        cells = [fmt([r[k] for r in runs], args.cap) for k in ("noticed", "rendezvous", "running")]
        print(f"| {how} | {backend} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch's legacy etcd rendezvous versus `rdzv bench`, on the same etcd and job sizes.

For each job size N, N participants (threads, spread over a few worker processes) run one
round of PyTorch's ``torch.distributed.elastic.rendezvous.etcd_rendezvous`` (min = max = N),
which speaks etcd's v2 API. Every HTTP request the participants send to etcd is counted by
wrapping ``etcd.Client.api_execute`` / ``api_execute_json`` (python-etcd); failed
compare-and-swap / create attempts are counted as conflicts. Then ``rdzv bench --json`` runs
the same job sizes against the same etcd (v3 API), and both are printed side by side.

Usage::

    cargo build --release -p rdzv-cli
    python3 benches/pytorch_baseline.py --nodes 2,8,32,128

Without ``--endpoint`` the script starts its own etcd with ``rdzv etcd -- --enable-v2``
(etcd 3.4 serves the v2 API only with that flag; etcd 3.5 needs more, 3.6 has no v2 API).
If torch or python-etcd is missing, it says how to install them and prints rdzv's numbers
alone (exit status 0).

What is compared: ``wall_s`` is from the first participant's call to the moment all have a
rank; ``requests`` are requests the participants sent during the round (for PyTorch every
HTTP request, long-poll watches included; for rdzv unary requests plus watch creations).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

INSTALL_HINT = "pip install torch python-etcd"


def find_rdzv(explicit):
    """The rdzv binary: --rdzv, $RDZV_BIN, the release build of this repo, or rdzv on PATH."""
    candidates = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("RDZV_BIN"):
        candidates.append(os.environ["RDZV_BIN"])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(repo, "target")
    candidates.append(os.path.join(target, "release", "rdzv"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    on_path = shutil.which("rdzv")
    if on_path:
        return on_path
    sys.exit(
        "pytorch_baseline: no rdzv binary found; build it with "
        "`cargo build --release -p rdzv-cli`, or pass --rdzv PATH (or set RDZV_BIN)"
    )


class LocalEtcd:
    """`rdzv etcd -- --enable-v2`: a throw-away etcd serving both the v2 and v3 APIs."""

    def __init__(self, rdzv):
        self.proc = subprocess.Popen(
            [rdzv, "etcd", "--", "--enable-v2"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint:
            self.stop()
            sys.exit("pytorch_baseline: `rdzv etcd -- --enable-v2` did not print an endpoint")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def percentile(sorted_values, p):
    """Nearest-rank percentile, as rdzv bench computes it."""
    if not sorted_values:
        return float("nan")
    rank = -(-p * len(sorted_values) // 100)  # ceil
    rank = min(max(int(rank), 1), len(sorted_values))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------------------------
# PyTorch side


def torch_missing():
    """A message if torch's etcd rendezvous or python-etcd cannot be imported, else None."""
    missing = []
    try:
        import etcd  # noqa: F401
    except ImportError:
        missing.append("python-etcd")
    try:
        import torch.distributed.elastic.rendezvous.etcd_rendezvous  # noqa: F401
    except ImportError as e:
        if "etcd" not in str(e) or "python-etcd" not in missing:
            missing.append(f"torch ({e})")
    if missing:
        return ", ".join(missing)
    return None


class RequestCounter:
    """Counts the requests python-etcd sends, per process (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.waits = 0
        self.conflicts = 0

    def install(self):
        import etcd

        counter = self

        def wrap(original):
            def counted(client, path, method, params=None, timeout=None, **kwargs):
                is_wait = bool(params) and str(params.get("wait", "")).lower() == "true"
                with counter.lock:
                    counter.requests += 1
                    counter.waits += is_wait
                try:
                    return original(client, path, method, params, timeout, **kwargs)
                except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist):
                    with counter.lock:
                        counter.conflicts += 1
                    raise

            return counted

        etcd.Client.api_execute = wrap(etcd.Client.api_execute)
        etcd.Client.api_execute_json = wrap(etcd.Client.api_execute_json)

    def snapshot(self):
        with self.lock:
            return {"requests": self.requests, "waits": self.waits, "conflicts": self.conflicts}


def _quiet_torch_logs():
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _worker(endpoint, run_id, n, count, timeout, ready, go, out):
    """A worker process: `count` participants as threads. Sends its results to `out`."""
    try:
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous.etcd_rendezvous import create_rdzv_handler

        _quiet_torch_logs()
        counter = RequestCounter()
        counter.install()

        def make(_):
            params = RendezvousParameters(
                backend="etcd",
                endpoint=endpoint,
                run_id=run_id,
                min_nodes=n,
                max_nodes=n,
                timeout=timeout,
                last_call_timeout=0,
            )
            return create_rdzv_handler(params)

        with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
            handlers = list(pool.map(make, range(count)))
        _quiet_torch_logs()
        results = [None] * count

        def participant(i):
            go.wait()
            start = time.monotonic()
            try:
                res = handlers[i].next_rendezvous()
                if isinstance(res, tuple):  # torch < 2.4: (store, rank, world_size)
                    rank, world = res[1], res[2]
                else:  # RendezvousInfo
                    rank, world = res.rank, res.world_size
                results[i] = (start, time.monotonic(), rank, world, None)
            except BaseException as e:  # noqa: BLE001 - reported, not swallowed
                results[i] = (start, time.monotonic(), None, None, repr(e))

        threads = [threading.Thread(target=participant, args=(i,), daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        before = counter.snapshot()
        ready.wait()  # every process has its participants waiting
        for t in threads:
            t.join(timeout + 30)
        after = counter.snapshot()
        for h in handlers:  # stop the TTL refresher threads
            impl = getattr(h, "_rdzv_impl", None)
            for attr in ("_lease_run_id_stop", "_lease_this_rank_stop"):
                ev = getattr(impl, attr, None)
                if ev is not None:
                    ev.set()
        used = {k: after[k] - before[k] for k in after}
        out.put({"results": results, "used": used, "error": None})
    except BaseException as e:  # noqa: BLE001
        try:
            ready.abort()
        except Exception:  # noqa: BLE001
            pass
        out.put({"results": [], "used": {}, "error": repr(e)})


def torch_round(endpoint, n, procs, timeout):
    """One round of PyTorch's etcd rendezvous with n participants; a dict of numbers."""
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, n))
    run_id = f"torch-baseline-{uuid.uuid4().hex[:8]}-n{n}"
    ready = ctx.Barrier(procs + 1)
    go = ctx.Event()
    out = ctx.Queue()
    counts = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    workers = [
        ctx.Process(target=_worker, args=(endpoint, run_id, n, c, timeout, ready, go, out), daemon=True)
        for c in counts
    ]
    for w in workers:
        w.start()
    # A worker reaches the barrier once its handlers exist and its participants wait for `go`.
    try:
        ready.wait(timeout=timeout)
        go.set()
    except threading.BrokenBarrierError:
        pass  # a worker failed: its report says why
    reports = []
    for _ in workers:
        try:
            reports.append(out.get(timeout=timeout + 60))
        except Exception:  # noqa: BLE001
            reports.append({"results": [], "used": {}, "error": "worker did not report in time"})
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
    errors = [r["error"] for r in reports if r["error"]]
    results = [x for r in reports for x in r["results"] if x is not None]
    errors += [x[4] for x in results if x[4]]
    if errors or len(results) != n:
        return {"nodes": n, "error": (errors or [f"{len(results)} of {n} participants reported"])[0]}
    ranks = sorted(x[2] for x in results)
    worlds = {x[3] for x in results}
    if ranks != list(range(n)) or worlds != {n}:
        return {"nodes": n, "error": f"bad ranks {ranks[:8]}... or world sizes {worlds}"}
    first = min(x[0] for x in results)
    last_start = max(x[0] for x in results)
    last_end = max(x[1] for x in results)
    lat = sorted(x[1] - x[0] for x in results)
    used = {k: sum(r["used"].get(k, 0) for r in reports) for k in ("requests", "waits", "conflicts")}
    return {
        "nodes": n,
        "wall_s": last_end - first,
        "last_join_to_ranked_s": last_end - last_start,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "requests": used["requests"],
        "requests_per_node": used["requests"] / n,
        "waits": used["waits"],
        "conflicts": used["conflicts"],
        "processes": procs,
    }


# --------------------------------------------------------------------------------------------
# rdzv side


def rdzv_rounds(rdzv, endpoint, nodes, runs, extra):
    """`rdzv bench --json` for the job sizes; {N: line}."""
    cmd = [rdzv, "bench", "--json", "--nodes", ",".join(map(str, nodes)), "--runs", str(runs)]
    if endpoint:
        cmd += ["--rdzv-endpoint", endpoint]
    cmd += extra
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = {}
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        lines[obj.get("nodes")] = obj
    if proc.returncode != 0 and not lines:
        sys.exit(f"pytorch_baseline: `{' '.join(cmd)}` failed:\n{proc.stderr}")
    return lines


# --------------------------------------------------------------------------------------------
# Output


def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "nan"
    return format(v, spec)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def print_table(nodes, torch_lines, rdzv_lines):
    have_torch = torch_lines is not None
    head = f"{'nodes':>6} |"
    if have_torch:
        head += f" {'torch wall_s':>12} {'req':>8} {'req/node':>9} {'conflicts':>9} |"
    head += f" {'rdzv wall_s':>11} {'req':>7} {'req/node':>8} {'watch_ev':>8}"
    if have_torch:
        head += f" | {'wall ×':>7} {'req ×':>7}"
    print(head)
    print("-" * len(head))
    for n in nodes:
        r = rdzv_lines.get(n, {})
        row = f"{n:>6} |"
        if have_torch:
            t = torch_lines.get(n, {})
            if t.get("error"):
                row += f" error: {t['error'][:60]:<41} |"
            else:
                row += (
                    f" {fmt(t.get('wall_s'), '12.3f')} {fmt(t.get('requests'), '8d')}"
                    f" {fmt(t.get('requests_per_node'), '9.2f')} {fmt(t.get('conflicts'), '9d')} |"
                )
        if r.get("error"):
            row += f" error: {r['error'][:60]}"
        else:
            row += (
                f" {fmt(r.get('wall_s'), '11.3f')} {fmt(r.get('requests'), '7d')}"
                f" {fmt(r.get('requests_per_node'), '8.2f')} {fmt(r.get('watch_events'), '8d')}"
            )
        if have_torch:
            t = torch_lines.get(n, {})
            row += (
                f" | {fmt(ratio(t.get('wall_s'), r.get('wall_s')), '7.1f')}"
                f" {fmt(ratio(t.get('requests'), r.get('requests')), '7.1f')}"
            )
        print(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,8,32,128", help="job sizes, comma-separated")
    ap.add_argument("--endpoint", help="etcd host:port serving the v2 API (default: start one)")
    ap.add_argument("--rdzv", help="the rdzv binary (default: $RDZV_BIN, target/release/rdzv, PATH)")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2,
                    help="worker processes for PyTorch's participants (threads within)")
    ap.add_argument("--timeout", type=int, default=300, help="bound on one round, seconds")
    ap.add_argument("--runs", type=int, default=1, help="rdzv bench --runs")
    ap.add_argument("--json", action="store_true", help="one JSON object per job size")
    ap.add_argument("--rdzv-arg", action="append", default=[],
                    help="extra argument for rdzv bench (repeatable)")
    args = ap.parse_args()
    nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    rdzv = find_rdzv(args.rdzv)

    missing = torch_missing()
    etcd_proc = None
    try:
        endpoint = args.endpoint
        if missing:
            print(
                f"pytorch_baseline: the PyTorch side is skipped: {missing} missing. "
                f"Install with `{INSTALL_HINT}` (and give etcd --enable-v2). "
                "rdzv's numbers alone:",
                file=sys.stderr if args.json else sys.stdout,
                flush=True,
            )
            torch_lines = None
        else:
            if not endpoint:
                etcd_proc = LocalEtcd(rdzv)
                endpoint = etcd_proc.endpoint
            torch_lines = {}
            for n in nodes:
                print(f"pytorch_baseline: PyTorch etcd rendezvous, {n} nodes ...", file=sys.stderr)
                torch_lines[n] = torch_round(endpoint, n, args.procs, args.timeout)
        print(f"pytorch_baseline: rdzv bench, nodes {args.nodes} ...", file=sys.stderr)
        rdzv_lines = rdzv_rounds(rdzv, endpoint, nodes, args.runs, args.rdzv_arg)
    finally:
        if etcd_proc is not None:
            etcd_proc.stop()

    if args.json:
        for n in nodes:
            line = {"nodes": n, "rdzv": rdzv_lines.get(n)}
            if torch_lines is not None:
                t, r = torch_lines.get(n, {}), rdzv_lines.get(n, {})
                line["torch"] = t
                line["wall_ratio"] = ratio(t.get("wall_s"), r.get("wall_s"))
                line["requests_ratio"] = ratio(t.get("requests"), r.get("requests"))
            print(json.dumps(line))
    else:
        print_table(nodes, torch_lines, rdzv_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

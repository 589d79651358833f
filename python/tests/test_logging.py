"""The Rust library's log events reach Python's `logging` (logger `rdzv`); RDZV_LOG filters.

Each case runs in a fresh interpreter: the forwarding is installed once per process, and the
library warns about a key once per process.
"""

import os
import subprocess
import sys
import textwrap

DEADLINE = 60  # seconds for the whole script

SCRIPT = textwrap.dedent(
    """
    import logging, sys, threading, uuid
    import rdzv

    records, warned = [], threading.Event()

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.name, record.getMessage()))
            if "'heartbeat'" in record.getMessage():
                warned.set()

    logger = logging.getLogger("rdzv")
    logger.addHandler(Collect())
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    endpoint, run = sys.argv[1], str(uuid.uuid4())
    params = rdzv.RendezvousParameters("etcd-v3", endpoint, run, 1, 1, last_call_timeout="0")
    rdzv.create_rdzv_handler(params).next_rendezvous()
    # A key of PyTorch's c10d backend: accepted with a warning. Records are forwarded in order,
    # so once the warning is here, every earlier event is too.
    params = rdzv.RendezvousParameters("etcd-v3", endpoint, run + "-2", 1, 1, heartbeat="5")
    rdzv.create_rdzv_handler(params)
    if not warned.wait(30):
        sys.exit(f"the warning did not arrive within 30 s; records: {records}")
    for level, name, message in records:
        print(level, name, message)
    """
)


def run_script(etcd, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "RDZV_LOG"}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, etcd.get_endpoint()],
        capture_output=True, text=True, timeout=DEADLINE, env=full_env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_a_library_warning_reaches_the_rdzv_logger(etcd):
    lines = run_script(etcd)
    warnings = [line for line in lines if line.startswith("WARNING rdzv ")]
    assert len(warnings) == 1, lines
    assert "rendezvous configuration key 'heartbeat': ignored" in warnings[0], warnings
    assert "[rdzv::etcd::conf_keys]" in warnings[0], warnings  # the Rust target
    # Debug events are not passed on unless RDZV_LOG asks for them.
    assert not [line for line in lines if line.startswith("DEBUG")], lines


def test_rdzv_log_debug_passes_debug_events_on(etcd):
    lines = run_script(etcd, RDZV_LOG="debug")
    assert any(line.startswith("DEBUG rdzv joined round") for line in lines), lines
    assert any("'heartbeat'" in line for line in lines), lines

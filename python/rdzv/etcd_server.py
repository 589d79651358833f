"""A throw-away local etcd, as PyTorch's ``torch.distributed.elastic.rendezvous.etcd_server``."""

from typing import Any, Optional, TextIO

from rdzv import _rdzv


class EtcdServer:
    """A local etcd on free loopback ports, with a temporary data directory.

    The etcd binary is found as rdzv's Rust helper finds it: ``RDZV_ETCD_BINARY``, else
    ``etcd`` on ``PATH``. etcd's output goes to a log file in its temporary directory; a start
    failure's ``RuntimeError`` quotes the log. Usable as a context manager.
    """

    def __init__(self, data_dir: Optional[str] = None) -> None:
        self._data_dir = data_dir
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
        attempts = max(1, num_retries)
        for attempt in range(attempts):
            try:
                self._core = _rdzv.EtcdServerCore.start(float(timeout), self._data_dir)
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

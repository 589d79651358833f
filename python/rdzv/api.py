"""PyTorch's rendezvous API (parameters, handler, round info) on rdzv's etcd backend."""

from typing import Any, Dict, Optional

from rdzv import _rdzv

#: The backend names :func:`create_rdzv_handler` accepts. Both are rdzv's etcd v3 rendezvous;
#: ``etcd`` is PyTorch's name (so that PyTorch's tests run unchanged), ``etcd-v3`` the name
#: under which rdzv registers with torchrun.
BACKENDS = ("etcd", "etcd-v3")


class RendezvousParameters:
    """The parameters of a rendezvous, as PyTorch's ``RendezvousParameters``.

    Args:
        backend: the backend name (``etcd`` or ``etcd-v3`` for :func:`create_rdzv_handler`).
        endpoint: etcd's ``host:port`` (or several, comma-separated).
        run_id: the job's id.
        min_nodes: the minimum number of nodes of a round (at least 1).
        max_nodes: the maximum number of nodes of a round (at least ``min_nodes``).
        local_addr: the address this node advertises, if set.
        **kwargs: backend configuration (``timeout``, ``last_call_timeout``, ``protocol``, ...).

    Raises:
        ValueError: for an empty backend or invalid node counts, with PyTorch's messages.
    """

    def __init__(
        self,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if not backend:
            raise ValueError("The rendezvous backend name must be a non-empty string.")
        if min_nodes < 1:
            raise ValueError(
                f"The minimum number of rendezvous nodes ({min_nodes}) must be greater than zero."
            )
        if max_nodes < min_nodes:
            raise ValueError(
                f"The maximum number of rendezvous nodes ({max_nodes}) must be greater than or "
                f"equal to the minimum number of rendezvous nodes ({min_nodes})."
            )
        self.backend = backend
        self.endpoint = endpoint
        self.run_id = run_id
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.config: Dict[str, Any] = kwargs
        self.local_addr = local_addr

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self.config.get(key, default)

    def get_as_bool(self, key: str, default: Optional[bool] = None) -> Optional[bool]:
        """The value of ``key`` as a bool (``1/true/t/yes/y``, ``0/false/f/no/n`` in any case,
        the ints 1 and 0, or a bool); ``ValueError`` for anything else."""
        value = self.get(key, default)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value in (0, 1):
                return value == 1
        elif isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "t", "yes", "y"):
                return True
            if lowered in ("0", "false", "f", "no", "n"):
                return False
        raise ValueError(
            f"The rendezvous configuration option '{key}' does not represent a valid boolean value."
        )

    def get_as_int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        """The value of ``key`` as an int; ``ValueError`` if it is not one."""
        value = self.get(key, default)
        if value is None:
            return value
        try:
            return int(value)
        except ValueError as e:
            raise ValueError(
                f"The rendezvous configuration option '{key}' does not represent a valid integer "
                "value."
            ) from e

    def __repr__(self) -> str:
        return (
            f"RendezvousParameters(backend={self.backend!r}, endpoint={self.endpoint!r}, "
            f"run_id={self.run_id!r}, min_nodes={self.min_nodes}, max_nodes={self.max_nodes}, "
            f"local_addr={self.local_addr!r}, config keys={sorted(self.config)})"
        )


def config_strings(config: Dict[str, Any]) -> Dict[str, str]:
    """The configuration as the Rust library reads it: ``key -> str(value)``, ``None`` dropped."""
    return {str(k): str(v) for k, v in config.items() if v is not None}


class RendezvousStoreInfo:
    """Where the workers' rank 0 listens (``MASTER_ADDR``/``MASTER_PORT``), as PyTorch's."""

    MASTER_ADDR_KEY = "MASTER_ADDR"
    MASTER_PORT_KEY = "MASTER_PORT"

    def __init__(self, master_addr: str, master_port: int) -> None:
        self.master_addr = master_addr
        self.master_port = master_port

    def __repr__(self) -> str:
        return f"RendezvousStoreInfo(master_addr={self.master_addr!r}, master_port={self.master_port})"


class RendezvousInfo:
    """The outcome of a round for this node, as PyTorch's ``RendezvousInfo`` (plus ``round``)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        bootstrap_store_info: RendezvousStoreInfo,
        round: int = 0,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.bootstrap_store_info = bootstrap_store_info
        self.round = round

    def __repr__(self) -> str:
        return (
            f"RendezvousInfo(rank={self.rank}, world_size={self.world_size}, round={self.round}, "
            f"bootstrap_store_info={self.bootstrap_store_info!r})"
        )


class EtcdRendezvousHandler:
    """rdzv's etcd v3 rendezvous with PyTorch's ``RendezvousHandler`` methods.

    Every blocking method releases the GIL; the node's lease is kept alive by rdzv's own
    threads, whatever the interpreter does. Errors are :class:`rdzv.RendezvousError`
    subclasses named as PyTorch's.
    """

    def __init__(self, core: "_rdzv.Handler") -> None:
        self._core = core

    @property
    def use_agent_store(self) -> bool:
        """False: the round's store lives in etcd and is not shared with the workers."""
        return False

    def get_backend(self) -> str:
        """The backend name the handler was created with."""
        return self._core.get_backend()

    def get_run_id(self) -> str:
        """The run id."""
        return self._core.get_run_id()

    def next_rendezvous(self) -> RendezvousInfo:
        """Joins the next round and blocks until it completes (or fails: closed, timeout,
        connection)."""
        info = self._core.next_rendezvous()
        return RendezvousInfo(
            info.store,
            info.rank,
            info.world_size,
            RendezvousStoreInfo(info.master_addr, info.master_port),
            info.round,
        )

    def is_closed(self) -> bool:
        """True if the run is closed."""
        return self._core.is_closed()

    def set_closed(self) -> None:
        """Closes the run: every node's pending and later ``next_rendezvous()`` fails."""
        self._core.set_closed()

    def num_nodes_waiting(self) -> int:
        """Nodes waiting for the next round; at least 1 once a peer of this node's round was
        lost or left (so a launcher polling it re-rendezvous promptly)."""
        return self._core.num_nodes_waiting()

    def shutdown(self) -> bool:
        """Leaves the rendezvous (the run stays open for the others)."""
        return self._core.shutdown()

    def node_id(self) -> str:
        """This node's id in the rendezvous."""
        return self._core.node_id()


def create_core_handler(params: Any) -> "_rdzv.Handler":
    """The Rust handler for ``params`` (rdzv's or PyTorch's ``RendezvousParameters``)."""
    if params.backend not in BACKENDS:
        raise ValueError(
            f"The rendezvous backend '{params.backend}' is not supported by rdzv "
            f"(supported: {', '.join(BACKENDS)})."
        )
    return _rdzv.create_handler(
        params.backend,
        params.endpoint,
        params.run_id,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        config_strings(params.config),
    )


def create_rdzv_handler(params: RendezvousParameters) -> EtcdRendezvousHandler:
    """Creates a handler for ``params`` (backend ``etcd`` or ``etcd-v3``), connecting to etcd.

    Raises:
        ValueError: for another backend or invalid configuration.
        RendezvousConnectionError: if etcd cannot be reached.
    """
    return EtcdRendezvousHandler(create_core_handler(params))

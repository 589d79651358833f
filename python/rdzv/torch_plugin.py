"""torchrun backend ``etcd-v3``: ``torchrun --rdzv-backend etcd-v3 --rdzv-endpoint HOST:PORT ...``.

torchrun finds it through the ``torchrun.handlers`` entry point (see pyproject.toml), calls
:func:`handler_creator` and registers what it returns as the creator of ``etcd-v3`` handlers.
This is the only module of ``rdzv`` that imports torch.

The handler is PyTorch's ``RendezvousHandler`` on rdzv's etcd v3 rendezvous. Its store is a
``torch.distributed.Store`` (so PyTorch's ``PrefixStore`` and the agent's store utilities work
over it) on etcd. A lost or departed peer makes ``num_nodes_waiting()`` positive, which makes
torchrun's agent restart its workers in a new round at its next poll, instead of waiting for a
collective to time out.
"""

import functools
from datetime import timedelta
from typing import Any, Callable, List, Optional, TypeVar

import torch.distributed as dist
from torch.distributed.elastic import rendezvous as torch_rdzv
from torch.distributed.elastic.rendezvous.api import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from rdzv import _rdzv
from rdzv.api import create_core_handler

T = TypeVar("T")

#: rdzv's exception classes and PyTorch's of the same name.
_TORCH_ERRORS = {
    _rdzv.RendezvousClosedError: torch_rdzv.RendezvousClosedError,
    _rdzv.RendezvousTimeoutError: torch_rdzv.RendezvousTimeoutError,
    _rdzv.RendezvousConnectionError: torch_rdzv.RendezvousConnectionError,
    _rdzv.RendezvousStateError: torch_rdzv.RendezvousStateError,
    _rdzv.RendezvousGracefulExitError: torch_rdzv.RendezvousGracefulExitError,
    _rdzv.RendezvousError: torch_rdzv.RendezvousError,
}

#: Default timeout of the store's blocking operations (rdzv's ``store_timeout`` default).
DEFAULT_STORE_TIMEOUT = timedelta(seconds=300)


def _torch_error(e: Exception) -> Exception:
    for rdzv_class, torch_class in _TORCH_ERRORS.items():
        if type(e) is rdzv_class:
            return torch_class(str(e))
    return e


def _translated(fn: Callable[..., T]) -> Callable[..., T]:
    """Re-raises rdzv's rendezvous errors as PyTorch's classes of the same name."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except _rdzv.RendezvousError as e:
            raise _torch_error(e) from e

    return wrapper


def _store_op(fn: Callable[..., T]) -> Callable[..., T]:
    """Store errors become ``torch.distributed.DistStoreError`` (as TCPStore's timeouts)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except _rdzv.RendezvousError as e:
            raise dist.DistStoreError(str(e)) from e

    return wrapper


def _seconds(timeout: Optional[timedelta], default: timedelta) -> float:
    return (timeout if timeout is not None else default).total_seconds()


class EtcdStore(dist.Store):
    """A ``torch.distributed.Store`` on a round's etcd store.

    ``get`` and ``wait`` block up to the store's ``timeout`` (``set_timeout``) and raise
    ``torch.distributed.DistStoreError`` after it. The C++ names ``deleteKey`` and
    ``getNumKeys`` are defined too: C++ wrappers such as ``PrefixStore`` call those.
    """

    def __init__(self, core: "_rdzv.Store", timeout: timedelta = DEFAULT_STORE_TIMEOUT) -> None:
        super().__init__()
        self._core = core
        self.set_timeout(timeout)

    @_store_op
    def set(self, key: str, value: Any) -> None:
        self._core.set(key, value)

    @_store_op
    def get(self, key: str) -> bytes:
        return self._core.get(key, self.timeout.total_seconds())

    @_store_op
    def add(self, key: str, value: int) -> int:
        return self._core.add(key, value)

    @_store_op
    def compare_set(self, key: str, expected_value: Any, desired_value: Any) -> bytes:
        return self._core.compare_set(key, expected_value, desired_value)

    @_store_op
    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        self._core.wait(list(keys), _seconds(timeout, self.timeout))

    @_store_op
    def check(self, keys: List[str]) -> bool:
        return self._core.check(list(keys))

    @_store_op
    def delete_key(self, key: str) -> bool:
        return self._core.delete_key(key)

    @_store_op
    def num_keys(self) -> int:
        return self._core.num_keys()

    def deleteKey(self, key: str) -> bool:  # noqa: N802 (the C++ name)
        return self.delete_key(key)

    def getNumKeys(self) -> int:  # noqa: N802 (the C++ name)
        return self.num_keys()


class EtcdV3RendezvousHandler(RendezvousHandler):
    """PyTorch's ``RendezvousHandler`` on rdzv's etcd v3 rendezvous."""

    def __init__(self, core: "_rdzv.Handler", store_timeout: timedelta) -> None:
        self._core = core
        self._store_timeout = store_timeout

    def get_backend(self) -> str:
        return self._core.get_backend()

    def get_run_id(self) -> str:
        return self._core.get_run_id()

    @property
    def use_agent_store(self) -> bool:
        return False

    @_translated
    def next_rendezvous(self) -> RendezvousInfo:
        info = self._core.next_rendezvous()
        return RendezvousInfo(
            EtcdStore(info.store, self._store_timeout),
            info.rank,
            info.world_size,
            RendezvousStoreInfo(info.master_addr, info.master_port),
        )

    @_translated
    def is_closed(self) -> bool:
        return self._core.is_closed()

    @_translated
    def set_closed(self) -> None:
        self._core.set_closed()

    @_translated
    def num_nodes_waiting(self) -> int:
        return self._core.num_nodes_waiting()

    @_translated
    def shutdown(self) -> bool:
        return self._core.shutdown()


def _store_timeout(params: Any) -> timedelta:
    value = params.get("store_timeout")
    try:
        return timedelta(seconds=float(value)) if value is not None else DEFAULT_STORE_TIMEOUT
    except ValueError:
        # A humantime duration ("5m"): rdzv's Rust side reads it; PyTorch's side keeps the default.
        return DEFAULT_STORE_TIMEOUT


@_translated
def create_handler(params: Any) -> EtcdV3RendezvousHandler:
    """Creates an ``etcd-v3`` handler from torch's ``RendezvousParameters``."""
    return EtcdV3RendezvousHandler(create_core_handler(params), _store_timeout(params))


def handler_creator() -> Callable[[Any], EtcdV3RendezvousHandler]:
    """The ``torchrun.handlers`` entry point: returns the handler creator."""
    return create_handler

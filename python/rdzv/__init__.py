"""rdzv: elastic rendezvous for distributed training over etcd v3.

PyTorch's rendezvous API (``torch.distributed.elastic.rendezvous``) backed by rdzv's Rust
library, without needing torch::

    from rdzv import RendezvousParameters, create_rdzv_handler, EtcdServer

and a torchrun backend: ``torchrun --rdzv-backend etcd-v3 ...`` (see ``rdzv.torch_plugin``,
which is the only module that imports torch).

The Rust library's log events go to Python's ``logging``, logger ``rdzv`` (warnings show on
stderr without any configuration, as Python's do); ``RDZV_LOG`` (e.g. ``debug``) decides which
events the library passes on at all (``info`` and above by default).
"""

import atexit as _atexit

from rdzv import _rdzv
from rdzv._rdzv import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    Store,
)
from rdzv.api import (
    BACKENDS,
    EtcdRendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    create_rdzv_handler,
)
from rdzv.etcd_server import EtcdServer

if _rdzv.install_logging():
    _atexit.register(_rdzv.stop_logging)

__all__ = [
    "BACKENDS",
    "EtcdRendezvousHandler",
    "EtcdServer",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousStateError",
    "RendezvousStoreInfo",
    "RendezvousTimeoutError",
    "Store",
    "create_rdzv_handler",
]

"""The torchrun plugin: torch's registry finds `etcd-v3`; the handler and its
torch.distributed.Store follow torch's semantics (PrefixStore over it, add from many processes,
wait with a timeout)."""

import multiprocessing as mp
import threading
import time
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch.distributed.elastic import rendezvous as torch_rdzv  # noqa: E402
from torch.distributed.elastic.rendezvous import registry  # noqa: E402

DEADLINE = 30.0


def torch_params(etcd, run_id, nodes=1, **config):
    config.setdefault("last_call_timeout", "0.5")
    config.setdefault("store_timeout", "10")  # a failing get fails fast
    return torch_rdzv.RendezvousParameters(
        "etcd-v3", etcd.get_endpoint(), run_id, nodes, nodes, **config
    )


def test_torch_registry_creates_an_etcd_v3_handler(etcd, run_id):
    # What torchrun does: out-of-tree handlers are registered from the entry points.
    registry._register_out_of_tree_handlers()
    handler = registry.get_rendezvous_handler(torch_params(etcd, run_id))
    assert isinstance(handler, torch_rdzv.RendezvousHandler)
    assert handler.get_backend() == "etcd-v3"
    info = handler.next_rendezvous()
    assert isinstance(info, torch_rdzv.RendezvousInfo)
    assert (info.rank, info.world_size) == (0, 1)
    assert isinstance(info.store, dist.Store)
    assert info.bootstrap_store_info.master_port > 0
    handler.shutdown()


def test_errors_are_torchs_classes(etcd, run_id):
    from rdzv.torch_plugin import create_handler

    handler = create_handler(torch_params(etcd, run_id))
    handler.set_closed()
    with pytest.raises(torch_rdzv.RendezvousClosedError):
        handler.next_rendezvous()


def round_store(etcd, run_id):
    from rdzv.torch_plugin import create_handler

    return create_handler(torch_params(etcd, run_id)).next_rendezvous().store


def test_store_through_prefix_store(etcd, run_id):
    store = round_store(etcd, run_id)
    prefixed = dist.PrefixStore("p", store)  # keys become "p/<key>"
    prefixed.set("a", "1")
    assert prefixed.get("a") == b"1"
    assert store.get("p/a") == b"1"
    assert prefixed.add("n", 3) == 3
    assert prefixed.add("n", 4) == 7
    assert prefixed.check(["a", "n"]) is True
    assert prefixed.compare_set("c", "", "x") == b"x"
    prefixed.wait(["a"])
    prefixed.wait(["a"], timedelta(seconds=1))
    assert prefixed.num_keys() >= 3
    assert prefixed.delete_key("a") is True
    assert store.check(["p/a"]) is False
    prefixed.multi_set(["m1", "m2"], ["x", "y"])
    assert prefixed.multi_get(["m1", "m2"]) == [b"x", b"y"]


def test_store_wait_and_get_time_out(etcd, run_id):
    store = round_store(etcd, run_id)
    store.set_timeout(timedelta(seconds=0.3))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        store.get("absent")
    with pytest.raises(dist.DistStoreError):
        dist.PrefixStore("p", store).wait(["absent"], timedelta(seconds=0.3))
    assert time.monotonic() - started < 5


def test_get_waits_for_a_later_set(etcd, run_id):
    store = round_store(etcd, run_id)
    got = []
    reader = threading.Thread(target=lambda: got.append(store.get("late")))
    reader.start()
    store.set("late", b"x")
    reader.join(DEADLINE)
    assert got == [b"x"]


def _add_from_process(endpoint, run_id, nodes, adds, out):
    from rdzv.torch_plugin import create_handler

    params = torch_rdzv.RendezvousParameters(
        "etcd-v3", endpoint, run_id, nodes, nodes, last_call_timeout="0.5"
    )
    handler = create_handler(params)
    info = handler.next_rendezvous()
    store = dist.PrefixStore("counter", info.store)
    results = [store.add("n", 1) for _ in range(adds)]
    # Everyone finished adding before anyone reads the total.
    store.set(f"done/{info.rank}", "1")
    store.wait([f"done/{r}" for r in range(nodes)])
    out.put((info.rank, results, store.add("n", 0)))
    handler.shutdown()


def test_add_from_many_processes(etcd, run_id):
    nodes, adds = 3, 20
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_add_from_process, args=(etcd.get_endpoint(), run_id, nodes, adds, out))
        for _ in range(nodes)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0
    assert sorted(r for r, _, _ in results) == list(range(nodes))
    seen = sorted(v for _, values, _ in results for v in values)
    # Every add returned a distinct value: no lost or doubled update.
    assert seen == list(range(1, nodes * adds + 1))
    assert {total for _, _, total in results} == {nodes * adds}

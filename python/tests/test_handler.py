"""The handler, the round's store and the errors, through rdzv's Python API (no torch)."""

import subprocess
import sys
import threading
import time

import pytest

import rdzv
from rdzv import RendezvousParameters, create_rdzv_handler

DEADLINE = 30.0  # seconds, for anything that should take well under one


def handler(etcd, run_id, nodes=1, **config):
    config.setdefault("last_call_timeout", "0.5")
    return create_rdzv_handler(
        RendezvousParameters("etcd-v3", etcd.get_endpoint(), run_id, nodes, nodes, **config)
    )


def rendezvous_all(handlers):
    """next_rendezvous() of every handler at once, each in a thread; returns the infos."""
    results, errors = [None] * len(handlers), []

    def join(i):
        try:
            results[i] = handlers[i].next_rendezvous()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(handlers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), f"a rendezvous took over {DEADLINE}s"
    assert not errors, errors
    return results


def test_import_does_not_import_torch():
    code = "import sys, rdzv; assert 'torch' not in sys.modules, 'rdzv imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_name_is_the_one_given(etcd, run_id):
    for backend in ("etcd", "etcd-v3"):
        p = RendezvousParameters(backend, etcd.get_endpoint(), run_id, 1, 1)
        h = create_rdzv_handler(p)
        assert h.get_backend() == backend
        assert h.get_run_id() == run_id
        assert h.use_agent_store is False
        h.shutdown()


def test_unknown_backend_is_a_value_error(etcd, run_id):
    p = RendezvousParameters("zookeeper", etcd.get_endpoint(), run_id, 1, 1)
    with pytest.raises(ValueError, match="'zookeeper' is not supported"):
        create_rdzv_handler(p)


def test_invalid_config_is_a_value_error(etcd, run_id):
    with pytest.raises(ValueError, match="timeout"):
        handler(etcd, run_id, timeout="soon")
    with pytest.raises(ValueError, match="protocol"):
        handler(etcd, run_id, protocol="gopher")


def test_unreachable_etcd_is_a_connection_error(run_id):
    p = RendezvousParameters("etcd", "127.0.0.1:1", run_id, 1, 1, connect_timeout="1s")
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousConnectionError) as caught:
        create_rdzv_handler(p)
    assert isinstance(caught.value, rdzv.RendezvousError)
    assert time.monotonic() - started < DEADLINE


def test_two_nodes_rendezvous_with_distinct_ranks_and_one_master(etcd, run_id):
    handlers = [handler(etcd, run_id, nodes=2) for _ in range(2)]
    infos = rendezvous_all(handlers)
    assert sorted(i.rank for i in infos) == [0, 1]
    assert {i.world_size for i in infos} == {2}
    assert infos[0].round == infos[1].round
    masters = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos}
    assert len(masters) == 1, masters
    (addr, port), = masters
    assert addr and 0 < port < 65536
    # All checked before any leaves: a peer's shutdown is a membership change for the other
    # (a positive num_nodes_waiting, by design); checking and leaving in one loop raced.
    assert [h.num_nodes_waiting() for h in handlers] == [0, 0]
    for h in handlers:
        assert h.shutdown() is True


def test_store_operations(etcd, run_id):
    info = handler(etcd, run_id).next_rendezvous()
    store = info.store
    store.set("k", b"v")
    assert store.get("k") == b"v"
    store.set("s", "text")
    assert store.get("s") == b"text"
    assert store.add("n", 2) == 2
    assert store.add("n", -5) == -3
    assert store.compare_set("cas", b"", b"first") == b"first"
    assert store.compare_set("cas", b"wrong", b"second") == b"first"
    assert store.compare_set("cas", b"first", b"second") == b"second"
    assert store.check(["k", "s"]) is True
    assert store.check(["k", "absent"]) is False
    store.wait(["k", "s"], 1.0)
    keys = store.num_keys()
    assert keys >= 4
    assert store.delete_key("k") is True
    assert store.delete_key("k") is False
    assert store.num_keys() == keys - 1
    with pytest.raises(TypeError):
        store.set("k", 3)


def test_store_waits_time_out(etcd, run_id):
    store = handler(etcd, run_id).next_rendezvous().store
    started = time.monotonic()
    with pytest.raises(rdzv.RendezvousTimeoutError, match="absent"):
        store.wait(["absent"], 0.3)
    with pytest.raises(rdzv.RendezvousTimeoutError, match="absent"):
        store.get("absent", timeout=0.3)
    assert time.monotonic() - started < 5


def test_get_waits_for_a_later_set(etcd, run_id):
    store = handler(etcd, run_id).next_rendezvous().store
    got = []
    reader = threading.Thread(target=lambda: got.append(store.get("late", timeout=DEADLINE)))
    reader.start()
    store.set("late", b"x")
    reader.join(DEADLINE)
    assert got == [b"x"]


def test_closed_run_raises_closed_error(etcd, run_id):
    h = handler(etcd, run_id)
    assert h.is_closed() is False
    h.set_closed()
    assert h.is_closed() is True
    with pytest.raises(rdzv.RendezvousClosedError):
        h.next_rendezvous()
    with pytest.raises(rdzv.RendezvousError):
        handler(etcd, run_id).next_rendezvous()


def test_a_peer_leaving_makes_num_nodes_waiting_positive(etcd, run_id):
    a, b = handler(etcd, run_id, nodes=2), handler(etcd, run_id, nodes=2)
    rendezvous_all([a, b])
    assert a.num_nodes_waiting() == 0
    b.shutdown()
    # num_nodes_waiting() is a poll API (torchrun's agent polls it): poll it, bounded.
    deadline = time.monotonic() + DEADLINE
    while a.num_nodes_waiting() == 0:
        assert time.monotonic() < deadline, "a peer's shutdown was not reported"
        time.sleep(0.05)
    # It stays positive until the next round.
    assert a.num_nodes_waiting() >= 1


def test_etcd_server_api():
    with rdzv.EtcdServer() as server:
        assert server.get_host() == "127.0.0.1"
        assert server.get_endpoint() == f"127.0.0.1:{server.get_port()}"
        with pytest.raises(NotImplementedError):
            server.get_client()
    server.stop()  # idempotent

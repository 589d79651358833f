"""Lease keep-alives never depend on Python running: an interpreter that holds the GIL in a
busy loop for several lease TTLs costs no membership (the renewals run on the library's own
threads)."""

import time

from test_handler import handler, rendezvous_all

TTL = 2  # seconds: keep_alive_ttl, the shortest accepted


def test_a_busy_interpreter_does_not_lose_the_lease(etcd, run_id):
    hs = [handler(etcd, run_id, nodes=2, keep_alive_ttl=str(TTL)) for _ in range(2)]
    infos = rendezvous_all(hs)
    assert sorted(i.rank for i in infos) == [0, 1]
    # Pure-Python work for three TTLs: no call into rdzv, no sleep that would matter.
    end = time.monotonic() + 3 * TTL
    n = 0
    while time.monotonic() < end:
        n += sum(range(1000))
    assert n > 0
    # Had a renewal waited for Python, a lease would have expired and a peer been reported.
    assert [h.num_nodes_waiting() for h in hs] == [0, 0]
    # And the two can go on to a next round together.
    again = rendezvous_all(hs)
    assert sorted(i.rank for i in again) == [0, 1]
    assert {i.round for i in again} == {infos[0].round + 1}
    for h in hs:
        h.shutdown()

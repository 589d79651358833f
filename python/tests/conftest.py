"""Shared fixtures: one etcd for the session (started by rdzv's own EtcdServer)."""

import uuid

import pytest

from rdzv import EtcdServer


@pytest.fixture(scope="session")
def etcd():
    server = EtcdServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4()}"

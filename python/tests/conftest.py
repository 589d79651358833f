"""Shared fixtures: one etcd for the session (started by rdzv's own EtcdServer)."""

import os
import tempfile
import uuid

import pytest

from rdzv import EtcdServer


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Agents keep their log directories (`torchelastic_*`, as torchrun does): the agents the
    tests start make them under pytest's own temporary directory, which pytest prunes, not in
    /tmp."""
    tmp = tmp_path_factory.mktemp("tmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None
    yield tmp
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def etcd():
    server = EtcdServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4()}"

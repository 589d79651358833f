"""RendezvousParameters: PyTorch's constructor checks and typed getters."""

import pytest

from rdzv import RendezvousParameters


def params(**kwargs):
    return RendezvousParameters("etcd", "localhost:2379", "job", 1, 2, **kwargs)


def test_fields_and_config():
    p = RendezvousParameters(
        backend="etcd-v3",
        endpoint="h:1",
        run_id="r",
        min_nodes=2,
        max_nodes=3,
        local_addr="10.0.0.1",
        timeout=60,
        protocol="http",
    )
    assert (p.backend, p.endpoint, p.run_id, p.min_nodes, p.max_nodes, p.local_addr) == (
        "etcd-v3",
        "h:1",
        "r",
        2,
        3,
        "10.0.0.1",
    )
    assert p.config == {"timeout": 60, "protocol": "http"}
    assert p.get("timeout") == 60
    assert p.get("missing") is None
    assert p.get("missing", "d") == "d"


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "h:1", "r", 1, 1), "backend name must be a non-empty string"),
        (("etcd", "h:1", "r", 0, 1), "minimum number of rendezvous nodes (0)"),
        (("etcd", "h:1", "r", 3, 2), "maximum number of rendezvous nodes (2)"),
    ],
)
def test_invalid_parameters_raise_value_error(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RendezvousParameters(*args)


@pytest.mark.parametrize("value", ["1", "true", "T", "yes", "Y", 1, True])
def test_get_as_bool_true(value):
    assert params(flag=value).get_as_bool("flag") is True


@pytest.mark.parametrize("value", ["0", "false", "F", "no", "n", 0, False])
def test_get_as_bool_false(value):
    assert params(flag=value).get_as_bool("flag") is False


@pytest.mark.parametrize("value", ["2", "yess", "", 2, 1.0])
def test_get_as_bool_invalid(value):
    with pytest.raises(ValueError, match="'flag' does not represent a valid boolean value"):
        params(flag=value).get_as_bool("flag")


def test_get_as_bool_default():
    assert params().get_as_bool("flag") is None
    assert params().get_as_bool("flag", True) is True


def test_get_as_int():
    assert params(n="42").get_as_int("n") == 42
    assert params(n=" -3 ").get_as_int("n") == -3
    assert params().get_as_int("n") is None
    assert params().get_as_int("n", 7) == 7
    with pytest.raises(ValueError, match="'n' does not represent a valid integer value"):
        params(n="4x").get_as_int("n")

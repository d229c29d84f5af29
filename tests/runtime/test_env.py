"""fxfuse.runtime.env reads switches without os.environ.get's per-call encoding: it must see exactly
what os.environ holds, whoever wrote it."""
import os
from unittest import mock

import pytest

from fxfuse.runtime import env

NAME = "FXFUSE_TEST_ENV_SWITCH"


@pytest.mark.parametrize("value", ["1", "0", "fill", "", "é"])
def test_get_sees_what_os_environ_holds(monkeypatch, value):
    monkeypatch.delenv(NAME, raising=False)
    assert env.get(NAME) is None and env.get(NAME, "dflt") == "dflt"
    monkeypatch.setenv(NAME, value)
    assert env.get(NAME, "dflt") == value == os.environ.get(NAME)
    os.environ[NAME] = value + "x"  # a plain write, after the name's bytes were cached
    assert env.get(NAME) == value + "x"
    del os.environ[NAME]
    assert env.get(NAME, "gone") == "gone"


def test_flag_validates(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env.flag(NAME, True) is True and env.flag(NAME, False) is False
    monkeypatch.setenv(NAME, "0")
    assert env.flag(NAME, True) is False
    monkeypatch.setenv(NAME, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        env.flag(NAME, False)


def test_a_replaced_environ_is_what_is_read():
    with mock.patch("os.environ", {NAME: "1"}):  # a plain dict: no _data
        assert env.get(NAME) == "1" and env.flag(NAME, False) is True
    with mock.patch.dict(os.environ, {NAME: "fill"}):
        assert env.get(NAME) == "fill"
    assert env.get(NAME) is None


def test_the_fast_path_reads_the_bytes_mapping():
    """On POSIX, a value only in os.environ._data (where os.environ's own reads look) is seen: the
    lookup goes there, not through os.environ.get."""
    if os.name != "posix":
        pytest.skip("os.environ keeps str keys here: env.get is os.environ.get")
    with mock.patch.dict(os.environ._data, {os.fsencode(NAME): b"raw"}):
        assert os.environ.get(NAME) == "raw"
        with mock.patch.object(os.environ, "get", side_effect=AssertionError("took os.environ.get")):
            assert env.get(NAME) == "raw" and env.get(NAME + "_UNSET", "d") == "d"

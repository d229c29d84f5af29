"""fxfuse.runtime.env reads switches without os.environ.get's per-call encoding: it must see exactly
what os.environ holds, whoever wrote it."""
import os

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


def test_the_fast_path_is_taken_where_it_can_be():
    # on POSIX os.environ keeps bytes in _data: the point of the module (elsewhere it falls back)
    assert env._RAW == (os.name == "posix")

"""The user-error mechanism: one line, exit 1, traceback only when asked for."""

import pytest

from attune.errors import AttuneError, exit_on_user_error


def fail():
    with exit_on_user_error():
        raise AttuneError("dataset file missing: data.jsonl; check the path")


def test_user_error_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.setenv("ATTUNE_DEBUG", "")  # restored at teardown, even if set inside
    with pytest.raises(SystemExit) as exit_info:
        fail()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: dataset file missing: data.jsonl; check the path\n"


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("ATTUNE_DEBUG", "1")
    with pytest.raises(SystemExit):
        fail()
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("error: dataset file missing: data.jsonl; check the path\n")


def test_interrupt_exits_130_quietly(capsys, monkeypatch):
    monkeypatch.setenv("ATTUNE_DEBUG", "")  # restored at teardown, even if set inside
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError), exit_on_user_error():
        _ = 1 / 0

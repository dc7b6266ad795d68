"""StopSignals: SIGINT and SIGTERM become a request to stop between steps."""

import signal
import threading

import pytest

from attune.training.interrupt import StopSignals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_first_signal_is_remembered_not_raised(signum, code):
    before = signal.getsignal(signum)
    with StopSignals() as stop:
        assert stop.requested is None
        signal.raise_signal(signum)  # would end the test process without the handler
        assert stop.requested == signum
        assert stop.exit_code == code
    assert signal.getsignal(signum) is before


def test_sigterm_twice_still_waits_for_the_step():
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == signal.SIGTERM


def test_a_second_ctrl_c_before_any_checkpoint_says_so():
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match=r"without saving \(no checkpoint was saved\)"):
            signal.raise_signal(signal.SIGINT)  # a SIGINT after any first signal stops at once
    assert stop.requested == signal.SIGTERM


def test_handlers_are_restored_even_when_the_body_raises():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(RuntimeError), StopSignals():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        raise RuntimeError("a failed step")
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_it_installs_nothing():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def body():
        with StopSignals() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
            seen.append(stop.requested)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, None]

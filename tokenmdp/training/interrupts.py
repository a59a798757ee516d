"""Ctrl-C and SIGTERM during training: finish the step in flight, checkpoint it, stop
cleanly. SIGTERM is what schedulers, ``kill`` and ``docker stop`` send; it is handled
like Ctrl-C. A second signal while the step or its checkpoint is still being written is
only acknowledged (so two Ctrl-C in a row still end with a checkpoint); a third aborts."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

#: Signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds after a run stopped on a signal during which more stop signals are ignored (the
#: rest of the same burst: three Ctrl-C within milliseconds).
STOP_BURST_SECONDS = 3.0


class StopRequest(threading.Event):
    """Set by the first stop signal; ``signum`` is the signal that set it."""

    signum: int | None = None


@contextlib.contextmanager
def deferred_interrupt(flag: StopRequest | None = None):
    """While held, SIGINT and SIGTERM set a flag (``flag``, or a new one) that the trainer
    checks between steps."""
    flag = flag if flag is not None else StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    count = [0]

    def handler(signum, frame):
        count[0] += 1
        if count[0] == 1:
            flag.signum = signum
            flag.set()
        elif count[0] == 2:
            print(
                "tokenmdp: stopping after this step and its checkpoint (signal again to abort without saving)",
                file=sys.stderr,
            )
        elif frame is not None and frame.f_code.co_name == "__del__":
            # A KeyboardInterrupt raised inside a finalizer (tqdm's __del__, say) is printed
            # as "Exception ignored" and lost; send the signal again once the finalizer is done.
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        else:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def quiet_after_a_stop(stop: StopRequest, seconds: float = STOP_BURST_SECONDS):
    """Once a run has stopped on SIGINT/SIGTERM (``stop`` set: saved, or aborted by a third
    signal), the rest of the same burst of signals can arrive after the run's own handler is
    gone, and Python's default one would raise KeyboardInterrupt wherever the process then
    is: a traceback while the CLI prints the resume command, or at exit. Stop signals that
    arrive within ``seconds`` of the end of such a run are ignored; later ones reach the
    previous handlers as before. After a run that no signal stopped, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deadline: list[float] = []

    def absorbed() -> bool:
        return stop.is_set() and (not deadline or time.monotonic() < deadline[0])

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: not set from Python

    def handler(signum, frame):
        if absorbed():
            return
        signal.signal(signum, previous[signum])  # the burst is over: the previous handler again
        if callable(previous[signum]):
            previous[signum](signum, frame)
        elif previous[signum] == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        if stop.is_set():
            deadline.append(time.monotonic() + seconds)
        else:
            for s, h in previous.items():
                signal.signal(s, h)

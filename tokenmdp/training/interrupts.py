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

#: Signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(threading.Event):
    """Set by the first stop signal; ``signum`` is the signal that set it."""

    signum: int | None = None


@contextlib.contextmanager
def deferred_interrupt():
    """While held, SIGINT and SIGTERM set a flag that the trainer checks between steps."""
    flag = StopRequest()
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

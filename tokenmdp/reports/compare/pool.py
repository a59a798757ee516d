"""``tokenmdp compare --jobs N``: the cells in N spawned worker processes, and Ctrl-C across
them (each cell training checkpoints and stops, cells not started are cancelled)."""

from __future__ import annotations

import signal
import threading

import torch

from ...errors import TrainingInterrupted
from ...plugin.registry import Registry, plugin_manager
from .cells import cell_extras, run_cell
from .grid import Cell

#: In a worker process: the grid's stop request (set by the parent on Ctrl-C), whether
#: this process saw SIGINT, and whether a cell is being set up or run here.
_stop = None
_interrupted = False
_in_cell = False


def _worker_start(threads: int, stop) -> None:
    global _stop
    _stop = stop
    # SIGINT reaches the whole process group. A worker waiting for its next cell only notes
    # it (no KeyboardInterrupt traceback from the pool's machinery); a cell being set up
    # stops there; a cell training gets the trainer's own handler (checkpoint, then stop).
    signal.signal(signal.SIGINT, _worker_interrupted)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while it spawned us
    torch.set_num_threads(threads)


def _worker_interrupted(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    if _in_cell:
        raise KeyboardInterrupt


def _worker_cell(cell: Cell) -> str | None:
    """Train the cell, then compute its table extras (the exact frontier) here too, so the
    parent only reads them (``compare.json``). None: the grid is stopping, so the cell
    was not started (or was stopped before its run began)."""
    global _in_cell, _interrupted
    if _interrupted or (_stop is not None and _stop.is_set()):
        return None
    try:
        _in_cell = True
        pm = plugin_manager()
        run_cell(cell, pm)
        cell_extras(cell, Registry(pm))  # registers the envs itself (load_task)
    except KeyboardInterrupt:
        return None
    except TrainingInterrupted:
        _interrupted = True  # its trainer took the Ctrl-C: no next cell starts here either
        raise
    finally:
        _in_cell = False
    return cell.dir.name


def run_in_workers(cells: list[Cell], jobs: int, threads: int, bar) -> None:
    """The cells in ``jobs`` spawned processes. Ctrl-C reaches the workers too (one process
    group): each cell training checkpoints and stops, as a run does; cells not started are
    cancelled (the pool's queue, and a stop request for those already handed to a worker);
    finished ones are kept, and a rerun continues."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    stop = context.Event()
    main = threading.current_thread() is threading.main_thread()
    # The workers start with SIGINT blocked (a spawned process inherits the mask) until
    # their initializer installs their handler: a Ctrl-C while they import torch is held
    # until then, never a traceback. Here it is held until the pool is set up.
    # The mask alone is not enough: another thread of this process (tqdm's monitor) may take
    # the signal, and Python then raises KeyboardInterrupt in this thread anyway, possibly in
    # the middle of starting a worker that the pool has not registered yet (so it is never
    # joined, and it fails unpickling after this process has exited). So the handler only
    # notes a Ctrl-C until every worker is started, and it is raised right after.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
    pool = None
    try:
        try:
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=context, initializer=_worker_start, initargs=(threads, stop)
            )
            futures = [pool.submit(_worker_cell, cell) for cell in cells]
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held meanwhile arrives now
        if held:
            raise KeyboardInterrupt
        for future in concurrent.futures.as_completed(futures):
            name = future.result()
            if name is None:  # a worker saw Ctrl-C first
                raise KeyboardInterrupt
            bar.set_postfix_str(name)
            bar.update()
    except (KeyboardInterrupt, TrainingInterrupted):
        _stop_pool(pool, stop, main)
        raise TrainingInterrupted(
            "interrupted; rerun the same `tokenmdp compare` command to resume the grid (finished cells are kept)"
        ) from None
    except BaseException:
        _stop_pool(pool, stop, main)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool, stop, main: bool) -> None:
    """Cancel every cell not started and wait for those in flight to stop (each saves a
    checkpoint). Meanwhile this process ignores SIGINT: the workers get a repeated Ctrl-C
    themselves (the trainer's second and third press), and this one must not leave them."""
    stop.set()
    if pool is None:
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

"""How many torch threads a CPU run uses, and noticing when the machine starves them.

torch's threads synchronise at the end of every operation (an OpenMP barrier): when another busy
process shares one of their cores, every operation waits for the descheduled thread, and the
waiting thread first spins, taking CPU from the one it waits for. Beside one busy core on a
2-core machine a 2-thread run trains at half the rate of a 1-thread run
(``benchmarks/thread_contention.py``, figures in docs/performance.md). So a run that is not told
its thread count takes only the cores nobody else keeps busy when it starts, and warns once when
a logging window shows the symptoms later (the machine got busy after it started).
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def resolve_num_threads(requested: int | None) -> int:
    """The torch threads a run uses: ``requested``; else ``OMP_NUM_THREADS`` when the environment
    sets it (``torchrun`` sets 1 for several processes on one machine); else the available cores
    that other work does not keep busy as the run starts (at least one): a thread sharing its
    core with another busy process makes every operation wait for it
    (``benchmarks/thread_contention.py``)."""
    if requested:
        return requested
    with suppress(ValueError):
        from_env = int(os.environ.get("OMP_NUM_THREADS", ""))
        if from_env >= 1:
            return from_env
    cores = available_cores()
    return max(1, cores - round(min(busy_cores(), cores)))


#: how long :func:`busy_cores` watches the machine
SAMPLE_SECONDS = 0.25


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy now: the machine's non-idle CPU time over
    ``seconds`` (``/proc/stat``; this process sleeps meanwhile), else the 1-minute load average,
    else 0."""
    before = _cpu_times()
    if before is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows)
            return 0.0
    time.sleep(seconds)
    after = _cpu_times()
    if after is None:
        return 0.0
    (busy0, total0, cpus), (busy1, total1, _) = before, after
    return cpus * (busy1 - busy0) / max(total1 - total0, 1)


def _cpu_times() -> tuple[int, int, int] | None:
    """Busy and total jiffies over all CPUs, and the CPU count, from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields), max(cpus, 1)


#: a window in which the process got less than this share of the CPU time its threads could use
#: (cores shared with other runnable work: the threads wait for each other) ...
STARVED_SHARE = 0.5
#: ... and that lasted at least this long (shorter ones are noise), while the machine's load
#: average exceeded its cores, is reported once per run
MIN_WINDOW_SECONDS = 1.0


def oversubscription_warning(
    cpu_seconds: float,
    wall_seconds: float,
    threads: int,
    load: float,
    cores: int,
    samples_per_s: float,
) -> str | None:
    """The warning for a window of training on CPU that took ``wall_seconds`` and
    ``cpu_seconds`` of this process's CPU time with ``threads`` torch threads while the 1-minute
    load average was ``load`` on ``cores`` available cores; ``None`` when all was well.

    Several torch threads synchronise after every operation: when other work keeps cores busy,
    each waits for the descheduled one and a step can take an order of magnitude longer. The
    signs are both: the process got much less CPU than its threads could use, and more work was
    runnable than there are cores. One thread has nobody to wait for, so it is not warned about.
    """
    if threads <= 1 or cores < 1 or wall_seconds < MIN_WINDOW_SECONDS:
        return None
    share = cpu_seconds / (wall_seconds * min(threads, cores))
    if share >= STARVED_SHARE or load <= cores:
        return None
    return (
        f"training is slowed down by an oversubscribed machine: load average {load:.1f} on "
        f"{cores} cores, and the run's {threads} torch threads got {share:.0%} of the CPU time "
        f"they could use ({samples_per_s:.1f} samples/s); set train.num_threads=1 or stop the "
        "other jobs"
    )


def check_oversubscription(window: Window, threads: int, samples_per_s: float) -> str | None:
    """:func:`oversubscription_warning` for ``window`` on this machine, now."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return None
    return oversubscription_warning(
        time.process_time() - window.cpu,
        time.perf_counter() - window.wall,
        threads,
        load,
        available_cores(),
        samples_per_s,
    )


@dataclass
class Window:
    """Training steps since a log line (or an evaluation, a checkpoint): their wall-clock and
    CPU-time start and the samples they trained."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    samples: int = 0

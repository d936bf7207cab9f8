"""How much host memory does each process of a multi-process training take? Run ``crystalkit
train`` under ``torchrun`` with every rank sampling its own resident memory (``/proc/self/status``,
every 5 ms) and print each rank's peaks:

    torchrun --nproc_per_node N benchmarks/rank_memory.py RECIPE [overrides...]

``private`` is anonymous memory (tensors the process owns: it adds up over the ranks of a node);
``file`` is file-backed pages (shared libraries, memory-mapped safetensors weights: pages of the
same file are one copy in the node's page cache, whatever the number of ranks mapping them).
"""

from __future__ import annotations

import sys
import threading
import time

from crystalkit.cli import main as crystalkit_main
from crystalkit.training.distributed import World

FIELDS = ("RssAnon", "RssFile")


def resident_mb() -> dict[str, int]:
    """``RssAnon`` and ``RssFile`` of this process, in MB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in FIELDS:
                found[key] = int(value.split()[0]) // 1024
    return found


class PeakSampler(threading.Thread):
    """Keeps the largest value of each of :data:`FIELDS` seen since it started."""

    def __init__(self, period: float = 0.005):
        super().__init__(daemon=True)
        self.period = period
        self.peak = resident_mb()
        self.start_values = dict(self.peak)

    def run(self) -> None:
        while True:
            for key, value in resident_mb().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.period)


def main() -> None:
    sampler = PeakSampler()
    sampler.start()
    sys.argv = ["crystalkit", "train", *sys.argv[1:]]
    try:
        crystalkit_main()
    finally:
        time.sleep(2 * sampler.period)
        peak, start = sampler.peak, sampler.start_values
        print(
            f"rank {World.from_env().rank}: private peak {peak['RssAnon']} MB "
            f"(after imports {start['RssAnon']} MB), file-backed peak {peak['RssFile']} MB "
            f"(after imports {start['RssFile']} MB)",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()

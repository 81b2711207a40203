"""Timing for `loraflow bench`: interleaved rounds in a seeded order, paired ratios (CUDA events or perf_counter)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_cpu


class Timings(dict):
    """Median seconds per variant (the dict), plus every round's sample (`.samples`) for paired ratios."""

    def __init__(self, samples: dict[str, list[float]]):
        super().__init__({name: statistics.median(ts) for name, ts in samples.items()})
        self.samples = samples

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of num's time / den's time in the same round (rounds where both ran). Pairing the
        two samples of one round cancels what a shared, noisy machine does to both (a slow minute, a busy core)."""
        return statistics.median(a / b for a, b in zip(self.samples[num], self.samples[den]))


def interleaved(variants: dict[str, Callable[[], None]], device, rounds: int = 5, warmup: int = 1,
                rounds_of: dict[str, int] | None = None, seed: int = 0) -> Timings:
    """Seconds per variant: the variants run in turn, `rounds` times after `warmup` rounds, in a new (seeded) order
    every round so that no variant always runs right after the same other one. Returns the medians, with every
    round's sample kept for paired ratios (`Timings.ratio`).

    `rounds_of` gives some variants fewer timed rounds (a very slow one): they run in the first rounds only.
    """
    timer = _timer(torch.device(device))
    rounds_of = rounds_of or {}
    order = random.Random(seed)
    samples = {name: [] for name in variants}
    for r in range(warmup + rounds):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            if r >= warmup + rounds_of.get(name, rounds):
                continue
            t = timer(variants[name])
            if r >= warmup:
                samples[name].append(t)
    return Timings(samples)

"""Shared timing helpers for the benchmarks: interleaved repeats, ratios in one run."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def rate(work: Callable[[], int], seconds: float = 2.0) -> float:
    """Items per second of ``work`` (which returns how many items it did), run for ~``seconds``."""
    work()  # warm-up
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += work()
    return done / elapsed


def compare(a: Callable[[], int], b: Callable[[], int], seconds: float = 2.0,
            rounds: int = 3) -> tuple[float, float]:
    """Best rate of ``a`` and of ``b`` over ``rounds`` interleaved runs (A B A B ...).

    Interleaving and taking the best of each reduces the effect of a noisy machine on the ratio.
    """
    best_a = best_b = 0.0
    for _ in range(rounds):
        best_a = max(best_a, rate(a, seconds))
        best_b = max(best_b, rate(b, seconds))
    return best_a, best_b


def verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    """``PASS``/``MISS`` against a target ratio."""
    ok = ratio >= target if higher_is_better else ratio <= target
    return "PASS" if ok else "MISS"


def torch_bench_args(doc: str | None) -> argparse.Namespace:
    """``--threads`` (torch intra-op threads, default 1, applied) and ``--quick`` (a smoke run)."""
    import torch

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smaller budgets (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args

"""Interleaved timing: every variant once per round, rounds shuffled.

Timing the competitors in the same process and interleaving them means slow
drifts of the machine (other load, frequency scaling) hit every variant
alike; the paired ratio `t_variant[r] / t_floor[r]` of each round `r` cancels
most of what remains.
"""

import random
import time as time_lib
from typing import Callable

import numpy as np

from benchmarks import variants as variants_lib


def _call_s(fn: Callable, x) -> float:
  start = time_lib.perf_counter()
  variants_lib.force(fn(x))
  return time_lib.perf_counter() - start


def interleaved(fns: dict[str, Callable], x, *, repeats: int, warmup: int,
                seed: int = 0,
                max_repeats: dict[str, int] | None = None) -> dict:
  """Times each `fns[name](x)` `repeats` times, interleaved, after warm-up.

  Args:
    fns: name -> function of `x`.
    x: The input.
    repeats: Timed rounds.
    warmup: Untimed calls per function before the first round (the first
      call's time, tracing and compilation included, is reported apart).
    seed: Seed of the per-round shuffle.
    max_repeats: Optional cap of timed rounds per name (a slow variant runs
      in the first rounds only).

  Returns:
    name -> `{"first_call_s", "times_s"}`.
  """
  max_repeats = max_repeats or {}
  results = {}
  for name, fn in fns.items():
    results[name] = {"first_call_s": _call_s(fn, x), "times_s": []}
    for _ in range(warmup - 1):
      _call_s(fn, x)
  order = list(fns)
  rng = random.Random(seed)
  for r in range(repeats):
    rng.shuffle(order)
    for name in order:
      if r < max_repeats.get(name, repeats):
        results[name]["times_s"].append(_call_s(fns[name], x))
  return results


def summarize(times_s: list[float], floor_s: list[float] | None) -> dict:
  """Median/min of `times_s` and paired ratios to the floor's rounds."""
  summary = {"median_s": float(np.median(times_s)),
             "min_s": float(np.min(times_s)), "n": len(times_s)}
  if floor_s:
    ratios = paired_ratios(times_s, floor_s)
    summary.update(ratio_median=float(np.median(ratios)),
                   ratio_min=float(np.min(ratios)),
                   ratio_max=float(np.max(ratios)))
  return summary


def paired_ratios(times_s: list[float], floor_s: list[float]) -> np.ndarray:
  """Round `r`'s time over the floor's time in the same round `r`."""
  return np.asarray(times_s) / np.asarray(floor_s[:len(times_s)])


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
  """`b` of the least-squares fit `seconds ~ a * length ** b`."""
  slope, _ = np.polyfit(np.log(lengths), np.log(seconds), 1)
  return float(slope)


def pool(per_process: list[dict], floor_per_process: list[list[float] | None]
         ) -> dict:
  """One variant's timings from several processes, pooled.

  Args:
    per_process: Each process's `{"first_call_s", "times_s", ...}`.
    floor_per_process: Each process's floor `times_s` (None: no floor).

  Returns:
    `summarize`'s fields over all rounds, except that `ratio_min` and
    `ratio_max` span the per-process medians of the paired ratios (one
    process is one draw of how TensorFlow schedules a traced function, see
    docs/guides/performance.md); plus `process_ratio_medians`.
  """
  times = [t for r in per_process for t in r["times_s"]]
  summary = summarize(times, None)
  summary.update(first_call_s=max(r["first_call_s"] for r in per_process),
                 times_s=times, processes=len(per_process))
  if all(f for f in floor_per_process):
    ratios = [paired_ratios(r["times_s"], f)
              for r, f in zip(per_process, floor_per_process)]
    medians = [float(np.median(r)) for r in ratios]
    summary.update(ratio_median=float(np.median(np.concatenate(ratios))),
                   ratio_min=min(medians), ratio_max=max(medians),
                   process_ratio_medians=medians)
  return summary

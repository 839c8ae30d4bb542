"""Peak memory and time of forward+backward vs sequence length, with remat.

Each (time, remat) point runs in a fresh subprocess with TensorFlow's BFC
allocator on the CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`), so
`tf.config.experimental.get_memory_info` counts every tensor: after a warm-up
call (tracing, first allocations) the allocator's peak is reset and the peak
above the bytes in use before is the memory one training step needs. The
child's lifetime `ru_maxrss` is reported too. Time: median of `--runs` calls
after the warm-up, results forced with `.numpy()`.

    python -m benchmarks.remat --times=500,1000,2000,4000,8000 \
        --remats=none,sqrt,16,64 --losses=all,last

Two losses: `all`, the mean square of every output (the outputs and their
gradient are `[batch, T, units]` buffers no recomputation can remove), and
`last`, the mean square of the last output only (`return_sequences=False`,
as in sequence classification).

Writes `benchmarks/results/remat.json`, a PNG plot and a Markdown table.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time as time_lib

from absl import app
from absl import flags
from absl import logging

from benchmarks import memory

_TIMES = flags.DEFINE_list("times", ["500", "1000", "2000", "4000", "8000"],
                           "Sequence lengths T to sweep.")
_REMATS = flags.DEFINE_list("remats", ["none", "sqrt", "16", "64"],
                            "remat values: none, sqrt or ints.")
_LOSSES = flags.DEFINE_list("losses", ["all", "last"],
                            "Losses: all (every output) or last (last output).")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_UNITS = flags.DEFINE_integer("units", 256, "GRU units.")
_FEATURES = flags.DEFINE_integer("features", 256, "Input features per step.")
_RUNS = flags.DEFINE_integer("runs", 3, "Timed calls after the warm-up.")
_XLA = flags.DEFINE_bool("xla", False, "Compile with XLA (jit_compile).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/remat.json",
                           "JSON results path (PNG next to it).")
_TABLE = flags.DEFINE_string("markdown", "",
                             "Also write a Markdown table here.")
_CHILD = flags.DEFINE_string("child", "", "Internal: one point as JSON.")

_MB = 1024.0 * 1024.0


def _measure(point: dict) -> dict:
  """Runs one point in this process; returns its measurements."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import stepper  # pylint: disable=g-import-not-at-top

  remat = None if point["remat"] == "none" else (
      point["remat"] if point["remat"] == "sqrt" else int(point["remat"]))
  cell = keras.layers.GRUCell(point["units"])
  cell.build([None, point["features"]])
  x = tf.random.normal([point["batch"], point["time"], point["features"]])

  @tf.function(jit_compile=point["xla"])
  def train_step(x):
    with tf.GradientTape() as tape:
      y, _ = stepper.model_rnn(cell, x, remat=remat,
                               return_sequences=point["loss"] == "all")
      loss = tf.reduce_mean(tf.square(y))
    return loss, tape.gradient(loss, cell.trainable_variables)

  train_step(x)[0].numpy()  # Warm-up: tracing and first allocations.
  tf.config.experimental.reset_memory_stats("CPU:0")
  in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
  seconds = []
  for _ in range(point["runs"]):
    start = time_lib.perf_counter()
    train_step(x)[0].numpy()
    seconds.append(time_lib.perf_counter() - start)
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  result = dict(point, peak_mb=(peak - in_use) / _MB,
                seconds=statistics.median(seconds),
                maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                / 1024.0)
  plan = memory.child_xla_plan_mb()
  if plan is not None:
    result["xla_plan_mb"] = plan
  return result


def _run_child(point: dict) -> dict:
  with tempfile.TemporaryDirectory() as dump_dir:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.remat",
         f"--child={json.dumps(point)}"],
        env=memory.child_env(dump_dir if point["xla"] else None),
        capture_output=True, text=True, check=False)
  if result.returncode != 0:
    logging.warning("point %s failed: %s", point, result.stderr[-2000:])
    return dict(point, error=result.stderr[-500:])
  return json.loads(result.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
  """Markdown: one row per (loss, T); peak MB, time and ratios vs no remat."""
  remats = list(dict.fromkeys(r["remat"] for r in results))
  by_key = {(r["loss"], r["time"], r["remat"]): r for r in results}
  header = "| loss | T | " + " | ".join(
      f"{m} peak MB / s" + ("" if m == "none" else " (x less mem, x time)")
      for m in remats) + " |"
  lines = [header, "|" + "---|" * (len(remats) + 2)]
  for loss, t in sorted({(r["loss"], r["time"]) for r in results}):
    plain = by_key.get((loss, t, "none"), {})
    cells = []
    for m in remats:
      r = by_key.get((loss, t, m), {})
      if "peak_mb" not in r:
        cells.append("failed")
        continue
      cell = f"{r['peak_mb']:.0f} / {r['seconds']:.2f}"
      if m != "none" and "peak_mb" in plain:
        cell += (f" ({plain['peak_mb'] / r['peak_mb']:.1f}x, "
                 f"{r['seconds'] / plain['seconds']:.2f}x)")
      cells.append(cell)
    lines.append(f"| {loss} | {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _plot(results: list[dict], path: str) -> None:
  """Peak memory and time vs T: one line per (loss, remat)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4))
  keys = dict.fromkeys((r["loss"], r["remat"]) for r in results)
  for loss, m in keys:
    points = sorted((r["time"], r["peak_mb"], r["seconds"]) for r in results
                    if (r["loss"], r["remat"]) == (loss, m) and "peak_mb" in r)
    style = "o-" if loss == "all" else "s--"
    label = f"loss={loss}, remat={m}"
    mem.plot([p[0] for p in points], [p[1] for p in points], style,
             label=label)
    sec.plot([p[0] for p in points], [p[2] for p in points], style,
             label=label)
  mem.set(xlabel="T (steps)", ylabel="peak MB (forward+backward)",
          xscale="log", yscale="log")
  sec.set(xlabel="T (steps)", ylabel="seconds per training step",
          xscale="log", yscale="log")
  mem.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_measure(json.loads(_CHILD.value))))
    return
  results = []
  for loss in _LOSSES.value:
    for t in (int(v) for v in _TIMES.value):
      for remat in _REMATS.value:
        point = dict(loss=loss, time=t, remat=remat, batch=_BATCH.value,
                     units=_UNITS.value, features=_FEATURES.value,
                     runs=_RUNS.value, xla=_XLA.value)
        results.append(_run_child(point))
        logging.info("%s", results[-1])
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  _plot(results, os.path.join(os.path.dirname(_OUT.value),
                              "remat_memory.png"))
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(_table(results))


if __name__ == "__main__":
  app.run(main)

"""Peak memory of one variant, measured in a fresh subprocess.

Method: the child runs TensorFlow with its BFC allocator on the CPU too
(`TF_CPU_ALLOCATOR_USE_BFC=true`), so `tf.config.experimental.get_memory_info`
counts every tensor and XLA buffer. It builds the variant and runs it once
(tracing, XLA compilation, first-call allocations), resets the allocator's
peak, runs the variant `--runs` more times, and reports the peak bytes in use
above those in use before: the memory one call needs (activations kept for the
gradient, buffers, temporaries). The resident set size of the child is
reported too, before the first call and at its lifetime peak (`ru_maxrss`,
including the TensorFlow import and compilation).

Caveat: the BFC allocator hands out a free chunk whole when it is less than
twice the request, so one large buffer (XLA allocates a call's temporaries
as one) can be counted up to 2x (seen as powers of two: 32.5, 64.5, 128.5
MB); many small tensors (graph mode) are counted to within 256 bytes each.
Graph-mode figures agree with the resident set's growth; XLA's keep their
buffer between calls, so RSS cannot check them. For XLA variants the child
therefore also reports XLA's own plan (`xla_plan_mb`): from the buffer
assignment XLA dumps (`--xla_dump_to`), the bytes of every allocation that is
not an argument, a constant or thread-local (the temporaries plus the
results), which is exact.

    python -m benchmarks.memory '{"variant": "stepper", "config": "medium",
        "time": 100, "mode": "train", "runs": 2, "chunk_size": 100}'

The child takes one JSON argument (not flags, so that `benchmarks.rnn`, which
imports this module, keeps its own flags) and prints one JSON line.
"""

import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

from absl import app

METHOD = (
    "one subprocess per variant with TF_CPU_ALLOCATOR_USE_BFC=true; after a "
    "warm-up call, tf.config.experimental.reset_memory_stats, then the peak "
    "of get_memory_info('CPU:0') over further calls minus the bytes in use "
    "before them (tensors and XLA buffers one call needs); RSS: VmRSS before "
    "the first call and ru_maxrss (lifetime, incl. TF import and "
    "compilation). BFC hands out a free chunk whole when it is < 2x the "
    "request: XLA's one large buffer may read up to 2x high (powers of two); "
    "for XLA variants, 'plan' is the exact size XLA's buffer assignment "
    "gives its temporaries and results (arguments excluded)")

_MB = 1024.0 * 1024.0


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("VmRSS not in /proc/self/status")


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")
_NOT_OWNED = ("parameter", "constant", "thread-local")


def xla_plan_bytes(dump_dir: str) -> int | None:
  """The largest module's planned bytes in XLA's buffer-assignment dumps
  under `dump_dir`: allocations other than arguments, constants and
  thread-local scalars; None if there is no dump."""
  sizes = []
  for path in glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")):
    total = 0
    with open(path) as f:
      for line in f:
        match = _ALLOCATION.match(line)
        if match and not match.group(2).startswith(_NOT_OWNED):
          total += int(match.group(1))
    sizes.append(total)
  return max(sizes) if sizes else None


def child_env(xla_dump_dir: str | None = None) -> dict[str, str]:
  """The environment of a measuring child: TensorFlow's BFC allocator on the
  CPU, quiet logs and, with `xla_dump_dir`, XLA's dumps there (read back by
  `xla_plan_bytes` through `STEPPER_XLA_DUMP_DIR`)."""
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true",
             TF_CPP_MIN_LOG_LEVEL="2")
  if xla_dump_dir:
    env["STEPPER_XLA_DUMP_DIR"] = xla_dump_dir
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_dump_to={xla_dump_dir}").strip()
  return env


def child_xla_plan_mb() -> float | None:
  """In a child started with `child_env(dump_dir)`: XLA's plan in MB."""
  dump_dir = os.environ.get("STEPPER_XLA_DUMP_DIR")
  plan = xla_plan_bytes(dump_dir) if dump_dir else None
  return None if plan is None else plan / _MB


def _measure_here(variant_name: str, config, mode: str, runs: int,
                  chunk_size: int) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from benchmarks import variants  # pylint: disable=g-import-not-at-top
  cell = variants.make_cell(config)
  variant = variants.build(variant_name, config, cell, chunk_size)
  fn = getattr(variant, mode)
  x = variants.make_inputs(config)
  rss_base = _rss_mb()
  variants.force(fn(x))
  tf.config.experimental.reset_memory_stats("CPU:0")
  in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
  for _ in range(runs):
    variants.force(fn(x))
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  lifetime_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  report = {"call_peak_mb": (peak - in_use) / _MB, "rss_before_mb": rss_base,
            "rss_lifetime_peak_mb": lifetime_kb / 1024.0}
  plan = child_xla_plan_mb()
  if plan is not None:
    report["xla_plan_mb"] = plan
  return report


def measure(variant: str, config_name: str, time: int, mode: str = "train",
            runs: int = 2, chunk_size: int = 100,
            timeout_s: float = 900) -> dict:
  """Runs `python -m benchmarks.memory` for one variant; returns its report.

  Returns:
    `{"call_peak_mb", "rss_before_mb", "rss_lifetime_peak_mb"}`, plus
    `"xla_plan_mb"` for an XLA variant, or `{"error": message}` if the child
    failed.
  """
  spec = dict(variant=variant, config=config_name, time=time, mode=mode,
              runs=runs, chunk_size=chunk_size)
  command = [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as dump_dir:
    env = child_env(dump_dir if "_xla" in variant else None)
    try:
      done = subprocess.run(command, env=env, cwd=root, capture_output=True,
                            text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout_s} s"}
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines:
    return {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
  return json.loads(lines[-1])


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Expected one JSON argument; see the docstring.")
  from benchmarks import variants  # pylint: disable=g-import-not-at-top
  spec = json.loads(argv[1])
  config = variants.CONFIGS[spec["config"]].with_time(spec["time"])
  report = _measure_here(spec["variant"], config, spec["mode"], spec["runs"],
                         spec["chunk_size"])
  sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
  app.run(main)

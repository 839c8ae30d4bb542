"""Times `stepper.model_rnn` against Keras built-ins and hand-written loops.

Forward+backward (loss and gradients of every weight) and inference of each
variant (see `benchmarks/variants.py`) run in this one process, interleaved,
after warm-up; every timing, the machine and the versions go to a JSON file
and a Markdown table (ratios to the hand-written `tf.while_loop`, the floor)
to stdout, optionally into docs/benchmarks.md between the benchmark markers.

    python -m benchmarks.rnn --quick
    python -m benchmarks.rnn --configs=small,medium,large --repeats=20 \\
        --sweep --memory --update_readme

Peak memory runs one subprocess per variant (`benchmarks/memory.py`).
"""

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time as time_lib

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import stepper
from benchmarks import memory
from benchmarks import report
from benchmarks import timing
from benchmarks import variants as variants_lib

_QUICK = flags.DEFINE_bool(
    "quick", False, "Preset for a smoke run: the tiny config, 3 repeats, a "
    "short sweep, memory of two variants. Explicit flags still override.")
_CONFIGS = flags.DEFINE_list(
    "configs", ["small", "medium", "large"],
    f"Configs to time, from {sorted(variants_lib.CONFIGS)}.")
_VARIANTS = flags.DEFINE_list("variants", list(variants_lib.NAMES),
                              "Variants to time.")
_MODES = flags.DEFINE_list("modes", ["train", "infer"],
                           "train (forward+backward) and/or infer.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed rounds per config.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per variant.")
_EAGER_REPEATS = flags.DEFINE_integer(
    "eager_repeats", 3, "Timed rounds of the (slow) eager loop.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 50,
                                   "Chunk size of the run_chunks variants.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also run the sweep over time.")
_SWEEP_CONFIG = flags.DEFINE_string("sweep_config", "medium",
                                    "Model of the sweep (its time is swept).")
_SWEEP_TIMES = flags.DEFINE_list(
    "sweep_times", ["100", "125", "250", "500", "1000", "2000", "4000"],
    "Sequence lengths of the sweep.")
_SWEEP_VARIANTS = flags.DEFINE_list(
    "sweep_variants", ["while_loop", "keras_lstm", "stepper", "stepper_xla"],
    "Variants in the sweep.")
_SWEEP_REPEATS = flags.DEFINE_integer("sweep_repeats", 5,
                                      "Timed rounds per sweep length.")
_MEMORY = flags.DEFINE_bool("memory", False,
                            "Measure peak memory (one subprocess each).")
_MEMORY_VARIANTS = flags.DEFINE_list(
    "memory_variants", ["while_loop", "keras_lstm", "keras_rnn", "tf_scan",
                        "stepper", "stepper_xla", "while_loop_xla",
                        "run_chunks_through", "run_chunks_truncate"],
    "Variants whose memory is measured (train mode).")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/cpu.json",
                              "Where to write the JSON results.")
_TABLE = flags.DEFINE_string("table", None,
                             "Also write the Markdown table to this file.")
_UPDATE_README = flags.DEFINE_bool(
    "update_readme", False, "Replace the table between the benchmark markers "
    "of --readme.")
_README = flags.DEFINE_string("readme", "docs/benchmarks.md",
                              "Markdown page to update.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, inputs, order.")
_PROCESSES = flags.DEFINE_integer(
    "processes", 1, "Time the configs in this many fresh processes (seeds "
    "seed, seed+1, ...) and pool them. A graph-mode loop runs at one of two "
    "speeds per traced function (docs/guides/performance.md): one process "
    "is one draw.",
    lower_bound=1)


@dataclasses.dataclass
class Options:
  """Everything a run needs; `main` fills it from the flags."""
  configs: list[str]
  variants: list[str]
  modes: list[str]
  repeats: int = 20
  warmup: int = 2
  eager_repeats: int = 3
  chunk_size: int = 50
  sweep: bool = False
  sweep_config: str = "medium"
  sweep_times: list[int] = dataclasses.field(default_factory=list)
  sweep_variants: list[str] = dataclasses.field(default_factory=list)
  sweep_repeats: int = 5
  memory: bool = False
  memory_variants: list[str] = dataclasses.field(default_factory=list)
  seed: int = 0
  processes: int = 1


_QUICK_PRESET = dict(configs=["tiny"], repeats=3, warmup=1, eager_repeats=1,
                     sweep=True, sweep_config="tiny",
                     sweep_times=[10, 20, 40], sweep_repeats=2, memory=True,
                     memory_variants=["while_loop", "stepper"])


def machine_info() -> dict:
  """Machine, versions and accelerators of this run."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f
                  if l.startswith("model name")), cpu)
  except OSError:
    pass
  gpus = tf.config.list_physical_devices("GPU")
  return {
      "cpu": cpu, "cpu_count": os.cpu_count(),
      "gpus": [d.name for d in gpus] or "none available in this run",
      "platform": platform.platform(), "python": platform.python_version(),
      "tensorflow": tf.__version__, "keras": keras.__version__,
      "numpy": np.__version__, "stepper": stepper.__version__,
      "date": time_lib.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }


def _available(names: list[str]) -> tuple[list[str], dict]:
  missing = {n: variants_lib.unavailable(n) for n in names}
  missing = {n: why for n, why in missing.items() if why}
  return [n for n in names if n not in missing], missing


def time_config(config: variants_lib.Config, options: Options) -> dict:
  """Times every variant on one config, both modes, interleaved."""
  names, missing = _available(options.variants)
  cell = variants_lib.make_cell(config, options.seed)
  x = variants_lib.make_inputs(config, options.seed)
  built = {n: variants_lib.build(n, config, cell, options.chunk_size)
           for n in names}
  result = {"config": dataclasses.asdict(config), "variants": {}}
  for name in options.variants:
    entry = {"description": variants_lib.describe(name)}
    if name in missing:
      entry["unavailable"] = missing[name]
    result["variants"][name] = entry
  for mode in options.modes:
    logging.info("config %s, %s: timing %d variants", config.name, mode,
                 len(names))
    raw = timing.interleaved(
        {n: getattr(v, mode) for n, v in built.items()}, x,
        repeats=options.repeats, warmup=options.warmup, seed=options.seed,
        max_repeats={"eager_loop": options.eager_repeats})
    for name, r in raw.items():
      floor = raw.get(variants_lib.floor_of(name), {}).get("times_s")
      result["variants"][name][mode] = dict(
          r, **timing.summarize(r["times_s"], floor))
  return result


def time_in_processes(options: Options) -> dict:
  """`time_config` for every config, in `options.processes` fresh
  processes, pooled (`timing.pool`).

  Returns:
    Config name -> `time_config`'s result, pooled.
  """
  per_process = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(options.processes):
      output = os.path.join(tmp, f"{i}.json")
      logging.info("timing process %d of %d", i + 1, options.processes)
      subprocess.run(
          [sys.executable, "-m", "benchmarks.rnn",
           f"--configs={','.join(options.configs)}",
           f"--variants={','.join(options.variants)}",
           f"--modes={','.join(options.modes)}",
           f"--repeats={options.repeats}", f"--warmup={options.warmup}",
           f"--eager_repeats={options.eager_repeats}",
           f"--chunk_size={options.chunk_size}",
           f"--seed={options.seed + i}", "--nosweep", "--nomemory",
           "--processes=1", f"--output={output}"],
          check=True, capture_output=True,
          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
      with open(output) as f:
        per_process.append(json.load(f)["configs"])
  pooled = {}
  for name, first in per_process[0].items():
    pooled[name] = {"config": first["config"], "variants": {}}
    for variant, entry in first["variants"].items():
      merged = {k: v for k, v in entry.items() if k not in options.modes}
      for mode in options.modes:
        if mode not in entry:
          continue
        floors = [p[name]["variants"].get(variants_lib.floor_of(variant), {})
                  .get(mode, {}).get("times_s") for p in per_process]
        merged[mode] = timing.pool(
            [p[name]["variants"][variant][mode] for p in per_process], floors)
      pooled[name]["variants"][variant] = merged
  return pooled


def sweep(options: Options) -> dict:
  """Forward+backward time and memory against sequence length."""
  base = variants_lib.CONFIGS[options.sweep_config]
  names, missing = _available(options.sweep_variants)
  cell = variants_lib.make_cell(base, options.seed)
  per_name = {n: {"median_s": [], "min_s": [], "per_step_us": [],
                  "first_call_s": [], "memory": []} for n in names}
  for length in options.sweep_times:
    config = base.with_time(length)
    logging.info("sweep: time %d", length)
    x = variants_lib.make_inputs(config, options.seed)
    fns = {n: variants_lib.build(n, config, cell, options.chunk_size).train
           for n in names}
    raw = timing.interleaved(fns, x, repeats=options.sweep_repeats,
                             warmup=options.warmup, seed=options.seed)
    for name, r in raw.items():
      median = float(np.median(r["times_s"]))
      per_name[name]["median_s"].append(median)
      per_name[name]["min_s"].append(float(np.min(r["times_s"])))
      per_name[name]["per_step_us"].append(1e6 * median / length)
      per_name[name]["first_call_s"].append(r["first_call_s"])
      if options.memory:
        per_name[name]["memory"].append(memory.measure(
            name, base.name, length, chunk_size=options.chunk_size))
  for name, entry in per_name.items():
    entry["time_exponent"] = timing.fit_exponent(options.sweep_times,
                                                 entry["median_s"])
    mems = [m.get("call_peak_mb") for m in entry["memory"]]
    if mems and None not in mems:
      entry["memory_mb_per_step"] = float(
          np.polyfit(options.sweep_times, mems, 1)[0])
  return {"config": dataclasses.asdict(base), "times": options.sweep_times,
          "variants": per_name, "unavailable": missing}


def entry_overhead(repeats: int = 200) -> dict:
  """Eager cost of `model_rnn` around one step, and retracing for new T.

  The overhead is the median eager `model_rnn` call on a one-step sequence
  minus the median eager call of the bare cell on the same step: validation,
  adaptation and the loop set-up.
  """
  cell = keras.layers.LSTMCell(4)
  x = tf.random.normal([2, 1, 3])
  states = cell.get_initial_state(batch_size=2)

  def median_us(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time_lib.perf_counter()
      fn()
      times.append(time_lib.perf_counter() - start)
    return 1e6 * float(np.median(times))

  engine_us = median_us(lambda: stepper.model_rnn(cell, x))
  cell_us = median_us(lambda: cell(x[:, 0], states))
  traced = tf.function(lambda x: stepper.model_rnn(cell, x)[0],
                       input_signature=[tf.TensorSpec([None, None, 3])])
  for batch, length in ((2, 5), (3, 7), (1, 50)):
    traced(tf.zeros([batch, length, 3]))
  return {"model_rnn_eager_t1_us": engine_us, "cell_eager_us": cell_us,
          "overhead_us": engine_us - cell_us,
          "traces_for_3_shapes_with_input_signature":
              int(traced.experimental_get_tracing_count())}


def run(options: Options) -> dict:
  """Runs the whole benchmark; returns the JSON-able results.

  Raises:
    ValueError: If `options.processes` is below 1.
  """
  if options.processes < 1:
    raise ValueError("`processes` must be a positive int (fresh processes to "
                     f"time in); got {options.processes!r}.")
  results = {"machine": machine_info(), "options": dataclasses.asdict(options),
             "memory_method": memory.METHOD, "configs": {}}
  if options.processes > 1:
    results["configs"] = time_in_processes(options)
  for name in options.configs:
    config = variants_lib.CONFIGS[name]
    if options.processes == 1:
      results["configs"][name] = time_config(config, options)
    if options.memory:
      for variant in _available(options.memory_variants)[0]:
        logging.info("memory: %s %s", name, variant)
        results["configs"][name]["variants"].setdefault(variant, {})[
            "memory"] = memory.measure(variant, name, config.time,
                                       chunk_size=options.chunk_size)
  if options.sweep:
    results["sweep"] = sweep(options)
  results["entry_overhead"] = entry_overhead()
  return results


def options_from_flags() -> Options:
  """Options from the flags; `--quick` fills flags left at their defaults."""
  values = dict(
      configs=_CONFIGS.value, variants=_VARIANTS.value, modes=_MODES.value,
      repeats=_REPEATS.value, warmup=_WARMUP.value,
      eager_repeats=_EAGER_REPEATS.value, chunk_size=_CHUNK_SIZE.value,
      sweep=_SWEEP.value, sweep_config=_SWEEP_CONFIG.value,
      sweep_times=[int(t) for t in _SWEEP_TIMES.value],
      sweep_variants=_SWEEP_VARIANTS.value, sweep_repeats=_SWEEP_REPEATS.value,
      memory=_MEMORY.value, memory_variants=_MEMORY_VARIANTS.value,
      seed=_SEED.value, processes=_PROCESSES.value)
  if _QUICK.value:
    for key, value in _QUICK_PRESET.items():
      if not flags.FLAGS[key].present:
        values[key] = value
  return Options(**values)


def main(argv):
  del argv
  # Every variant is a new tf.function traced once per shape: TensorFlow's
  # "excessive retracing" warnings are expected here and hide the log.
  tf.get_logger().setLevel("ERROR")
  options = options_from_flags()
  results = run(options)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(results, f, indent=1)
  table = report.markdown(results)
  print(table)
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(table)
  if _UPDATE_README.value:
    report.update_readme(_README.value, table)
  logging.info("wrote %s", _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)

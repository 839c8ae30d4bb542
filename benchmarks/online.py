r"""Online gradient estimators against truncated BPTT on a task with known lags.

    python -m benchmarks.online                 # the published run (3 seeds)
    python -m benchmarks.online --updates=200 --seeds=1 --out=/tmp/o.json
    python -m benchmarks.online --cost          # cost per step vs BPTT only

The task is the additive-dependency stream of Marschall, Cho & Savin (JMLR
2020, after Pitis 2016): inputs `x_t` are fair coin flips and the target is
the probability `y_t = 0.5 + 0.5 x_{t-5} - 0.25 x_{t-9}` (lags `--lag1`,
`--lag2`), learned with the cross-entropy against a sigmoid output. Three
levels are known exactly: a model that remembers nothing reaches 0.662
nats, one that remembers lag 5 only 0.519, one that remembers both 0.454.

One GRU step with a Dense readout (`--units`), `--rows` parallel streams,
Adam, an update every `--k` steps for every method, `--updates` of them
(the same number for each):

* `bptt`: TBPTT(k, `--bptt_k2`) with `k2` several times the longest lag:
  full BPTT in all that matters here (the exact gradient of a stream would
  reach back to its start);
* `tbptt(k,k)`: TBPTT(k, k), a window shorter than both lags;
* `tbptt(k,k2)`: TBPTT(k, `--short_k2`), a window that covers lag 1 only;
* `rtrl`, `snap1`, `uoro`: `Trainer(online=..., stream=True)`, the
  state and influence carried with no cut.

Every setting runs `--seeds` seeds through `benchmarks.experiment` (paired:
seed `s` draws the same streams and initial weights for every method).
Reported: the mean training loss of the last 10% of updates (each batch is
fresh data, so this is a test loss) and the loss of a held-out stream
(`evaluate`), against the three levels. `--cost` measures, per method, the
time per step of `stepper.online.gradients` (median of interleaved rounds,
after one traced call) on a GRU (a dense state Jacobian) and on a minGRU (an
elementwise recurrence: a diagonal one), and its peak memory (a fresh subprocess with
TensorFlow's BFC allocator on the CPU, `benchmarks.memory.child_env`),
relative to BPTT on the same batch.

The machine these numbers were taken on was shared and loaded (2 cores):
rerun both commands on a quiet machine before quoting the times.
"""

import json
import os
import statistics
import subprocess
import sys
import time as time_lib

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import stepper
from benchmarks import experiment

_UNITS = flags.DEFINE_integer("units", 16, "GRU units.", lower_bound=1)
_ROWS = flags.DEFINE_integer("rows", 16, "Parallel streams.", lower_bound=1)
_K = flags.DEFINE_integer("k", 4, "Steps per update (every method).",
                          lower_bound=1)
_UPDATES = flags.DEFINE_integer("updates", 1500, "Updates per run.",
                                lower_bound=1)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per setting.",
                              lower_bound=1)
_LAG1 = flags.DEFINE_integer("lag1", 5, "The first lag.", lower_bound=1)
_LAG2 = flags.DEFINE_integer("lag2", 9, "The second lag.", lower_bound=1)
_BPTT_K2 = flags.DEFINE_integer("bptt_k2", 40, "k2 of the `bptt` setting.",
                                lower_bound=1)
_SHORT_K2 = flags.DEFINE_integer("short_k2", 7, "k2 of the short window.",
                                 lower_bound=1)
_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Adam's rate.")
_METHODS = flags.DEFINE_list(
    "methods", ["bptt", "tbptt_short", "tbptt_k", "rtrl", "snap1", "uoro"],
    "Settings to run (bptt, tbptt_k, tbptt_short, rtrl, snap1, uoro).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/online.json",
                           "Results JSON (the PNG goes next to it).")
_COST = flags.DEFINE_bool("cost", False, "Measure the cost per step only.")
_COST_OUT = flags.DEFINE_string(
    "cost_out", "benchmarks/results/online_cost.json", "Cost JSON.")
_COST_TIME = flags.DEFINE_integer("cost_time", 50,
                                  "Steps of the timed sequence.")
_COST_REPEATS = flags.DEFINE_integer("cost_repeats", 5, "Timed rounds.")

_EVAL_STEPS = 2000


def levels(lag1_weight=0.5, lag2_weight=0.25) -> dict:
  """The cross-entropy (nats) of the best predictor that remembers nothing,
  lag 1 only, or both lags."""
  h = lambda p: -(p * np.log(p) + (1 - p) * np.log(1 - p)) if 0 < p < 1 else 0
  cases = [(a, b) for a in (0, 1) for b in (0, 1)]
  y = {c: 0.5 + lag1_weight * c[0] - lag2_weight * c[1] for c in cases}
  # Cross-entropy is linear in the target: the best prediction is E[y | memory].
  ce = lambda p, targets: float(np.mean([-(t * np.log(p) + (1 - t) *
                                           np.log(1 - p)) for t in targets]))
  mean = float(np.mean(list(y.values())))
  by_first = {a: float(np.mean([y[(a, b)] for b in (0, 1)])) for a in (0, 1)}
  return {"no memory": ce(mean, list(y.values())),
          "lag 1 only": float(np.mean([ce(by_first[a], [y[(a, b)]
                                                        for b in (0, 1)])
                                       for a in (0, 1)])),
          "both lags": float(np.mean([h(v) for v in y.values()]))}


def add_task(steps: int, seed: int, lag1: int, lag2: int):
  """One stream: coin flips `[steps, 1]` and targets `[steps, 1]`."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 2, size=steps + lag2).astype("float32")
  y = 0.5 + 0.5 * x[lag2 - lag1:steps + lag2 - lag1] - 0.25 * x[:steps]
  return x[lag2:, None], y[:, None].astype("float32")


def _setting_args(name: str) -> dict:
  k = _K.value
  return {"bptt": dict(tbptt=(k, _BPTT_K2.value)),
          "tbptt_k": dict(tbptt=(k, k)),
          "tbptt_short": dict(tbptt=(k, _SHORT_K2.value)),
          "rtrl": dict(online="rtrl"), "snap1": dict(online="snap1"),
          "uoro": dict(online="uoro")}[name]


def label(name: str) -> str:
  k = _K.value
  return {"bptt": f"BPTT (k2={_BPTT_K2.value})", "tbptt_k": f"TBPTT({k},{k})",
          "tbptt_short": f"TBPTT({k},{_SHORT_K2.value})", "rtrl": "RTRL",
          "snap1": "SnAp-1", "uoro": "UORO"}[name]


class _Losses(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.losses = []
    self.times = []

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time_lib.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time_lib.perf_counter() - self._start)
    self.losses.append(float(logs["loss"]))


def train(name: str, seed: int) -> dict:
  """One run of setting `name`: the same streams and weights for a seed."""
  k, rows = _K.value, _ROWS.value
  steps = _UPDATES.value * k
  x, y = add_task(steps * rows, seed, _LAG1.value, _LAG2.value)
  val_x, val_y = add_task(_EVAL_STEPS * rows, 10_000 + seed, _LAG1.value,
                          _LAG2.value)
  keras.utils.set_random_seed(seed)
  cell = keras.layers.GRUCell(_UNITS.value)
  head = keras.layers.Dense(1)
  trainer = stepper.Trainer(
      cell, head, loss=keras.losses.BinaryCrossentropy(from_logits=True),
      optimizer=keras.optimizers.Adam(_RATE.value), stream=True,
      **_setting_args(name))
  losses = _Losses()
  trainer.fit(stepper.data.streams(x, y, batch_size=rows, window=k),
              callbacks=[losses], verbose=0)
  tail = max(1, len(losses.losses) // 10)
  val = trainer.evaluate(stepper.data.streams(val_x, val_y, batch_size=rows,
                                              window=100))["loss"]
  curve = np.convolve(losses.losses, np.ones(25) / 25, mode="valid")[::25]
  return {"final_loss": float(np.mean(losses.losses[-tail:])),
          "val_loss": val, "updates": trainer.global_step,
          "seconds_per_update": statistics.median(losses.times[1:] or
                                                  losses.times),
          "curve": [round(float(v), 4) for v in curve]}


# Cost per step.

class MinGru:
  """An elementwise recurrence (minGRU, Feng et al. 2024: gates from the
  input only), whose state Jacobian is diagonal."""

  def __init__(self, units: int, features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    init = lambda *shape: tf.Variable(
        rng.normal(size=shape, scale=shape[0] ** -0.5).astype("float32"))
    self.variables = [init(features, units), init(1, units),
                      init(features, units), init(1, units)]

  def __call__(self, x, states):
    wz, bz, wh, bh = self.variables
    z = tf.sigmoid(x @ wz + bz)
    h = (1 - z) * states[0] + z * (x @ wh + bh)
    return h, [h]


def _cost_call(method: str, kind: str):
  """One `gradients` call on the benchmark's batch: a GRU (a dense state
  Jacobian) or a minGRU (a diagonal one) of `--units`, a Dense readout."""
  keras.utils.set_random_seed(0)
  rows, time = _ROWS.value, _COST_TIME.value
  x, y = add_task(time * rows, 0, _LAG1.value, _LAG2.value)
  x = tf.constant(x.reshape(rows, time, 1))
  y = tf.constant(y.reshape(rows, time, 1))
  loss = keras.losses.BinaryCrossentropy(from_logits=True)
  head = keras.layers.Dense(1)
  kwargs = {}
  if kind == "gru":
    step = keras.layers.GRUCell(_UNITS.value)
  else:
    step = MinGru(_UNITS.value, 1)
    head.build((None, _UNITS.value))
    kwargs = dict(variables=step.variables + head.trainable_variables,
                  initial_states=[tf.zeros([rows, _UNITS.value])])
  return lambda: stepper.online.gradients(step, x, y, loss, method=method,
                                          head=head, seed=0, **kwargs)


def _peak_memory_child(spec: str) -> None:
  """In a child with the BFC allocator: the peak bytes of one call."""
  call = _cost_call(*spec.split(":"))
  call()
  tf.config.experimental.reset_memory_stats("CPU:0")
  in_use = tf.config.experimental.get_memory_info("CPU:0")["current"]
  call()
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  print(json.dumps({"peak_mb": (peak - in_use) / 2 ** 20}))


def cost(methods: list[str], kind: str) -> dict:
  """Time per step (interleaved rounds) and peak memory (subprocesses)."""
  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  calls = {m: _cost_call(m, kind) for m in methods}
  for call in calls.values():
    call()  # Traced.
  times = {m: [] for m in methods}
  for _ in range(_COST_REPEATS.value):
    for m, call in calls.items():
      start = time_lib.perf_counter()
      _, grads = call()
      float(tf.add_n([tf.reduce_sum(g) for g in grads]))
      times[m].append(time_lib.perf_counter() - start)
  report = {}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for m in methods:
    flags_ = [f"--{f}={getattr(flags.FLAGS, f)}" for f in (
        "units", "rows", "cost_time", "lag1", "lag2")]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.online",
         f"--memory_child={m}:{kind}"] + flags_, env=memory.child_env(),
        cwd=root, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    peak = json.loads(lines[-1])["peak_mb"] if lines else None
    per_step = statistics.median(times[m]) / _COST_TIME.value
    report[m] = {"ms_per_step": 1e3 * per_step, "peak_mb": peak}
  base = report.get("bptt")
  for m, r in report.items():
    if base:
      r["time_vs_bptt"] = r["ms_per_step"] / base["ms_per_step"]
      if r["peak_mb"] and base["peak_mb"]:
        r["memory_vs_bptt"] = r["peak_mb"] / base["peak_mb"]
  return report


_MEMORY_CHILD = flags.DEFINE_string("memory_child", None,
                                    "Internal: measure one method's memory.")


def main(argv):
  del argv
  if _MEMORY_CHILD.value:
    _peak_memory_child(_MEMORY_CHILD.value)
    return
  config = dict(units=_UNITS.value, rows=_ROWS.value, k=_K.value,
                updates=_UPDATES.value, lag1=_LAG1.value, lag2=_LAG2.value,
                bptt_k2=_BPTT_K2.value, short_k2=_SHORT_K2.value,
                learning_rate=_RATE.value, cpus=os.cpu_count(),
                tensorflow=tf.__version__)
  if _COST.value:
    methods = ["bptt", "rtrl", "snap1", "uoro"]
    report = dict(config=dict(config, time=_COST_TIME.value,
                              repeats=_COST_REPEATS.value),
                  gru=cost(methods, "gru"), mingru=cost(methods, "mingru"))
    os.makedirs(os.path.dirname(_COST_OUT.value) or ".", exist_ok=True)
    with open(_COST_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    for kind in ("gru", "mingru"):
      print(kind)
      print(cost_table(report[kind]))
    return
  settings = {label(m): (lambda seed, m=m: train(m, seed))
              for m in _METHODS.value}
  results = experiment.run(settings, seeds=_SEEDS.value, path=_OUT.value,
                           config=config)
  print("levels (nats):", {k: round(v, 3) for k, v in levels().items()})
  baseline = label("bptt") if "bptt" in _METHODS.value else None
  print(results.table("final_loss", baseline=baseline))
  print(results.table("val_loss", baseline=baseline))
  results.plot(os.path.splitext(_OUT.value)[0] + ".png",
               ylabel="training loss (nats), mean of 25 updates",
               xlabel="update / 25",
               title="additive task: lags "
               f"{_LAG1.value} and {_LAG2.value}")


def cost_table(report: dict) -> str:
  lines = ["| method | ms per step | vs BPTT | peak MB | vs BPTT |",
           "|---|---:|---:|---:|---:|"]
  for m, r in report.items():
    peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.2f}"
    lines.append(f"| {m} | {r['ms_per_step']:.2f} | "
                 f"{r.get('time_vs_bptt', 1.0):.1f}x | {peak} | "
                 f"{r.get('memory_vs_bptt', float('nan')):.1f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)

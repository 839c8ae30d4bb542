r"""Seeded, paired, resumable experiments: the runner behind published results.

An experiment is a set of named *settings*, each a function
`(seed: int) -> dict`, run for several seeds. The function builds its model
and data from the seed and returns its metrics:

    def tbptt_16_64(seed):
      ...train...
      return {"val_bpc": 3.41, "seconds_per_update": 0.07,
              "curve": [5.2, 4.9, ...],    # optional: e.g. loss per update
              "curve_x": [1, 2, ...]}      # optional: its x (default 1, 2..)

* Pairing. Every setting is called with the same seeds, and a setting must
  draw its data (order included) from the seed alone, never from the setting:
  then seed `s` of setting A and seed `s` of setting B saw the same data, and
  their difference is paired. Differences are taken seed by seed, over the
  seeds both settings have.
* Statistics. `summary` gives each setting's mean, sample standard deviation
  (ddof 1), minimum and maximum over seeds. `compare` gives, for each
  setting, the paired differences `setting - baseline` per seed, their mean,
  and a two-sided Student-t confidence interval on the mean difference
  (default 95%: `mean +- t_{0.975, n-1} * sd / sqrt(n)`, `n` paired seeds).
  An interval that contains 0 is a **tie**; otherwise the setting is
  "better" or "worse" than the baseline (`lower_is_better` says which way).
  Fewer than 2 pairs give no interval: verdict "n/a".
* Every run is kept. `run` writes JSON after each (setting, seed) finishes:
  `{"config": ..., "runs": [{"setting", "seed", "metrics": {...},
  "curve": [...]}, ...]}` (atomically, via a temporary file). Given the same
  path again it **resumes**: a (setting, seed) already in the file is not
  rerun, so a long experiment can run in the background (`nohup`) and be
  committed while it goes. A file written with another `config` is refused
  (ValueError) rather than mixed. One process per file.
* Order. Seeds are the outer loop (all settings for seed 0, then seed 1, ...)
  so a half-finished experiment already holds complete pairs.
* Plots. `Results.plot` draws each seed's curve faint and the mean over seeds
  bold, one colour per setting (matplotlib, imported only there).

Usage (the online-estimators and char-LM benchmarks do this):

    from benchmarks import experiment
    results = experiment.run({"A": fn_a, "B": fn_b}, seeds=3,
                             path="benchmarks/results/x.json",
                             config={"units": 128})
    print(results.table("val_bpc", baseline="A"))   # Markdown
    results.plot("benchmarks/results/x.png", ylabel="bits per char")
    experiment.Results.load("benchmarks/results/x.json")  # later

`python -m benchmarks.experiment FILE.json --metric=M --baseline=B` prints
the table of a finished (or half-finished) file.

>>> results = run({"a": lambda s: {"m": 1.0 + s},
...                "b": lambda s: {"m": 1.5 + s + 0.01 * (-1) ** s}},
...               seeds=3, path=None, log=None)
>>> [(c.setting, c.verdict) for c in results.compare("m", baseline="a")]
[('b', 'worse')]
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Setting = Callable[[int], Mapping[str, Any]]

_CURVE = "curve"
_CURVE_X = "curve_x"


def t_quantile(p: float, df: int) -> float:
  """The `p` quantile of Student's t distribution with `df` degrees of freedom.

  Inverts the CDF, the density integrated by Simpson's rule, by bisection
  (accurate to ~1e-9 for `0.5 <= p < 0.9995`): no scipy needed.

  Args:
    p: Probability in `(0, 1)`.
    df: Degrees of freedom, >= 1.

  Returns:
    `x` with `P(T <= x) = p`.

  Raises:
    ValueError: If `p` is not in `(0, 1)` or `df < 1`.

  >>> round(t_quantile(0.975, 2), 4)   # a t table: 4.3027
  4.3027
  """
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1); got {p}.")
  if df < 1:
    raise ValueError(f"df must be >= 1; got {df}.")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  log_scale = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
               - 0.5 * math.log(df * math.pi))

  def cdf(x: float) -> float:
    grid = np.linspace(0.0, x, 4001)  # Simpson: an odd number of points.
    density = np.exp(log_scale - (df + 1) / 2 * np.log1p(grid**2 / df))
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return 0.5 + float(np.dot(weights, density)) * (x / 4000) / 3.0

  low, high = 0.0, 1.0
  while cdf(high) < p:
    low, high = high, 2.0 * high
  for _ in range(60):
    middle = 0.5 * (low + high)
    low, high = (middle, high) if cdf(middle) < p else (low, middle)
  return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Summary:
  """One setting's metric over seeds: mean, sample sd (ddof 1), range."""
  setting: str
  n: int
  mean: float
  sd: float
  low: float
  high: float


@dataclasses.dataclass(frozen=True)
class Comparison:
  """`setting - baseline`, paired by seed, with a t confidence interval.

  `verdict` is "tie" when the interval `[ci_low, ci_high]` contains 0,
  "better"/"worse" otherwise, and "n/a" with fewer than 2 pairs (then the
  interval is NaN).
  """
  setting: str
  baseline: str
  seeds: tuple[int, ...]
  differences: tuple[float, ...]
  mean: float
  ci_low: float
  ci_high: float
  confidence: float
  verdict: str


def paired_interval(differences: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float, float]:
  """Mean and two-sided Student-t interval of paired differences.

  Args:
    differences: One difference per seed, at least 2.
    confidence: Coverage of the interval, in `(0, 1)`.

  Returns:
    `(mean, low, high)`: `mean -+ t_{(1+confidence)/2, n-1} * sd / sqrt(n)`,
    `sd` the sample standard deviation (ddof 1).

  Raises:
    ValueError: With fewer than 2 differences or `confidence` outside (0, 1).

  >>> [round(v, 3) for v in paired_interval([1.0, 2.0, 3.0])]
  [2.0, -0.484, 4.484]
  """
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    raise ValueError(f"differences needs at least 2 values for an interval; "
                     f"got {d.size}.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1); got {confidence}.")
  mean = float(d.mean())
  half = (t_quantile((1.0 + confidence) / 2, d.size - 1)
          * float(d.std(ddof=1)) / math.sqrt(d.size))
  return mean, mean - half, mean + half


@dataclasses.dataclass
class Results:
  """Every run of an experiment: `runs` holds dicts `{"setting", "seed",
  "metrics", "curve"?}`, `config` what the experiment was run with."""
  config: dict
  runs: list[dict]

  @classmethod
  def load(cls, path: str) -> "Results":
    """Reads a file written by `run` (or `save`)."""
    with open(path) as f:
      data = json.load(f)
    return cls(config=data.get("config", {}), runs=data["runs"])

  def save(self, path: str) -> None:
    """Writes the JSON atomically: a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp",
                                     delete=False) as f:
      json.dump(dict(config=self.config, runs=self.runs), f,
                separators=(",", ":"))
    os.replace(f.name, path)

  def settings(self) -> list[str]:
    """Setting names in the order their first run appears."""
    return list(dict.fromkeys(r["setting"] for r in self.runs))

  def done(self, setting: str, seed: int) -> bool:
    return any(r["setting"] == setting and r["seed"] == seed
               for r in self.runs)

  def values(self, setting: str, metric: str) -> dict[int, float]:
    """`seed -> value` of `metric` for `setting`.

    Raises:
      KeyError: If no run of `setting` has `metric`.
    """
    found = {r["seed"]: float(r["metrics"][metric]) for r in self.runs
             if r["setting"] == setting and metric in r["metrics"]}
    if not found:
      raise KeyError(f"No run of setting {setting!r} has metric {metric!r}; "
                     f"settings: {self.settings()}.")
    return found

  def summary(self, metric: str) -> list[Summary]:
    """Mean, sample sd and range over seeds of `metric`, per setting."""
    rows = []
    for setting in self.settings():
      v = np.array(list(self.values(setting, metric).values()))
      rows.append(Summary(setting, v.size, float(v.mean()),
                          float(v.std(ddof=1)) if v.size > 1 else math.nan,
                          float(v.min()), float(v.max())))
    return rows

  def compare(self, metric: str, baseline: str, *,
              lower_is_better: bool = True,
              confidence: float = 0.95) -> list[Comparison]:
    """Each other setting minus `baseline`, paired by seed.

    Args:
      metric: A key of the runs' metrics.
      baseline: The setting every other is compared with.
      lower_is_better: Direction of "better" (True for losses, times).
      confidence: Coverage of the t interval on the mean difference.

    Returns:
      One `Comparison` per setting other than `baseline`, in order.

    Raises:
      KeyError: If `baseline` has no run with `metric`.
    """
    base = self.values(baseline, metric)
    rows = []
    for setting in self.settings():
      if setting == baseline:
        continue
      other = self.values(setting, metric)
      seeds = tuple(sorted(set(base) & set(other)))
      d = tuple(other[s] - base[s] for s in seeds)
      if len(d) < 2:
        mean = float(np.mean(d)) if d else math.nan
        rows.append(Comparison(setting, baseline, seeds, d, mean, math.nan,
                               math.nan, confidence, "n/a"))
        continue
      mean, low, high = paired_interval(d, confidence)
      if low <= 0.0 <= high:
        verdict = "tie"
      else:
        verdict = "better" if (mean < 0) == lower_is_better else "worse"
      rows.append(Comparison(setting, baseline, seeds, d, mean, low, high,
                             confidence, verdict))
    return rows

  def table(self, metric: str, baseline: str | None = None, *,
            lower_is_better: bool = True, digits: int = 3,
            confidence: float = 0.95) -> str:
    """A Markdown table: per setting, seeds, mean +- sd, range, and (with a
    `baseline`) the paired difference with its interval and verdict. A
    verdict whose whole interval rounds to 0 at `digits` says so
    ("worse, by < 0.0005")."""
    fmt = f"{{:.{digits}f}}"
    head = f"| setting | seeds | {metric}: mean ± sd | min – max |"
    rule = "|---|---:|---:|---:|"
    if baseline is not None:
      head += (f" − {baseline}, paired ({100 * confidence:g}% t interval)"
               " | verdict |")
      rule += "---:|---|"
      comparisons = {c.setting: c for c in self.compare(
          metric, baseline, lower_is_better=lower_is_better,
          confidence=confidence)}
    lines = [head, rule]
    for s in self.summary(metric):
      line = (f"| {s.setting} | {s.n} | {fmt.format(s.mean)} ± "
              f"{fmt.format(s.sd)} | {fmt.format(s.low)} – "
              f"{fmt.format(s.high)} |")
      if baseline is not None:
        c = comparisons.get(s.setting)
        if c is None:
          line += " (baseline) | |"
        elif c.verdict == "n/a":
          line += f" {fmt.format(c.mean)} ({len(c.seeds)} pair) | n/a |"
        else:
          # Identical computations in two implementations differ by float
          # rounding: a "better" that small is not a result; say so.
          small = 0.5 * 10.0**-digits
          tiny = (f", by < {small:g}" if c.verdict != "tie" and
                  max(abs(c.ci_low), abs(c.ci_high)) < small else "")
          line += (f" {c.mean:+.{digits}f} [{c.ci_low:+.{digits}f}, "
                   f"{c.ci_high:+.{digits}f}] | {c.verdict}{tiny} |")
      lines.append(line)
    return "\n".join(lines)

  def curves(self, setting: str, key: str = _CURVE) -> dict[int, np.ndarray]:
    """`seed -> curve` of `setting` (runs without a curve left out)."""
    return {r["seed"]: np.asarray(r[key], np.float64) for r in self.runs
            if r["setting"] == setting and key in r}

  def curve_x(self, setting: str) -> np.ndarray | None:
    """The x of `setting`'s curves (`"curve_x"` of its first run that has
    one), or None (then x is 1, 2, ...)."""
    for r in self.runs:
      if r["setting"] == setting and _CURVE_X in r:
        return np.asarray(r[_CURVE_X], np.float64)
    return None

  def plot(self, path: str, *, settings: Sequence[str] | None = None,
           key: str = _CURVE, smooth: int = 1, xlabel: str = "update",
           ylabel: str = "", title: str = "", logy: bool = False) -> bool:
    """Each seed's curve faint, the mean over seeds bold, per setting.

    Args:
      path: The PNG to write.
      settings: Which settings (default: all with a curve), in order.
      key: The run's key holding the curve.
      smooth: Width of a moving average applied to each curve first.
      xlabel, ylabel, title: Axis labels and title.
      logy: A logarithmic y axis.

    Returns:
      False (and no file) if matplotlib is not installed.
    """
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
    except ImportError:
      return False
    matplotlib.use("Agg")  # No display: write the file only.
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [s for s in (settings or self.settings())
             if self.curves(s, key)]
    kernel = np.ones(smooth) / smooth
    for i, setting in enumerate(names):
      color = colors[i % len(colors)]
      curves = [np.convolve(c, kernel, mode="valid")
                for c in self.curves(setting, key).values()]
      n = min(c.size for c in curves)
      x = self.curve_x(setting)
      # A smoothed point stands at its window's last x.
      x = (np.arange(n) + smooth if x is None else x[smooth - 1:])[:n]
      for c in curves:
        axes.plot(x, c[:n], color=color, alpha=0.2, lw=0.8)
      mean = np.mean([c[:n] for c in curves], axis=0)
      axes.plot(x, mean, color=color, lw=2,
                label=f"{setting} (mean of {len(curves)} seeds)")
    if logy:
      axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def run(settings: Mapping[str, Setting], seeds: int | Sequence[int],
        path: str | None, config: Mapping[str, Any] | None = None,
        log: Callable[[str], None] | None = print) -> Results:
  """Runs every setting for every seed, resuming from `path`.

  Args:
    settings: `name -> fn(seed) -> dict`. The dict's `"curve"` (a list of
      floats, e.g. the loss per update) and `"curve_x"` (its x values) are
      kept apart; every other entry is a metric (JSON-serializable; numbers
      for `summary`/`compare`).
    seeds: A count `n` (seeds `0..n-1`) or the seeds themselves.
    path: The JSON file, read first if it exists and written after every
      run; None keeps everything in memory.
    config: What the experiment was run with (sizes, data, versions), stored
      in the file; resuming with a different config raises.
    log: Called with one line per run (None: silent).

  Returns:
    The `Results`, old and new runs.

  Raises:
    ValueError: If `path` holds runs of a different `config`, or `seeds` or
      `settings` is empty.
    TypeError: If a setting returns something other than a mapping.
  """
  seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
  if not seeds:
    raise ValueError("seeds must name at least one seed; got none.")
  if not settings:
    raise ValueError("settings must hold at least one setting; got none.")
  config = json.loads(json.dumps(dict(config or {})))  # As JSON reads it.
  results = Results(config=config, runs=[])
  if path is not None and os.path.exists(path):
    results = Results.load(path)
    if results.config != config:
      raise ValueError(
          f"{path} holds runs with config {results.config}, but this run has "
          f"config {config}. Use another path, or delete the file to start "
          "over.")
  for seed in seeds:
    for name, fn in settings.items():
      if results.done(name, seed):
        continue
      out = fn(seed)
      if not isinstance(out, Mapping):
        raise TypeError(f"Setting {name!r} returned {type(out).__name__}; "
                        "expected a dict of metrics.")
      record = dict(setting=name, seed=seed, metrics={
          k: v for k, v in out.items() if k not in (_CURVE, _CURVE_X)})
      if _CURVE in out:
        record[_CURVE] = [round(float(v), 5) for v in out[_CURVE]]
      if _CURVE_X in out:
        record[_CURVE_X] = [float(v) for v in out[_CURVE_X]]
      results.runs.append(json.loads(json.dumps(record)))
      if path is not None:
        results.save(path)
      if log is not None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items()
                          if isinstance(v, (int, float)))
        log(f"[{name} seed {seed}] {shown}")
  return results


def main(argv: Sequence[str]) -> None:
  """`python -m benchmarks.experiment FILE.json --metric=M [--baseline=B]
  [--higher_is_better]`: the table of a results file."""
  args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "")
              for a in argv[2:])
  results = Results.load(argv[1])
  print(results.table(args["metric"], args.get("baseline"),
                      lower_is_better="higher_is_better" not in args))


if __name__ == "__main__":
  main(sys.argv)

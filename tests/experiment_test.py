"""Tests of the experiment runner `benchmarks/experiment.py` (no TF: seconds)."""

import contextlib
import io
import json
import math
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from benchmarks import experiment

# Two-sided Student-t critical values from a printed t table (independent of
# the code under test): (p, df) -> t_p.
_T_TABLE = {(0.975, 1): 12.706205, (0.975, 2): 4.302653,
            (0.975, 4): 2.776445, (0.975, 9): 2.262157,
            (0.95, 3): 2.353363, (0.995, 5): 4.032143,
            (0.975, 30): 2.042272}


class TQuantileTest(parameterized.TestCase):

  @parameterized.parameters(*_T_TABLE.items())
  def test_matches_t_table(self, key, expected):
    # The table has 6 decimals; the quadrature is good to ~1e-8.
    self.assertAlmostEqual(experiment.t_quantile(*key), expected, delta=1e-6)

  def test_lower_tail_is_symmetric(self):
    self.assertAlmostEqual(experiment.t_quantile(0.025, 2), -4.302653,
                           delta=1e-6)

  @parameterized.parameters((0.0, 3, "p must be in"), (1.5, 3, "p must be in"),
                            (0.9, 0, "df must be >= 1"))
  def test_raises_on_bad_arguments(self, p, df, message):
    with self.assertRaisesRegex(ValueError, message):
      experiment.t_quantile(p, df)


def _results(values: dict[str, list[float]],
             seeds: list[int] | None = None) -> experiment.Results:
  runs = []
  for name, vs in values.items():
    for seed, v in zip(seeds or range(len(vs)), vs):
      runs.append(dict(setting=name, seed=seed, metrics=dict(m=v)))
  return experiment.Results(config={}, runs=runs)


class StatisticsTest(absltest.TestCase):

  def test_interval_matches_hand_computation(self):
    base = [3.45, 3.55, 3.50]
    other = [3.40, 3.52, 3.49]
    d = np.subtract(other, base)  # [-0.05, -0.03, -0.01]
    # By hand: mean -0.03, sd 0.02, t_{0.975,2} from the table.
    half = 4.302653 * 0.02 / math.sqrt(3)
    (c,) = _results(dict(base=base, other=other)).compare("m", "base")
    self.assertEqual(c.seeds, (0, 1, 2))
    np.testing.assert_allclose(c.differences, d, rtol=1e-12)
    np.testing.assert_allclose([c.mean, c.ci_low, c.ci_high],
                               [-0.03, -0.03 - half, -0.03 + half],
                               rtol=1e-6)
    self.assertEqual(c.verdict, "tie")  # [-0.080, +0.020] holds 0.

  def test_verdicts_and_direction(self):
    results = _results(dict(base=[1.0, 2.0, 3.0], low=[0.9, 1.89, 2.9],
                            high=[1.1, 2.11, 3.1], mixed=[1.1, 1.9, 3.0]))
    verdicts = {c.setting: c.verdict for c in results.compare("m", "base")}
    self.assertEqual(verdicts, dict(low="better", high="worse", mixed="tie"))
    verdicts = {c.setting: c.verdict for c in results.compare(
        "m", "base", lower_is_better=False)}
    self.assertEqual(verdicts, dict(low="worse", high="better", mixed="tie"))

  def test_pairs_by_seed_not_by_order(self):
    # `other` is `base + 0.1` seed by seed, but its runs are stored in
    # another order (as after a resume) and it lacks seed 3: pairing by
    # position would give a wide interval around a wrong mean.
    base = _results(dict(base=[1.0, 5.0, 9.0, 7.0])).runs
    other = _results(dict(other=[9.1, 1.1, 5.1]), seeds=[2, 0, 1]).runs
    results = experiment.Results(config={}, runs=base + other)
    (c,) = results.compare("m", "base")
    self.assertEqual(c.seeds, (0, 1, 2))
    np.testing.assert_allclose(c.differences, [0.1] * 3, rtol=1e-9)
    self.assertEqual(c.verdict, "worse")

  def test_one_pair_gives_no_interval(self):
    (c,) = _results(dict(base=[1.0], other=[2.0])).compare("m", "base")
    self.assertEqual(c.verdict, "n/a")
    self.assertTrue(math.isnan(c.ci_low))

  def test_summary_mean_sd_range(self):
    (s,) = _results(dict(a=[1.0, 2.0, 4.0])).summary("m")
    self.assertEqual((s.n, s.low, s.high), (3, 1.0, 4.0))
    self.assertAlmostEqual(s.mean, 7 / 3)
    self.assertAlmostEqual(s.sd, math.sqrt(((1 - 7 / 3)**2 + (2 - 7 / 3)**2
                                            + (4 - 7 / 3)**2) / 2))

  def test_table_marks_ties_and_the_baseline(self):
    table = _results(dict(base=[1.0, 2.0, 3.0], mixed=[1.1, 1.9, 3.0])
                     ).table("m", "base")
    self.assertIn(
        "| base | 3 | 2.000 ± 1.000 | 1.000 – 3.000 | (baseline) |", table)
    self.assertRegex(table, r"\| mixed \| 3 \| .* \| \+0\.000 \[-0\.\d+, "
                     r"\+0\.\d+\] \| tie \|")

  def test_table_flags_differences_below_its_precision(self):
    table = _results(dict(base=[1.0, 2.0, 3.0],
                          same=[1.0 + 1e-7, 2.0 + 1.1e-7, 3.0 + 1e-7])
                     ).table("m", "base")
    self.assertIn("| worse, by < 0.0005 |", table)

  def test_unknown_metric_raises(self):
    with self.assertRaisesRegex(KeyError, "metric 'nope'"):
      _results(dict(a=[1.0])).values("a", "nope")


class RunTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    self.path = os.path.join(directory, "x.json")
    self.calls = []

  def _settings(self):
    def make(name, offset):
      def fn(seed):
        self.calls.append((name, seed))
        return dict(m=offset + seed, curve=[1.0, 0.5, 0.25 + seed])
      return fn
    return dict(a=make("a", 0.0), b=make("b", 1.0))

  def test_every_setting_sees_every_seed_seeds_outermost(self):
    experiment.run(self._settings(), seeds=[3, 5], path=None, log=None)
    self.assertEqual(self.calls, [("a", 3), ("b", 3), ("a", 5), ("b", 5)])

  def test_resume_skips_done_runs_and_json_round_trips(self):
    first = experiment.run(self._settings(), seeds=2, path=self.path,
                           config=dict(units=8), log=None)
    self.assertLen(self.calls, 4)
    self.assertEqual(experiment.Results.load(self.path), first)
    second = experiment.run(self._settings(), seeds=3, path=self.path,
                            config=dict(units=8), log=None)
    self.assertEqual(self.calls[4:], [("a", 2), ("b", 2)])  # Only new ones.
    self.assertEqual(second.runs[:4], first.runs)
    with open(self.path) as f:
      data = json.load(f)
    self.assertEqual(data["config"], dict(units=8))
    self.assertEqual(data["runs"][5], dict(setting="b", seed=2,
                                           metrics=dict(m=3.0),
                                           curve=[1.0, 0.5, 2.25]))

  def test_resume_refuses_another_config(self):
    experiment.run(self._settings(), seeds=1, path=self.path,
                   config=dict(units=8), log=None)
    with self.assertRaisesRegex(ValueError, "holds runs with config"):
      experiment.run(self._settings(), seeds=1, path=self.path,
                     config=dict(units=9), log=None)

  def test_raises_on_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "seeds must name"):
      experiment.run(self._settings(), seeds=[], path=None)
    with self.assertRaisesRegex(TypeError, "returned float"):
      experiment.run(dict(a=lambda s: 1.0), seeds=1, path=None)

  def test_plot_and_command_line_table(self):
    results = experiment.run(self._settings(), seeds=2, path=self.path,
                             log=None)
    png = os.path.join(os.path.dirname(self.path), "x.png")
    self.assertTrue(results.plot(png, smooth=2))
    results.runs[0]["curve_x"] = [2, 4, 6]  # Setting "a" has its own x.
    np.testing.assert_array_equal(results.curve_x("a"), [2, 4, 6])
    self.assertIsNone(results.curve_x("b"))
    self.assertTrue(results.plot(png, smooth=2))
    with open(png, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      experiment.main(["experiment", self.path, "--metric=m",
                       "--baseline=a"])
    self.assertEqual(out.getvalue().strip(), results.table("m", "a"))


if __name__ == "__main__":
  absltest.main()

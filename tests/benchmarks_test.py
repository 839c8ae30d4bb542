"""Smoke tests of the benchmark app (`benchmarks/`): tiny flags, no timing."""

import json
import os
import subprocess
import sys

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from benchmarks import instances
from benchmarks import memory
from benchmarks import remat as remat_bench
from benchmarks import report
from benchmarks import rnn
from benchmarks import stdlib_text
from benchmarks import stream_lstm
from benchmarks import timing
from benchmarks import variants
from stepper import testing

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = variants.Config("tiny", batch=2, time=5, units=3, features=4)
# Every variant that runs the shared cell with full gradients ('truncate'
# cuts them on purpose).
_LOOPS = ("keras_rnn", "eager_loop", "tf_scan", "stepper", "stepper_xla",
          "stepper_unroll4", "stepper_xla_unroll4", "stepper_plain",
          "stepper_plain_xla", "while_loop_xla", "run_chunks_through",
          "stepper_hoist", "stepper_hoist_xla")


class VariantsTest(parameterized.TestCase):

  def test_every_variant_is_paired_with_the_loop_of_its_own_step(self):
    for name in variants.NAMES:
      expected = ("while_loop_gru" if "_gru" in name  # keras_gru too.
                  else "while_loop_model" if "_model" in name
                  else "while_loop")
      self.assertEqual(variants.floor_of(name), expected, name)

  @parameterized.named_parameters((name, name) for name in _LOOPS)
  def test_loop_variant_matches_hand_written_loop(self, name):
    # The benchmark compares loops around one cell: each must compute the same
    # loss and gradients as the floor, or the timings compare unlike work.
    cell = variants.make_cell(_TINY)
    x = variants.make_inputs(_TINY)
    expected = variants.build("while_loop", _TINY, cell, 2).train(x)
    actual = variants.build(name, _TINY, cell, 2).train(x)
    testing.assert_nests_close(actual, expected, rtol=1e-5, atol=1e-7)

  def test_build_raises_on_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, "Unknown variant 'nope'"):
      variants.build("nope", _TINY, variants.make_cell(_TINY), 2)


class RunTest(tf.test.TestCase):

  def test_run_reports_every_variant_and_the_sweep(self):
    options = rnn.Options(
        configs=["tiny"], variants=["while_loop", "stepper", "keras_lstm"],
        modes=["train", "infer"], repeats=2, warmup=1, sweep=True,
        sweep_config="tiny", sweep_times=[4, 8],
        sweep_variants=["while_loop", "stepper"], sweep_repeats=1)
    results = rnn.run(options)
    json.dumps(results)  # JSON-able.
    entry = results["configs"]["tiny"]["variants"]
    self.assertEqual(list(entry), ["while_loop", "stepper", "keras_lstm"])
    for name in entry:
      for mode in ("train", "infer"):
        self.assertLen(entry[name][mode]["times_s"], 2)
        self.assertGreater(entry[name][mode]["median_s"], 0)
    self.assertEqual(entry["while_loop"]["train"]["ratio_median"], 1.0)
    sweep = results["sweep"]["variants"]["stepper"]
    self.assertLen(sweep["per_step_us"], 2)
    self.assertIn("time_exponent", sweep)
    self.assertEqual(
        results["entry_overhead"]["traces_for_3_shapes_with_input_signature"],
        1)
    table = report.markdown(results)
    self.assertIn("| stepper |", table)
    self.assertIn("time exponent", table)

  def test_processes_are_pooled(self):
    options = rnn.Options(configs=["tiny"], variants=["while_loop", "stepper"],
                          modes=["train"], repeats=2, warmup=1, processes=2)
    results = rnn.run(options)
    entry = results["configs"]["tiny"]["variants"]
    for name in ("while_loop", "stepper"):
      train = entry[name]["train"]
      self.assertEqual(train["processes"], 2)
      self.assertLen(train["times_s"], 4)
      self.assertLen(train["process_ratio_medians"], 2)
      self.assertBetween(train["ratio_median"], train["ratio_min"] * 0.5,
                         train["ratio_max"] * 2)
    self.assertEqual(entry["while_loop"]["train"]["ratio_median"], 1.0)
    self.assertIn("2 fresh processes", report.markdown(results))

  def test_run_raises_on_no_processes(self):
    options = rnn.Options(configs=["tiny"], variants=["while_loop"],
                          modes=["train"], processes=0)
    with self.assertRaisesRegex(ValueError, "`processes` must be a positive "
                                "int .*; got 0"):
      rnn.run(options)

  def test_pool_spans_per_process_medians(self):
    pooled = timing.pool(
        [{"first_call_s": 1.0, "times_s": [2.0, 2.0, 2.0]},
         {"first_call_s": 3.0, "times_s": [1.0, 1.0, 1.0]}],
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    self.assertEqual(pooled["process_ratio_medians"], [2.0, 1.0])
    self.assertEqual((pooled["ratio_min"], pooled["ratio_max"]), (1.0, 2.0))
    self.assertEqual(pooled["first_call_s"], 3.0)
    self.assertEqual(pooled["min_s"], 1.0)

  def test_memory_measures_a_variant_in_a_subprocess(self):
    result = memory.measure("stepper", "tiny", 6, runs=1)
    self.assertNotIn("error", result)
    self.assertGreater(result["call_peak_mb"], 0)
    self.assertGreater(result["rss_lifetime_peak_mb"], result["call_peak_mb"])

  def test_memory_reports_xla_plan_for_xla_variants(self):
    result = memory.measure("stepper_xla", "tiny", 6, runs=1)
    self.assertNotIn("error", result)
    self.assertGreater(result["xla_plan_mb"], 0)
    # The allocator's count rounds XLA's one buffer up, never down.
    self.assertLessEqual(result["xla_plan_mb"], result["call_peak_mb"])
    self.assertIn(", plan ", report._mb(result))

  def test_xla_plan_counts_temporaries_and_results_not_arguments(self):
    dump = self.get_temp_dir()
    with open(os.path.join(dump, "m.buffer-assignment.txt"), "w") as f:
      f.write("allocation 0: size 1000, parameter 0, shape |f32[250]|:\n"
              " value: ...\n"
              "allocation 1: size 64, maybe-live-out:\n"
              "allocation 2: size 4, constant:\n"
              "allocation 3: size 4, thread-local:\n"
              "allocation 4: size 300, preallocated-temp:\n")
    with open(os.path.join(dump, "n.buffer-assignment.txt"), "w") as f:
      f.write("allocation 0: size 10, preallocated-temp:\n")
    self.assertEqual(memory.xla_plan_bytes(dump), 364)
    self.assertIsNone(memory.xla_plan_bytes(os.path.join(dump, "none")))

  def test_app_writes_json_table_and_readme(self):
    tmp = self.get_temp_dir()
    readme = os.path.join(tmp, "README.md")
    with open(readme, "w") as f:
      f.write(f"# title\n{report.START}\nold\n{report.END}\nkept\n")
    output = os.path.join(tmp, "out", "cpu.json")
    subprocess.run(
        [sys.executable, "-m", "benchmarks.rnn", "--configs=tiny",
         "--variants=while_loop,stepper", "--modes=train", "--repeats=1",
         "--warmup=1", f"--output={output}", "--update_readme",
         f"--readme={readme}"],
        cwd=_ROOT, check=True, capture_output=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    with open(output) as f:
      self.assertIn("tiny", json.load(f)["configs"])
    with open(readme) as f:
      text = f.read()
    self.assertStartsWith(text, "# title\n")
    self.assertEndsWith(text, f"{report.END}\nkept\n")
    self.assertIn("| stepper |", text)
    self.assertNotIn("old", text)

  def test_char_lm_smoke_run_writes_json_table_and_plots(self):
    output = os.path.join(self.get_temp_dir(), "lm", "char_lm.json")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.char_lm", "--k1=4",
         "--k2_factors=2", "--updates=3", "--seeds=1", "--batch=2",
         "--units=4", "--embed=3", "--excerpt=300", "--val_chars=600",
         f"--out={output}"],
        cwd=_ROOT, check=True, capture_output=True, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    with open(output) as f:
      runs = json.load(f)["runs"]
    self.assertEqual([(r["setting"], r["seed"]) for r in runs],
                     [("TBPTT(4,8)", 0), ("Keras stateful k=4", 0)])
    for r in runs:  # The same number of updates every way.
      self.assertEqual(r["metrics"]["updates"], 3)
      self.assertLen(r["curve"], 3)
      # Near log2(vocab) = 6.7 bits after so few updates.
      self.assertBetween(r["metrics"]["val_bits"], 4.0, 8.0)
    # One seed: no interval (the runner's tests check those).
    self.assertRegex(result.stdout, r"\| Keras stateful k=4 \| 1 \| .* \| "
                     r"n/a \|")
    self.assertTrue(os.path.exists(output.replace(".json", "_k4.png")))
    self.assertTrue(os.path.exists(output.replace(".json", ".md")))

  def test_stdlib_split_holds_out_whole_file_excerpts(self):
    train, val = stdlib_text.stdlib_split(excerpt=2000, val_chars=20_000,
                                      split_seed=0)
    self.assertGreaterEqual(len(val), 20_000)
    self.assertLess(len(val), 22_000)  # Stops at the first excerpt past it.
    self.assertLessEqual(max(len(e) for e in train), 2000)
    for e in train:  # Whole files: no training excerpt in the validation.
      self.assertNotIn(e, val)
    again = stdlib_text.stdlib_split(2000, 20_000, 0)
    self.assertEqual(again, (train, val))
    # A seed fixes the order: the same for every setting, not across seeds.
    n = sum(len(e) for e in train)
    ids = [stdlib_text.training_ids(train, seed, n) for seed in (0, 0, 1)]
    np.testing.assert_array_equal(ids[0], ids[1])
    self.assertFalse(np.array_equal(ids[0], ids[2]))
    np.testing.assert_array_equal(np.sort(ids[0]), np.sort(ids[2]))

  def test_delay_stream_targets_are_the_inputs_lag_back(self):
    x, y = stream_lstm.delay_stream(50, 6, 4, np.random.default_rng(0))
    self.assertEqual((x.shape, y.shape), ((50,), (50,)))
    np.testing.assert_array_equal(y[6:], x[:-6])
    self.assertEqual(set(np.unique(x)), {1, 2, 3, 4})

  def test_update_readme_raises_on_missing_markers(self):
    readme = os.path.join(self.get_temp_dir(), "README.md")
    with open(readme, "w") as f:
      f.write("no markers\n")
    with self.assertRaisesRegex(ValueError, "has no <!-- benchmark:start -->"):
      report.update_readme(readme, "table")



class RematBenchmarkTest(tf.test.TestCase):

  def test_points_run_in_subprocesses_and_make_a_table(self):
    results = [
        remat_bench._run_child(dict(loss=loss, time=6, remat=remat, batch=2,
                                    units=3, features=4, runs=1, xla=False))
        for loss in ("last",) for remat in ("none", "2")]  # (A subprocess
    for result in results:  # costs ~20 s of TF import on 2 loaded cores.)
      self.assertNotIn("error", result)
      self.assertGreater(result["peak_mb"], 0)
    table = remat_bench._table(results)
    self.assertLen(table.strip().splitlines(), 3)  # Header, rule, a row.
    self.assertRegex(table, r"\| last \| 6 \| [\d.]+ / [\d.]+ \| "
                     r"[\d.]+ / [\d.]+ \([\d.]+x, [\d.]+x\) \|")

  def test_xla_points_report_xla_plan(self):
    result = remat_bench._run_child(dict(loss="last", time=6, remat="2",
                                         batch=2, units=3, features=4, runs=1,
                                         xla=True))
    self.assertNotIn("error", result)
    self.assertGreater(result["xla_plan_mb"], 0)


class InstancesTest(tf.test.TestCase):

  def test_every_copy_gets_a_ratio_to_the_first_floor_copy(self):
    ratios = instances.run(_TINY, ["while_loop", "stepper"], copies=2,
                           repeats=2)
    self.assertEqual(list(ratios), ["while_loop#0", "stepper#0",
                                    "while_loop#1", "stepper#1"])
    self.assertEqual(ratios["while_loop#0"], 1.0)
    self.assertTrue(all(r > 0 for r in ratios.values()))


class MatmulSkeletonTest(tf.test.TestCase, parameterized.TestCase):

  def _numpy_skeleton(self, cell, x):
    kernel = cell.kernel.numpy().astype(np.float64)
    recurrent = cell.recurrent_kernel.numpy().astype(np.float64)
    units = recurrent.shape[0]
    xs = np.transpose(x.numpy().astype(np.float64), [1, 0, 2])
    h, zs, hs = np.zeros([xs.shape[1], units]), [], []
    for x_t in xs:
      z = x_t @ kernel + h @ recurrent
      zs.append(z)
      hs.append(h)
      h = np.tanh(z[:, :units])
    dh = np.zeros_like(h)
    d_kernel, d_recurrent = np.zeros_like(kernel), np.zeros_like(recurrent)
    for t in reversed(range(len(xs))):
      dz = zs[t] + np.tile(dh, [1, 4])
      dh = dz @ recurrent.T
      d_kernel += xs[t].T @ dz
      d_recurrent += hs[t].T @ dz
    return [d_kernel, d_recurrent, dh], h

  @parameterized.parameters(False, True)
  def test_skeleton_does_the_matmuls_it_describes(self, jit_compile):
    # The lower bound must do the work it claims, or it bounds nothing.
    cell = variants.make_cell(_TINY)
    x = variants.make_inputs(_TINY)
    expected_train, expected_h = self._numpy_skeleton(cell, x)
    name = "matmul_skeleton_xla" if jit_compile else "matmul_skeleton"
    variant = variants.build(name, _TINY, cell, 2)
    testing.assert_nests_close(variant.train(x), expected_train, rtol=1e-4,
                               atol=1e-5)
    self.assertAllClose(variant.infer(x), expected_h.sum(), rtol=1e-5)


if __name__ == "__main__":
  tf.test.main()

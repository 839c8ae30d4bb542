"""Runs `python -m stepper.demo` with tiny flags, as CI and README do."""

import glob
import json
import os
import subprocess
import sys
import tempfile

import tensorflow as tf

_TINY_FLAGS = ["--updates=6", "--time=6", "--lag=3", "--batch=4",
               "--units=4", "--k_short=2", "--k1=2", "--k2=6",
               "--test_size=8"]
_RUNS = ["full BPTT", "TBPTT(k1=k2=2)", "TBPTT(k1=2,k2=6)"]


def _table(stdout: str) -> dict[str, list[float]]:
  """The final table's rows, `run -> [updates, reach, loss, accuracy,
  seconds]`, and the line under it."""
  lines = stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("run "))
  columns = [c.strip() for c in lines[header].split("|")]
  assert columns == ["run", "updates", "reach", "test loss", "accuracy",
                     "time s"], columns
  rows = {}
  for line in lines[header + 1:header + 1 + len(_RUNS)]:
    cells = [c.strip() for c in line.split("|")]
    rows[cells[0]] = [float(c) for c in cells[1:]]
  return rows, lines[header + 1 + len(_RUNS)]


class DemoTest(tf.test.TestCase):

  def test_demo_writes_plot_logs_and_a_parsable_table(self):
    output_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
    result = subprocess.run(
        [sys.executable, "-m", "stepper.demo", f"--output_dir={output_dir}",
         *_TINY_FLAGS], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])

    table, lesson = _table(result.stdout)
    self.assertEqual(list(table), _RUNS)
    # The same budget of optimizer updates for every run.
    self.assertEqual([row[0] for row in table.values()], [6, 6, 6])
    self.assertEqual([row[1] for row in table.values()], [5, 1, 5])
    self.assertRegex(lesson, r"^lesson: the target needs the input 3 steps "
                     r"back; with the same 6 updates, learned it .*; did "
                     r"not: .*\(reach 1\).*; on this seed, ")
    self.assertIn("ONE seed (--seed=0)", result.stdout)
    self.assertIn("python -m benchmarks.demo_seeds", result.stdout)
    for _, _, loss, accuracy, seconds in table.values():
      self.assertGreater(loss, 0.0)
      self.assertBetween(accuracy, 0.0, 1.0)
      self.assertGreater(seconds, 0.0)
    self.assertIn("vs control 'gru' (float32): PASS", result.stdout)
    self.assertIn(f"outputs in {output_dir}", result.stdout)

    with open(os.path.join(output_dir, "learning_curves.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    for i in range(len(_RUNS)):
      self.assertLen(glob.glob(os.path.join(
          output_dir, "tensorboard", f"{i}_*", "events.out.tfevents.*")), 1)
    with open(os.path.join(output_dir, "results.json")) as f:
      results = json.load(f)
    self.assertTrue(results["verify"]["ok"])
    self.assertEqual([r["curve_updates"] for r in results["runs"]],
                     [[1, 2, 3, 4, 5, 6], [3, 6], [3, 6]])


# `lesson` for three hand-made tables, printed by a fresh process: importing
# stepper.demo defines its absl flags, which clash with other modules' flags
# (benchmarks.remat's --batch) in a shared test process.
_LESSONS = """
from absl import flags
from stepper import demo
flags.FLAGS.mark_as_parsed()  # The defaults: lag 6, 480 updates.
for accuracies in [(1.0, 0.6, 0.95), (1.0, 0.6, 0.7), (1.0, 0.95, 0.95)]:
  print(demo.lesson([dict(run=name, reach=reach, accuracy=a) for
                     (name, reach), a in zip(
                         [("full", 23), ("short", 2), ("long", 9)],
                         accuracies)]))
"""


class LessonTest(tf.test.TestCase):

  def test_lesson_says_whether_reach_splits_the_runs(self):
    result = subprocess.run(
        [sys.executable, "-c", _LESSONS], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    split, *others = result.stdout.splitlines()
    self.assertIn("learned it (accuracy >= 0.9): full (reach 23), long "
                  "(reach 9); did not: short (reach 2); on this seed, exactly "
                  "the runs whose gradient reaches 6 steps back learned it.",
                  split)
    self.assertLen(others, 2)
    for line in others:  # "long" did not learn; "short" learned.
      self.assertEndsWith(line, "on this seed, reaching 6 steps back does "
                          "not separate the runs that learned it from the "
                          "others.")


if __name__ == "__main__":
  tf.test.main()

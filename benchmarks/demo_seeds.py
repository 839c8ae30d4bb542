r"""The demo's comparison (`python -m stepper.demo`) over several seeds.

    python -m benchmarks.demo_seeds                 # 5 seeds, resumes
    python -m benchmarks.demo_seeds --seeds=2 --updates=50 --out=/tmp/d.json

The demo trains a GRU on a delay task three ways (full BPTT, plain TBPTT
shorter than the lag, TBPTT(k1 < k2) reaching the lag) and prints one seed.
This runs the same three runs (the demo's own functions and flags: --updates,
--lag, --k1, ...) for `--seeds` seeds through `benchmarks.experiment`: a
seed draws the data (the same for the three runs) and the weights. Reports
test loss and accuracy as mean +- sd, each run minus the plain TBPTT run
paired by seed (95% t interval; an interval holding 0 is a tie), and the
learning curves (each seed faint, the mean bold). Writes the JSON (resumed
if it exists), a Markdown table and a PNG.
"""

import os
import tempfile

from absl import app
from absl import flags

from benchmarks import experiment
from stepper import demo

_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0..n-1 per run.",
                              lower_bound=1)
_OUT = flags.DEFINE_string(
    "out", "benchmarks/results/demo_seeds.json",
    "JSON results path (resumed if it exists; the table and PNG go next to "
    "it).")

# The demo's flags that shape a run (its --seed and --output_dir do not).
_CONFIG_FLAGS = ("updates", "time", "lag", "batch", "units", "k_short", "k1",
                 "k2", "learning_rate", "test_size")


def main(argv):
  del argv
  logs = tempfile.mkdtemp(prefix="demo_seeds_")  # The runs' TensorBoard.
  runs = demo.runs()

  def setting(index, name, tbptt):
    def fn(seed):
      row = demo.train_one(index, name, tbptt, demo.make_data(seed),
                           os.path.join(logs, str(seed)), seed)
      return dict(test_loss=row["loss"], accuracy=row["accuracy"],
                  seconds=row["seconds"], updates=row["updates"],
                  reach=row["reach"], curve=row["curve"],
                  curve_x=row["curve_updates"])
    return fn

  settings = {name: setting(i, name, tbptt)
              for i, (name, tbptt) in enumerate(runs)}
  config = {f: flags.FLAGS[f].value for f in _CONFIG_FLAGS}
  results = experiment.run(settings, _SEEDS.value, _OUT.value, config)
  baseline = runs[1][0]  # Plain truncation, shorter than the lag.
  text = "\n\n".join([
      results.table("test_loss", baseline, digits=4),
      results.table("accuracy", baseline, lower_is_better=False),
      results.table("seconds", baseline, digits=1)])
  results.plot(os.path.splitext(_OUT.value)[0] + ".png",
               xlabel="optimizer updates", logy=True,
               ylabel="training loss (mean over steps)",
               title=f"demo: delay task, lag {config['lag']}, "
                     f"T={config['time']}, GRU {config['units']}")
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)

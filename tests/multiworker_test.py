"""`Trainer` under `MultiWorkerMirroredStrategy`: two worker processes on
this machine (`TF_CONFIG` with 127.0.0.1 ports only).

Reference: the same training in the test's own process, without a strategy,
on the global batches. After two updates of full BPTT, two batches of TBPTT
and three batches of a stream (TBPTT(2, 3): each worker carries its rows'
state and history across batches) the workers' weights must equal it
(float64; the all-reduce sums the workers' shares in another order, hence
rtol 1e-10 rather than bit equality).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

import stepper

_TIMEOUT_S = 420  # Generous: 2 shared cores, 3 TensorFlow processes.



def train_report(strategy):
  """Trains full BPTT and TBPTT under `strategy` on the same global
  batches; returns the steps and weights of each."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6, 3))
  y = np.cumsum(x[..., :1], axis=1) * 0.5
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).with_options(
      options)
  # Stream: global batch i holds steps [2i, 2i + 2) of 8 streams; the DATA
  # policy splits every global batch alike, so each worker gets the same 4
  # rows of every batch.
  windows = lambda a: np.concatenate(np.split(a[:8], 3, axis=1))
  streams = tf.data.Dataset.from_tensor_slices(
      (windows(x), windows(y))).batch(8).with_options(options)
  report = {}
  for name, tbptt, data in (("full_bptt", None, dataset),
                            ("tbptt", (2, 4), dataset),
                            ("stream", (2, 3), streams)):
    with strategy.scope():
      keras.utils.set_random_seed(0)
      cell = keras.layers.GRUCell(4, dtype="float64")
      head = keras.layers.Dense(1, dtype="float64")
      trainer = stepper.Trainer(cell, head, loss="mse", tbptt=tbptt,
                                strategy=strategy, stream=data is streams,
                                optimizer=keras.optimizers.Adam(1e-2))
    trainer.fit(data, verbose=0)
    report[name] = dict(steps=trainer.global_step, weights=[
        v.numpy().tolist() for v in trainer.trainable_variables])
  report["replicas"] = strategy.num_replicas_in_sync
  return report


# Each worker: the strategy first (it must exist before any TensorFlow op),
# then the run above; one JSON line.
_WORKER = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    sys.path.insert(0, sys.argv[1])
    import multiworker_test
    print(json.dumps(multiworker_test.train_report(strategy)))
""")


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _run_all(envs):
  """Starts one process per env, waits for all (bounded), kills leftovers."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  processes = [subprocess.Popen(
      [sys.executable, "-c", _WORKER, tests_dir], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for env in envs]
  results = []
  try:
    for p in processes:
      out, err = p.communicate(timeout=_TIMEOUT_S)
      results.append((p.returncode, out, err))
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return results


class MultiWorkerTest(tf.test.TestCase):

  def test_two_workers_match_one_process_on_the_global_batch(self):
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                CUDA_VISIBLE_DEVICES="")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    envs = [dict(base, TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers},
         "task": {"type": "worker", "index": i}})) for i in range(2)]
    results = _run_all(envs)
    for returncode, _, err in results:
      self.assertEqual(returncode, 0, err[-3000:])
    worker_0, worker_1 = (json.loads(out.strip().splitlines()[-1])
                          for _, out, _ in results)
    alone = train_report(tf.distribute.get_strategy())
    self.assertEqual(worker_0["replicas"], 2)
    self.assertEqual(alone["replicas"], 1)
    for name, steps in (("full_bptt", 2), ("tbptt", 6), ("stream", 3)):
      self.assertEqual(worker_0[name]["steps"], steps)
      self.assertEqual(alone[name]["steps"], steps)
      for a, b, c in zip(worker_0[name]["weights"], worker_1[name]["weights"],
                         alone[name]["weights"]):
        self.assertAllEqual(np.array(a), np.array(b))
        self.assertAllClose(np.array(a), np.array(c), rtol=1e-10, atol=0)


if __name__ == "__main__":
  tf.test.main()

"""Tests for `stepper.online`: every estimator against an independent reference.

* `rtrl` against `bptt` (a `GradientTape` over `model_rnn`) to 1e-10 in
  float64, for every kind of step, with a mask and with resets; `bptt`
  itself against a Python loop of the step under one tape.
* `snap1` against `rtrl` where the state Jacobian is diagonal (IndRNN and
  minGRU steps), and away from it where it is not.
* `uoro`: the mean of many seeded estimates against `bptt` (a derandomized
  statistical test, its bound written down below).
* The shapes of what `snap1` and `uoro` carry; the seed contract (checks,
  no retrace); errors naming their argument.

Shapes are tiny (batch 2, time 5, units 3, float64): the cost is tracing.
"""

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import stepper
from stepper import online

BATCH, TIME, FEATURES, UNITS = 2, 5, 4, 3
_RTOL = 1e-10  # float64: the methods differ only in summation order.


def _data(seed=0, features=FEATURES, units=UNITS):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(BATCH, TIME, features)))
  y = tf.constant(rng.normal(size=(BATCH, TIME, units)))
  return x, y


def _mse(y_true, y_pred):
  return tf.reduce_mean((y_true - y_pred) ** 2, axis=-1)


def _assert_close(actual, expected, rtol=_RTOL):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    a, e = np.asarray(a), np.asarray(e)
    scale = max(float(np.max(np.abs(e))), 1e-300)
    assert np.max(np.abs(a - e)) <= rtol * scale, (
        f"max |err| {np.max(np.abs(a - e)):.3e} > {rtol} * {scale:.3e}")


def _flat(grads):
  return np.concatenate([np.ravel(g) for g in grads])


class _Python:
  """The reference for `bptt`: the step called in a Python loop under one
  tape, the mean loss over unmasked (row, step) pairs."""

  @staticmethod
  def gradients(call, x, y, states, variables, mask=None, resets=None):
    mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask)
    init = states
    rows = lambda keep, v: tf.reshape(keep, [-1] + [1] * (v.shape.rank - 1))
    with tf.GradientTape() as tape:
      total = 0.0
      for t in range(x.shape[1]):
        if resets is not None:
          r = np.asarray(resets)[:, t]
          states = tf.nest.map_structure(
              lambda i, s: tf.where(rows(r, s), i, s), init, states)
        y_t, new = call(x[:, t], states)
        keep = mask[:, t]
        total += tf.reduce_sum(_mse(y[:, t], y_t) * keep)
        states = tf.nest.map_structure(
            lambda n, s: tf.where(rows(keep, s), n, s), new, states)
      loss = total / mask.sum()
    return loss, tape.gradient(loss, variables)


@functools.lru_cache(maxsize=None)
def _cell(kind):
  """One cell per kind for the whole module: estimators are compiled once
  per step, so tests sharing a cell share its traces."""
  keras.utils.set_random_seed(1)
  cell = {"gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell,
          "simple": keras.layers.SimpleRNNCell}[kind](UNITS, dtype="float64")
  cell.build((None, FEATURES))
  return cell


def _functional_step():
  keras.utils.set_random_seed(2)
  x_t = keras.Input((FEATURES,), dtype="float64")
  h = keras.Input((UNITS,), dtype="float64")
  gru = keras.layers.GRUCell(UNITS, dtype="float64")
  out, new = gru(x_t, [h])
  y_t = keras.layers.Dense(2, dtype="float64")(out)
  return keras.Model([x_t, h], [y_t, new[0]])


class _NestedCallable:
  """A callable with nested states `{"h": [batch, 3], "c": ([batch, 2, 2],)}`
  and one variable the loss never reaches."""

  def __init__(self):
    rng = np.random.default_rng(3)
    self.w = tf.Variable(rng.normal(size=(FEATURES, UNITS)) * 0.5, name="w")
    self.u = tf.Variable(rng.normal(size=(4, UNITS)) * 0.5, name="u")
    self.v = tf.Variable(rng.normal(size=(UNITS, 4)) * 0.5, name="v")
    self.unused = tf.Variable(np.ones(2), name="unused")
    self.variables = [self.w, self.u, self.v, self.unused]

  def __call__(self, x, states):
    c = tf.reshape(states["c"][0], [-1, 4])
    h = tf.tanh(x @ self.w + c @ self.u + 0.5 * states["h"])
    c_new = tf.reshape(tf.sin(h @ self.v) + 0.3 * c, [-1, 2, 2])
    return h, {"h": h, "c": (c_new,)}

  def initial_states(self):
    rng = np.random.default_rng(4)
    return {"h": tf.constant(rng.normal(size=(BATCH, UNITS))),
            "c": (tf.constant(rng.normal(size=(BATCH, 2, 2))),)}


class _Elementwise:
  """Steps whose state Jacobian is diagonal: IndRNN (Li et al. 2018) and a
  minGRU (Feng et al. 2024; gates from the input only)."""

  def __init__(self, kind):
    rng = np.random.default_rng(5)
    self.kind = kind
    self.w = tf.Variable(rng.normal(size=(FEATURES, UNITS)), name="w")
    self.u = tf.Variable(rng.uniform(-1, 1, size=(UNITS,)), name="u")
    self.b = tf.Variable(rng.normal(size=(UNITS,)) * 0.1, name="b")
    self.wz = tf.Variable(rng.normal(size=(FEATURES, UNITS)), name="wz")
    self.variables = [self.w, self.u, self.b] + (
        [self.wz] if kind == "mingru" else [])

  def __call__(self, x, states):
    h = states[0]
    if self.kind == "indrnn":
      new = tf.tanh(x @ self.w + self.u * h + self.b)
    else:
      z = tf.sigmoid(x @ self.wz + self.u)
      new = (1 - z) * h + z * (x @ self.w + self.b)
    return new, [new]


_STATES = [tf.constant(np.random.default_rng(6).normal(size=(BATCH, UNITS)))]


class RtrlEqualsBpttTest(tf.test.TestCase):

  def _check(self, step, x, y, **kwargs):
    loss, exact = online.gradients(step, x, y, _mse, method="bptt", **kwargs)
    loss_r, rtrl = online.gradients(step, x, y, _mse, method="rtrl",
                                    **kwargs)
    self.assertAllClose(loss_r, loss, rtol=_RTOL, atol=0)
    _assert_close(rtrl, exact)
    return exact

  def test_cells(self):
    x, y = _data()
    for kind in ("gru", "lstm", "simple"):
      with self.subTest(kind):
        cell = _cell(kind)
        exact = self._check(cell, x, y)
        # bptt itself against the Python loop of the cell.
        _, loop = _Python.gradients(
            lambda x_t, s: cell(x_t, s), x, y,
            cell.get_initial_state(BATCH), cell.trainable_variables)
        _assert_close(exact, loop)

  def test_functional_step_model_with_head(self):
    x, y = _data(units=1)
    head = keras.layers.Dense(1, dtype="float64")
    exact = self._check(_functional_step(), x, y, head=head)
    self.assertLen(exact, 3 + 2 + 2)  # GRU, the model's Dense, the head.

  def test_callable_with_nested_states_and_an_unreached_variable(self):
    step = _NestedCallable()
    x, y = _data()
    for method in ("bptt", "rtrl", "snap1", "uoro"):
      _, grads = online.gradients(
          step, x, y, _mse, method=method, variables=step.variables,
          initial_states=step.initial_states(), seed=0)
      self.assertAllEqual(grads[-1], np.zeros(2))  # Zeros, not None.
    exact = self._check(step, x, y, variables=step.variables,
                        initial_states=step.initial_states())
    _, loop = _Python.gradients(step, x, y, step.initial_states(),
                                step.variables[:3])
    _assert_close(exact[:3], loop)

  def test_stack(self):
    keras.utils.set_random_seed(7)
    stack = stepper.stack([keras.layers.GRUCell(UNITS, dtype="float64"),
                           keras.layers.SimpleRNNCell(UNITS,
                                                      dtype="float64")])
    x, y = _data()
    stepper.model_rnn(stack, x)  # Builds it.
    self._check(stack, x, y)

  def test_mask_and_resets(self):
    step = _NestedCallable()
    x, y = _data()
    mask = tf.constant([[True, False, True, True, False],
                        [False, True, True, False, True]])
    resets = tf.constant([[False, False, True, False, True],
                          [False, True, False, True, False]])
    kwargs = dict(variables=step.variables,
                  initial_states=step.initial_states())
    # Steps with a mask only, a reset only, and both (row 0, step 4).
    exact = self._check(step, x, y, mask=mask, resets=resets, **kwargs)
    _, loop = _Python.gradients(step, x, y, step.initial_states(),
                                step.variables[:3], mask=mask, resets=resets)
    _assert_close(exact[:3], loop)

  def test_float32(self):
    cell = keras.layers.SimpleRNNCell(UNITS)
    x, y = (tf.cast(v, tf.float32) for v in _data())
    _, exact = online.gradients(cell, x, y, "mse", method="bptt")
    _, rtrl = online.gradients(cell, x, y, "mse", method="rtrl")
    _assert_close(rtrl, exact, rtol=1e-5)

  def test_influence_limit_names_both_numbers(self):
    cell = _cell("simple")  # [batch, state, params] = [2, 3, 24]: 144.
    x, y = _data()
    with self.assertRaisesRegex(ValueError, r"144.*`max_influence` = 100"):
      online.gradients(cell, x, y, _mse, method="rtrl", max_influence=100)
    online.gradients(cell, x, y, _mse, method="rtrl", max_influence=144)


class Snap1Test(tf.test.TestCase):

  def test_equals_rtrl_for_elementwise_recurrences(self):
    x, y = _data()
    for kind in ("indrnn", "mingru"):
      with self.subTest(kind):
        step = _Elementwise(kind)
        kwargs = dict(variables=step.variables, initial_states=_STATES)
        _, rtrl = online.gradients(step, x, y, _mse, method="rtrl", **kwargs)
        _, snap = online.gradients(step, x, y, _mse, method="snap1",
                                   **kwargs)
        _assert_close(snap, rtrl)

  def test_approximates_dense_recurrences_carrying_kept_entries_only(self):
    # A dense state Jacobian: SnAp-1 drops paths through other units, so it
    # is not RTRL but aligned with it (cosine 0.9988 GRU, 0.9984 LSTM here).
    # Each parameter reaches one unit; an LSTM's reach its h and its c,
    # except the output gate's (a quarter of them), which reach h only.
    x, y = _data()
    for kind, kept in (("gru", lambda p: p),
                       ("lstm", lambda p: 2 * p - p // 4)):
      with self.subTest(kind):
        cell = _cell(kind)
        params = sum(int(np.prod(v.shape)) for v in cell.trainable_variables)
        _, rtrl = online.gradients(cell, x, y, _mse, method="rtrl")
        run = online.Estimator(cell, _mse, method="snap1").run(x, y)
        self.assertEqual([tuple(c.shape) for c in run.carry],
                         [(BATCH, kept(params))])
        a, e = _flat(run.grad_sum) / float(run.count), _flat(rtrl)
        self.assertGreater(np.max(np.abs(a - e)) / np.max(np.abs(e)), 1e-3)
        self.assertGreater(a @ e / np.linalg.norm(a) / np.linalg.norm(e),
                           0.9)


class UoroTest(tf.test.TestCase):

  def test_carries_two_rank_one_factors(self):
    cell = _cell("lstm")
    x, y = _data()
    params = sum(int(np.prod(v.shape)) for v in cell.trainable_variables)
    run = online.Estimator(cell, _mse, method="uoro").run(x, y, seed=0)
    self.assertEqual([tuple(c.shape) for c in run.carry],
                     [(BATCH, 2 * UNITS), (BATCH, params)])

  def test_unbiased(self):
    """The mean of N = 300 estimates (seeds 0..299) against bptt.

    Bound: for each of the P = 18 coordinates, |mean - exact| <= 5 standard
    errors of the mean (the sample standard deviation / sqrt(N)). If UORO
    is unbiased each coordinate's z-score is ~N(0, 1) (N = 300: the CLT),
    so a coordinate fails with probability 6e-7 and the test with < 1.1e-5
    (union bound); the seeds are fixed, so the outcome is deterministic
    (max z-score measured: 1.12). A biased estimate (signs drawn from
    {0, 1}, not {-1, 1}) fails. The variance is reported: the total
    variance of one estimate relative to |exact|^2 (measured 1.94 here:
    one estimate's noise is larger than the gradient).
    """
    step = _Elementwise("indrnn")
    x, y = _data()
    kwargs = dict(variables=step.variables[:3], initial_states=_STATES)
    _, exact = online.gradients(step, x, y, _mse, method="bptt", **kwargs)
    exact = _flat(exact)
    estimates = np.array([_flat(online.gradients(
        step, x, y, _mse, method="uoro", seed=seed, **kwargs)[1])
                          for seed in range(300)])
    mean = estimates.mean(0)
    stderr = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    z = np.abs(mean - exact) / stderr
    relative_variance = estimates.var(0).sum() / (exact @ exact)
    print(f"UORO: max z-score {z.max():.2f} over {z.size} coordinates; "
          f"variance of one estimate / |exact|^2 = {relative_variance:.3f}")
    self.assertLess(z.max(), 5.0)
    self.assertGreater(relative_variance, 0.0)  # Not exact: an estimate.


class SeedTest(tf.test.TestCase):

  def test_new_seed_does_not_retrace(self):
    calls = []
    w = tf.Variable(np.eye(UNITS) * 0.5)

    def step(x_t, states):
      calls.append(1)  # Python runs only while tracing.
      h = tf.tanh(x_t[:, :UNITS] + states[0] @ w)
      return h, [h]

    x, y = _data()
    run = lambda seed: online.gradients(
        step, x, y, _mse, method="uoro", variables=[w],
        initial_states=_STATES, seed=seed)
    first = run(1)[1][0]
    traced = len(calls)
    second = run(np.int64(2))[1][0]
    run(None)
    self.assertLen(calls, traced)
    self.assertNotAllClose(first, second)  # A new seed, new signs.
    self.assertAllEqual(first, run(1)[1][0])  # The same seed, the same.

  def test_seed_type_checked_for_every_method(self):
    cell = _cell("simple")
    x, y = _data()
    for method in online.METHODS:
      for seed in (True, 1.5, np.float64(2.0), "3"):
        with self.subTest(method=method, seed=seed):
          with self.assertRaisesRegex(TypeError, r"`seed`.*" +
                                      type(seed).__name__):
            online.gradients(cell, x, y, _mse, method=method, seed=seed)


class ErrorsTest(tf.test.TestCase):

  def test_unknown_method_is_case_sensitive(self):
    cell = _cell("simple")
    x, y = _data()
    for method in ("RTRL", "snap", None):
      with self.assertRaisesRegex(ValueError, r"`method`.*" + str(method)):
        online.gradients(cell, x, y, _mse, method=method)

  def test_callable_needs_variables(self):
    step = _Elementwise("indrnn")
    x, y = _data()
    for method in online.METHODS:
      with self.assertRaisesRegex(ValueError, r"`variables` is required"):
        online.gradients(step, x, y, _mse, method=method,
                         initial_states=_STATES)

  def test_method_that_cannot_handle_integer_states(self):
    w = tf.Variable(np.ones([FEATURES, UNITS]))

    def counting(x_t, states):
      return tf.tanh(x_t @ w), [states[0] + 1]

    x, y = _data()
    kwargs = dict(variables=[w], initial_states=[tf.zeros([BATCH], tf.int32)])
    online.gradients(counting, x, y, _mse, method="bptt", **kwargs)
    with self.assertRaisesRegex(ValueError, r"`method` 'snap1' cannot "
                                r"handle.*int32"):
      online.gradients(counting, x, y, _mse, method="snap1", **kwargs)


class AlignmentTest(tf.test.TestCase):

  def test_report_against_its_definition(self):
    cell = _cell("gru")  # Shares the traces of the tests above.
    x, y = _data()
    report = stepper.verify.alignment(cell, x, y, _mse,
                                      methods=["rtrl", "snap1"],
                                      tbptt=[(TIME, TIME), (1, 1)])
    _, exact = online.gradients(cell, x, y, _mse, method="bptt")
    _, snap = online.gradients(cell, x, y, _mse, method="snap1")
    a, e = _flat(snap), _flat(exact)
    row = report.row("snap1")
    self.assertAllClose(row.cosine, a @ e / np.linalg.norm(a) /
                        np.linalg.norm(e), rtol=1e-12)
    self.assertAllClose(row.relative_error,
                        np.linalg.norm(a - e) / np.linalg.norm(e), rtol=1e-12)
    kernel = report.row("snap1", cell.trainable_variables[0].path)
    self.assertAllClose(kernel.cosine, _flat(snap[:1]) @ _flat(exact[:1]) /
                        np.linalg.norm(snap[0]) / np.linalg.norm(exact[0]))
    # Exact estimators: RTRL, and a window covering the whole sequence.
    for exact_one in ("rtrl", f"tbptt({TIME}, {TIME})"):
      self.assertLess(report.row(exact_one).relative_error, 1e-10)
    # TBPTT(1, 1) against its updates summed by hand (each one step).
    updates = stepper.tbptt.updates(cell, x, y, _mse, k1=1, k2=1)
    by_hand = sum(_flat(g) for _, g in updates) / TIME
    self.assertAllClose(report.row("tbptt(1, 1)").relative_error,
                        np.linalg.norm(by_hand - e) / np.linalg.norm(e),
                        rtol=1e-10)
    self.assertLess(report.row("tbptt(1, 1)").cosine, 0.999)
    self.assertLen(report.rows, 4 * (1 + len(exact)))
    as_dict = json.loads(json.dumps(report.to_dict()))
    self.assertEqual(as_dict["rows"][0]["estimator"], "rtrl")
    self.assertIn("tbptt(1, 1)", str(report))

  def test_bad_arguments(self):
    cell = _cell("gru")
    x, y = _data()
    with self.assertRaisesRegex(ValueError, r"`method`.*'SnAp1'"):
      stepper.verify.alignment(cell, x, y, _mse, methods=["SnAp1"])
    with self.assertRaisesRegex(ValueError, r"`tbptt`.*\(3, 2\)"):
      stepper.verify.alignment(cell, x, y, _mse, methods=[], tbptt=[(3, 2)])


class TrainerOnlineTest(tf.test.TestCase):
  """`Trainer(online=..., stream=True)` against a Python RTRL written here
  (per-variable influences, eager tapes per step), and resumed runs."""

  RATE = 0.25

  @staticmethod
  def _model(seed=0):
    keras.utils.set_random_seed(seed)
    cell = keras.layers.SimpleRNNCell(UNITS, dtype="float64")
    cell.build((None, 2))
    head = keras.layers.Dense(1, dtype="float64")
    head.build((None, UNITS))
    return cell, head

  @staticmethod
  def _stream(n=24, rows=2, window=3):
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(n, 1))
    resets = rng.random(n) < 0.15
    return stepper.data.streams(x, y, resets=resets, batch_size=rows,
                                window=window)

  def _python_rtrl(self, cell, head, dataset, batches):
    """SGD on RTRL's gradient, one update per batch, influence carried."""
    h = tf.zeros([2, UNITS], tf.float64)
    cell_vars = cell.trainable_variables
    variables = cell_vars + head.trainable_variables
    m = [tf.zeros([2, UNITS] + v.shape.as_list(), tf.float64)
         for v in cell_vars]
    for x, y, resets in dataset.take(batches):
      grads = [tf.zeros_like(v) for v in variables]
      for t in range(x.shape[1]):
        r = resets[:, t]
        h = tf.where(r[:, None], tf.zeros_like(h), h)
        m = [tf.where(tf.reshape(r, [-1] + [1] * (mi.shape.rank - 1)),
                      tf.zeros_like(mi), mi) for mi in m]
        with tf.GradientTape(persistent=True) as tape:
          tape.watch(h)
          out, new = cell(x[:, t], [h])
          loss = tf.reduce_sum(_mse(y[:, t], head(out)))
        dl_dh = tape.gradient(loss, h)
        direct = tape.gradient(loss, variables,
                               unconnected_gradients="zero")
        # Without pfor: a Python loop over 6 outputs beats vectorizing.
        jac = tape.batch_jacobian(new[0], h, experimental_use_pfor=False)
        imm = [tape.jacobian(new[0], v, experimental_use_pfor=False)
               for v in cell_vars]
        carried = [tf.einsum("bs,bs...->...", dl_dh, mi) for mi in m]
        carried += [0.0] * len(head.trainable_variables)
        grads = [g + d + c for g, d, c in zip(grads, direct, carried)]
        m = [tf.einsum("bij,bj...->bi...", jac, mi) + ii
             for mi, ii in zip(m, imm)]
        h = new[0]
      count = float(x.shape[0] * x.shape[1])
      for v, g in zip(variables, grads):
        v.assign_sub(self.RATE * g / count)
    return [v.numpy() for v in variables]

  def _trainer(self, method, seed=0, **kwargs):
    cell, head = self._model(seed)
    return stepper.Trainer(cell, head, loss=_mse, stream=True, online=method,
                           optimizer=keras.optimizers.SGD(self.RATE),
                           **kwargs)

  def test_rtrl_matches_python_rtrl_across_batches_and_resets(self):
    dataset = self._stream()
    trainer = self._trainer("rtrl")
    trainer.fit(dataset, steps=3, verbose=0)
    self.assertEqual(trainer.global_step, 3)
    expected = self._python_rtrl(*self._model(), dataset, 3)
    _assert_close([v.numpy() for v in trainer.trainable_variables],
                  expected)

  def test_resumed_run_matches_uninterrupted_bit_for_bit(self):
    dataset = self._stream()
    uninterrupted = self._trainer("uoro")
    uninterrupted.fit(dataset, steps=4, verbose=0)
    directory = os.path.join(self.get_temp_dir(), "online_resume")
    first = self._trainer("uoro", checkpoint_dir=directory)
    first.fit(dataset, steps=2, verbose=0)
    resumed = self._trainer("uoro", seed=1, checkpoint_dir=directory)
    resumed.fit(dataset, steps=2, verbose=0)
    self.assertEqual(resumed.global_step, 4)
    for a, b in zip(resumed.trainable_variables,
                    uninterrupted.trainable_variables):
      self.assertAllEqual(a, b)

  def test_online_arguments(self):
    cell, head = self._model()
    make = lambda **kw: stepper.Trainer(
        cell, head, loss=_mse, optimizer=keras.optimizers.SGD(0.1), **kw)
    for kwargs, pattern in (
        (dict(online="rtrl"), r"`online`='rtrl' needs `stream`=True"),
        (dict(online="snap1", stream=True, tbptt=(2, 2)),
         r"`online`='snap1' and `tbptt`=\(2, 2\)"),
        (dict(online="bptt", stream=True), r"`online`='bptt'"),
        (dict(online="RTRL", stream=True), r"`online`.*'RTRL'")):
      with self.subTest(**kwargs):
        with self.assertRaisesRegex(ValueError, pattern):
          make(**kwargs)


if __name__ == "__main__":
  pytest.main([__file__])

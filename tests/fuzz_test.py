"""Differential fuzz (hypothesis, derandomized): `model_rnn` against
`keras.layers.RNN`, and `run_chunks(gradient="through")` against one
`model_rnn` call, over the options that combine.

Reference for `model_rnn`: Keras `RNN` over a copy of the cell with the same
weights, float64, comparing outputs, final states and the gradients of one
loss w.r.t. the inputs, the initial states and the weights (rtol 1e-10).
Keras' `go_backwards` returns outputs in reversed time order; stepper
returns them in the input's order, so Keras' are flipped before comparing.
For `sequence_length` (`tf.nn.dynamic_rnn` semantics) the reference is Keras
over the inputs with each row's valid part reversed (numpy) when `reverse`,
masked by `sequence_mask(lengths)`, with zero outputs where masked; the
outputs are then reversed back row by row.

Reference for `run_chunks`: one `model_rnn` call over the whole sequence.
"""

import hypothesis
from hypothesis import strategies as st
import keras
import numpy as np
import tensorflow as tf

import stepper
from stepper import testing

FEATURES, UNITS = 2, 3
_RTOL = 1e-10
# No "explain" phase: its line tracer breaks inside TensorFlow's gradient.
_SETTINGS = dict(derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(hypothesis.HealthCheck),
                 phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate,
                         hypothesis.Phase.shrink])
_KINDS = {"simple_rnn": keras.layers.SimpleRNNCell,
          "gru": keras.layers.GRUCell, "lstm": keras.layers.LSTMCell}


def _cells():
  """One stepper cell and one Keras reference cell per kind, equal weights."""
  pairs = {}
  for kind, cls in _KINDS.items():
    keras.utils.set_random_seed(0)
    cell = cls(UNITS, dtype="float64")
    reference = cls(UNITS, dtype="float64")
    cell.build((None, FEATURES))
    reference.build((None, FEATURES))
    for dst, src in zip(reference.weights, cell.weights):
      dst.assign(src)
    pairs[kind] = (cell, reference)
  return pairs


_CELLS = _cells()


@st.composite
def _problems(draw):
  """A random run: the cell, shapes, data and every option."""
  p = dict(kind=draw(st.sampled_from(sorted(_KINDS))),
           batch=draw(st.sampled_from([1, 2, 3])),
           time=draw(st.sampled_from([0, 1, 2, 3, 5])),
           masking=draw(st.sampled_from(["none", "mask", "lengths"])),
           zero_output=draw(st.booleans()),
           reverse=draw(st.booleans()),
           return_sequences=draw(st.booleans()),
           unroll=draw(st.sampled_from([1, 2, 3])),
           time_major=draw(st.booleans()),
           remat=draw(st.sampled_from([None, 1, 2, "sqrt"])),
           seed=draw(st.integers(0, 2**16)))
  rng = np.random.default_rng(p["seed"])
  batch, time = p["batch"], p["time"]
  p["x"] = rng.standard_normal([batch, time, FEATURES])
  p["states"] = [rng.standard_normal([batch, UNITS])
                 for _ in range(2 if p["kind"] == "lstm" else 1)]
  p["mask"] = p["lengths"] = None
  if p["masking"] == "mask":
    mask = rng.random([batch, time]) < 0.6
    if time:  # An all-False row and a leading False, when drawn.
      if draw(st.booleans()):
        mask[0] = False
      if draw(st.booleans()):
        mask[-1, 0] = False
    p["mask"] = mask
  elif p["masking"] == "lengths":
    p["lengths"] = rng.integers(0, time + 1, size=[batch])
  return p


def _loss(outputs, states, rng_seed):
  """A random linear functional of every output and state (no symmetry
  hides a permuted row or step)."""
  rng = np.random.default_rng(rng_seed)
  total = tf.constant(0., tf.float64)
  for t in tf.nest.flatten([outputs, states]):
    total += tf.reduce_sum(t * rng.standard_normal(t.shape))
  return total


def _grads(run, x, states, variables, seed):
  x, states = tf.constant(x), [tf.constant(s) for s in states]
  with tf.GradientTape() as tape:
    tape.watch([x, states])
    outputs, final = run(x, states)
    loss = _loss(outputs, final, seed)
  sources = [x, *states, *variables]
  grads = tape.gradient(loss, sources)
  # (Zeros by hand: UNCONNECTED ZERO cannot read a Keras variable's dtype.)
  grads = [tf.zeros(s.shape, tf.float64) if g is None else g
           for g, s in zip(grads, sources)]
  return outputs, final, grads


def _reverse_rows(a, lengths):
  """Each row's first `lengths[b]` steps of `[batch, time, ...]` reversed:
  a gather along a permutation built in numpy (differentiable)."""
  index = np.tile(np.arange(a.shape[1]), [len(lengths), 1])
  for b, n in enumerate(lengths):
    index[b, :n] = index[b, :n][::-1]
  return tf.gather(a, index, axis=1, batch_dims=1)


def _run_stepper(p):
  cell = _CELLS[p["kind"]][0]

  def run(x, states):
    layout = (lambda a: tf.transpose(a, [1, 0, 2])) if p["time_major"] else (
        lambda a: a)
    kwargs = dict(time_major=p["time_major"], reverse=p["reverse"],
                  return_sequences=p["return_sequences"], unroll=p["unroll"],
                  remat=p["remat"], zero_output_for_mask=p["zero_output"])
    if p["mask"] is not None:
      kwargs["mask"] = layout(tf.constant(p["mask"])[..., None])[..., 0]
    if p["lengths"] is not None:
      kwargs["sequence_length"] = tf.constant(p["lengths"], tf.int32)
    outputs, final = stepper.model_rnn(cell, layout(x), states, **kwargs)
    if p["return_sequences"]:
      outputs = layout(outputs)
    return outputs, final

  return _grads(run, p["x"], p["states"], cell.trainable_variables,
                p["seed"])


def _run_keras(p):
  """The reference: Keras RNN, its outputs put in the input's time order."""
  reference = _CELLS[p["kind"]][1]
  lengths, mask = p["lengths"], p["mask"]
  flip_rows = lengths is not None and p["reverse"]
  if lengths is not None:
    mask = np.arange(p["time"])[None] < lengths[:, None]
  sequence_zeros = lengths is not None or p["zero_output"]
  zero_output = sequence_zeros and p["return_sequences"]
  backwards = p["reverse"] and not flip_rows

  def run(x, states):
    if p["time"] == 0:  # Keras cannot run zero steps; nothing runs.
      shape = [p["batch"], 0, UNITS] if p["return_sequences"] else [
          p["batch"], UNITS]
      return tf.zeros(shape, tf.float64), states
    if flip_rows:
      x = _reverse_rows(x, lengths)
    layer = keras.layers.RNN(reference, return_sequences=p["return_sequences"],
                             return_state=True, go_backwards=backwards,
                             zero_output_for_mask=zero_output,
                             dtype="float64")
    outputs, *final = layer(x, initial_state=states,
                            mask=None if mask is None else tf.constant(mask))
    if p["return_sequences"] and backwards:
      outputs = tf.reverse(outputs, [1])
    if p["return_sequences"] and flip_rows:
      outputs = _reverse_rows(outputs, lengths)
    return outputs, final

  return _grads(run, p["x"], p["states"], reference.trainable_variables,
                p["seed"])


@hypothesis.settings(max_examples=70, **_SETTINGS)
@hypothesis.given(_problems())
def test_model_rnn_matches_keras_rnn(p):
  actual = _run_stepper(p)
  expected = _run_keras(p)
  testing.assert_nests_close(actual, expected, rtol=_RTOL, atol=1e-12,
                             name=f"model_rnn({_describe(p)})")


def _describe(p):
  return ", ".join(f"{k}={p[k]}" for k in (
      "kind", "batch", "time", "masking", "zero_output", "reverse",
      "return_sequences", "unroll", "time_major", "remat"))


def _chunk_problem(kind="gru", batch=3, time=0, chunk_size=2, masking="mask",
                   zero_output=False, time_major=False, unroll=1, remat=None,
                   seed=0):
  """A `run_chunks` problem; defaults: the issue's empty masked sequence."""
  p = dict(kind=kind, batch=batch, time=time, chunk_size=chunk_size,
           masking=masking, zero_output=zero_output, time_major=time_major,
           unroll=unroll, remat=remat, seed=seed)
  rng = np.random.default_rng(seed)
  p["x"] = rng.standard_normal([batch, time, FEATURES])
  p["states"] = [rng.standard_normal([batch, UNITS])
                 for _ in range(2 if kind == "lstm" else 1)]
  p["controls"] = {}
  if masking == "mask":
    mask = rng.random([batch, time]) < 0.6
    if time:
      mask[0] = False  # An all-False row.
    p["controls"]["mask"] = mask
  elif masking == "resets":
    p["controls"]["resets"] = rng.random([batch, time]) < 0.3
  elif masking == "lengths":
    p["controls"]["sequence_length"] = rng.integers(0, time + 1, [batch])
  return p


_chunk_problems = st.builds(
    _chunk_problem, kind=st.sampled_from(sorted(_KINDS)),
    batch=st.sampled_from([1, 3]), time=st.sampled_from([0, 1, 4, 7]),
    chunk_size=st.integers(1, 8),
    masking=st.sampled_from(["none", "mask", "lengths", "resets"]),
    zero_output=st.booleans(), time_major=st.booleans(),
    unroll=st.sampled_from([1, 2]), remat=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**16))


@hypothesis.settings(max_examples=40, **_SETTINGS)
@hypothesis.given(_chunk_problems)
@hypothesis.example(_chunk_problem())  # Crashed: OutOfRangeError.
@hypothesis.example(_chunk_problem(time_major=True, zero_output=True))
def test_run_chunks_through_matches_one_model_rnn(p):
  cell = _CELLS[p["kind"]][0]
  layout = (lambda a: np.swapaxes(a, 0, 1)) if p["time_major"] else (
      lambda a: a)
  kwargs = {name: tf.constant(layout(v) if v.ndim == 2 else v)
            for name, v in p["controls"].items()}
  kwargs.update(time_major=p["time_major"],
                zero_output_for_mask=p["zero_output"])
  x = layout(p["x"])

  def chunks(x, states):
    return stepper.run_chunks(cell, x, p["chunk_size"], states,
                              gradient="through", unroll=p["unroll"],
                              remat=p["remat"], **kwargs)

  def whole(x, states):
    return stepper.model_rnn(cell, x, states, **kwargs)

  variables = cell.trainable_variables
  testing.assert_nests_close(
      _grads(chunks, x, p["states"], variables, p["seed"]),
      _grads(whole, x, p["states"], variables, p["seed"]),
      rtol=_RTOL, atol=1e-12, name=f"run_chunks({p})")

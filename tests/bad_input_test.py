"""The catalogue of bad inputs: every public entry point rejects each one with
a clear error, eagerly and inside `tf.function` (static and unknown shapes).

Each case asserts the exception type, that the message names the argument,
and that it shows the value received. Checks that can only run at run time
(a shape unknown while tracing) raise `tf.errors.InvalidArgumentError` with
the same text, before any step runs (`RunTimeChecksGateTheLoopTest`).

A case is `_Case(name, fn, tensors, error, arg, got)`: `fn(**tensors)` must
raise. In the `unknown` mode every tensor is traced with all dimensions
unknown (`[None] * rank`), so only run-time checks can see its shape; the
case says which error (and text) it then expects.
"""

import functools
import re
from typing import Any, Callable, NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import stepper
from stepper import tbptt
from stepper import verify

_RUNTIME = tf.errors.InvalidArgumentError
# TensorFlow escapes quotes in an assertion's message: inputs[\'b\'].
_Q_B = r"inputs\[\\?'b\\?'\]"
_EAGER, _FUNCTION, _UNKNOWN = "eager", "function", "unknown"


class _Case(NamedTuple):
  name: str
  fn: Callable[..., Any]
  tensors: dict
  error: type
  arg: str  # A regex naming the argument.
  got: str  # A regex showing the received value.
  # `None`: the same error and text as with static shapes; else
  # `(error, got)` expected when the shapes are unknown while tracing.
  unknown: tuple | None = None
  # Likewise inside `tf.function` with static shapes (a value check on a
  # tensor argument runs at run time); also used for `unknown` if unset.
  traced: tuple | None = None
  modes: tuple = (_EAGER, _FUNCTION, _UNKNOWN)


def _ones(*shape, dtype="float32"):
  return np.ones(shape, dtype)


# Tiny fixtures, built once: a 3-feature SimpleRNN cell of 2 units, a plain
# callable with one [batch, 2] state, and an LSTM cell (two states).
_CELL = keras.layers.SimpleRNNCell(2)
_CELL.build((None, 3))
_LSTM = keras.layers.LSTMCell(2)
_LSTM.build((None, 3))


def _add(x_t, states):
  h = states[0] + tf.nest.flatten(x_t)[0][..., :2]
  return h, [h]


def _step_model():
  """A functional step model: x_t [batch, 3], h [batch, 2] -> (y, h')."""
  x_t, h = keras.Input((3,)), keras.Input((2,))
  new_h = keras.layers.Add()([keras.layers.Dense(2)(x_t), h])
  return keras.Model([x_t, h], [new_h, new_h])


_MODEL = _step_model()


_X = _ones(2, 4, 3)      # [batch, time, features]
_S = _ones(2, 2)         # one state row per batch row
_MASK = np.ones([2, 4], bool)


@functools.lru_cache(maxsize=None)
def _rnn(**kwargs):
  """One function per keyword set: cases share its `tf.function` traces."""
  return lambda **t: stepper.model_rnn(_CELL, **t, **kwargs)


def _static(*cases, modes=(_EAGER, _FUNCTION)):
  """Cases whose tensors (if any) play no part: no unknown-shape mode."""
  return [c._replace(modes=modes) for c in cases]


def _model_rnn_cases():
  x = dict(inputs=_X)
  bad = []
  # step
  bad += _static(
      _Case("step_int", lambda **t: stepper.model_rnn(42, **t), x, TypeError,
            r"`step`", r"got int"),
      _Case("step_none", lambda **t: stepper.model_rnn(None, **t), x,
            TypeError, r"`step`", r"got NoneType"),
      _Case("callable_without_initial_states",
            lambda **t: stepper.model_rnn(_add, **t), x, ValueError,
            r"`initial_states`", r"callable '_add'"),
  )
  # inputs
  def _rnn_of_dict(a, b):
    return stepper.model_rnn(_add, {"a": a, "b": b}, [tf.zeros([2, 2])])

  bad += [
      _Case("inputs_rank_2", _rnn(), dict(inputs=_ones(2, 3)), ValueError,
            r"inputs has shape", r"\(2, 3\)",
            unknown=(ValueError, r"\(None, None\)")),
      _Case("inputs_int_to_float_model",
            lambda inputs: stepper.model_rnn(_MODEL, inputs),
            dict(inputs=_ones(2, 4, 3, dtype="int32")), TypeError,
            r"inputs has dtype", r"int32"),
      _Case("inputs_features_to_model",
            lambda inputs: stepper.model_rnn(_MODEL, inputs),
            dict(inputs=_ones(2, 4, 4)), ValueError, r"inputs has per-step",
            r"\(2, 4\)", unknown=(ValueError, r"\(None, 4\)")),
      _Case("inputs_features_to_cell", _rnn(), dict(inputs=_ones(2, 4, 5)),
            ValueError, r"`inputs`", r"5"),
      _Case("inputs_batch_disagree",
            _rnn_of_dict,
            dict(a=_ones(2, 4, 3), b=_ones(3, 4, 3)), ValueError,
            _Q_B, r"3",
            unknown=(_RUNTIME, _Q_B + r".*different batch sizes.*3")),
      _Case("inputs_time_disagree",
            _rnn_of_dict,
            dict(a=_ones(2, 4, 3), b=_ones(2, 6, 3)), ValueError,
            _Q_B, r"6",
            unknown=(_RUNTIME, _Q_B + r".*time steps.*6")),
      _Case("inputs_time_disagree_time_major",
            lambda a, b: stepper.model_rnn(_add, [a, b], [tf.zeros([2, 2])],
                                           time_major=True),
            dict(a=_ones(4, 2, 3), b=_ones(5, 2, 3)), ValueError,
            r"inputs\[1\]", r"5",
            unknown=(_RUNTIME, r"inputs\[1\].*time steps.*5")),
  ]
  bad += _static(
      _Case("inputs_none", lambda: stepper.model_rnn(_CELL, None), {},
            ValueError, r"`inputs`", r"None"),
      _Case("inputs_empty_list", lambda: stepper.model_rnn(_CELL, []), {},
            ValueError, r"`inputs`", r"\[\]"),
      _Case("inputs_string", lambda: stepper.model_rnn(_CELL, "abc"), {},
            ValueError, r"inputs has shape", r"\(\) \(rank 0\)"),
  )
  # initial_states
  bad += [
      _Case("initial_states_batch",
            lambda inputs, s: stepper.model_rnn(_CELL, inputs, [s]),
            dict(inputs=_X, s=_ones(3, 2)), ValueError,
            r"initial_states\[0\]", r"3",
            unknown=(_RUNTIME, r"initial_states\[0\].*different batch.*3")),
      _Case("initial_states_width",
            lambda inputs, s: stepper.model_rnn(_CELL, inputs, [s]),
            dict(inputs=_X, s=_ones(2, 5)), ValueError,
            r"initial_states\[0\]", r"\(2, 5\)",
            unknown=(_RUNTIME, r"must be shaped \[batch\] \+ \[2\].*5")),
      _Case("initial_states_dtype",
            lambda inputs, s: stepper.model_rnn(_CELL, inputs, [s]),
            dict(inputs=_X, s=_ones(2, 2, dtype="float64")),
            TypeError, r"initial_states\[0\]", r"float64"),
      _Case("initial_states_not_a_list",
            lambda inputs, s: stepper.model_rnn(_CELL, inputs, s),
            dict(inputs=_X, s=_S), ValueError, r"`initial_states`",
            r"1 state\(s\) nested as \."),
      _Case("initial_states_scalar",
            lambda inputs, s: stepper.model_rnn(_add, inputs, [s]),
            dict(inputs=_X, s=np.float32(1)), ValueError,
            r"initial_states\[0\]", r"scalar"),
      _Case("initial_states_count",
            lambda inputs, s: stepper.model_rnn(_CELL, inputs, [s, s]),
            dict(inputs=_X, s=_S), ValueError, r"`initial_states`",
            r"2 state\(s\)"),
      _Case("initial_states_lstm_missing_c",
            lambda inputs, s: stepper.model_rnn(_LSTM, inputs, [s]),
            dict(inputs=_X, s=_S), ValueError, r"`initial_states`",
            r"1 state\(s\)"),
      _Case("initial_states_callable_batch",
            lambda inputs, s: stepper.model_rnn(_add, inputs, [s]),
            dict(inputs=_X, s=_ones(3, 2)), ValueError,
            r"initial_states\[0\]", r"3",
            unknown=(_RUNTIME, r"initial_states\[0\].*different batch.*3")),
  ]
  bad += _static(
      _Case("initial_states_leaf_none",
            lambda inputs: stepper.model_rnn(_LSTM, inputs, [None, _S]),
            dict(inputs=_X), ValueError, r"initial_states\[0\]", r"None"),
      _Case("initial_states_callable_leaf_none",
            lambda inputs: stepper.model_rnn(_add, inputs, [None]),
            dict(inputs=_X), ValueError, r"initial_states\[0\]", r"None"),
  )
  # Python arguments.
  for arg, values in (("unroll", (0, -1, 1.5, "2", True)),
                      ("parallel_iterations", (0, 2.0)),
                      ("remat", (0, -3, 1.5, "cube", True))):
    for value in values:
      error = TypeError if arg == "remat" and (
          isinstance(value, bool) or not isinstance(value, (int, str))) else (
              ValueError)
      bad += _static(_Case(
          f"{arg}_{value!r}", _rnn(**{arg: value}), x, error,
          rf"`{arg}`", re.escape(repr(value))))
  for arg in ("time_major", "reverse", "return_sequences",
              "return_all_states", "swap_memory", "zero_output_for_mask"):
    bad += _static(_Case(f"{arg}_string", _rnn(**{arg: "no"}), x, TypeError,
                         rf"`{arg}`", r"'no'"))
  # mask
  bad += [
      _Case("mask_int", _rnn(), dict(inputs=_X, mask=_ones(2, 4, dtype="int32")),
            TypeError, r"`mask`", r"int32"),
      _Case("mask_rank_1", _rnn(), dict(inputs=_X, mask=np.ones([2], bool)),
            ValueError, r"`mask`", r"\(2,\)",
            unknown=(ValueError, r"\(None,\)")),
      _Case("mask_shape", _rnn(), dict(inputs=_X, mask=np.ones([2, 5], bool)),
            ValueError, r"`mask`", r"\(2, 5\)",
            unknown=(_RUNTIME, r"`mask`.*\[5 2\]|`mask`.*5")),
      _Case("mask_batch", _rnn(), dict(inputs=_X, mask=np.ones([3, 4], bool)),
            ValueError, r"`mask`", r"\(3, 4\)",
            unknown=(_RUNTIME, r"`mask`.*3")),
      _Case("mask_and_sequence_length", _rnn(),
            dict(inputs=_X, mask=_MASK, sequence_length=np.array([1, 2])),
            ValueError, r"`mask`.*`sequence_length`", r"not both"),
  ]
  # sequence_length
  bad += [
      _Case("sequence_length_float", _rnn(),
            dict(inputs=_X, sequence_length=np.array([1., 2.], "float32")),
            TypeError, r"`sequence_length`", r"float32"),
      _Case("sequence_length_rank_2", _rnn(),
            dict(inputs=_X, sequence_length=np.ones([2, 1], "int32")),
            ValueError, r"`sequence_length`", r"\(2, 1\)",
            unknown=(ValueError, r"\(None, None\)")),
      _Case("sequence_length_entries", _rnn(),
            dict(inputs=_X, sequence_length=np.array([1, 2, 3], "int32")),
            ValueError, r"`sequence_length`", r"3 entries",
            unknown=(_RUNTIME, r"`sequence_length`.*3")),
      _Case("sequence_length_negative", _rnn(),
            dict(inputs=_X, sequence_length=np.array([-1, 2], "int32")),
            ValueError, r"`sequence_length`", r"-1",
            traced=(_RUNTIME, r"`sequence_length`.*-1")),
      _Case("sequence_length_too_long", _rnn(),
            dict(inputs=_X, sequence_length=np.array([5, 2], "int32")),
            ValueError, r"`sequence_length`", r"5",
            traced=(_RUNTIME, r"`sequence_length`.*5")),
  ]
  # resets
  bad += [
      _Case("resets_float", _rnn(), dict(inputs=_X, resets=_ones(2, 4)),
            TypeError, r"`resets`", r"float32"),
      _Case("resets_shape", _rnn(), dict(inputs=_X,
                                         resets=np.ones([2, 3], bool)),
            ValueError, r"`resets`", r"\(2, 3\)",
            unknown=(_RUNTIME, r"`resets`.*3")),
  ]
  return [c._replace(name="model_rnn/" + c.name) for c in bad]


@functools.lru_cache(maxsize=None)
def _chunks(chunk_size=2, **kwargs):
  return lambda **t: stepper.run_chunks(_CELL, chunk_size=chunk_size, **t,
                                        **kwargs)


def _run_chunks_cases():
  x = dict(inputs=_X)
  bad = []
  for value in (0, -2, 2.5, "4", None, True):
    bad += _static(_Case(f"chunk_size_{value!r}", _chunks(value), x,
                         ValueError, r"`chunk_size`", re.escape(repr(value))))
  bad += _static(
      _Case("gradient_unknown", _chunks(gradient="full"), x, ValueError,
            r"`gradient`", r"'full'"),
      _Case("unroll_0", _chunks(unroll=0), x, ValueError, r"`unroll`",
            r"got 0"),
      _Case("unroll_0_empty", _chunks(unroll=0),
            dict(inputs=_ones(2, 0, 3)), ValueError, r"`unroll`", r"got 0"),
      _Case("remat_bad", _chunks(remat="cube"), x, ValueError, r"`remat`",
            r"'cube'"),
      _Case("step_int", lambda **t: stepper.run_chunks(42, chunk_size=2, **t),
            x, TypeError, r"`step`", r"got int"),
      _Case("inputs_none", lambda: stepper.run_chunks(_CELL, None, 2), {},
            ValueError, r"`inputs`", r"None"),
  )
  bad += [
      _Case("inputs_rank_2", _chunks(), dict(inputs=_ones(2, 3)), ValueError,
            r"inputs has shape", r"\(2, 3\)",
            unknown=(ValueError, r"\(None, None\)")),
      _Case("inputs_features_to_cell", _chunks(), dict(inputs=_ones(2, 4, 5)),
            ValueError, r"`inputs`", r"5"),
      _Case("initial_states_batch",
            lambda inputs, s: stepper.run_chunks(_CELL, inputs, 2, [s]),
            dict(inputs=_X, s=_ones(3, 2)), ValueError, r"initial_states", r"3",
            unknown=(_RUNTIME, r"initial_states.*different batch sizes.*3")),
      _Case("mask_shape", _chunks(),
            dict(inputs=_X, mask=np.ones([2, 5], bool)), ValueError,
            r"`mask`", r"\(2, 5\)", unknown=(_RUNTIME, r"`mask`.*5")),
      _Case("mask_int", _chunks(),
            dict(inputs=_X, mask=_ones(2, 4, dtype="int32")), TypeError,
            r"`mask`", r"int32"),
      _Case("sequence_length_negative", _chunks(),
            dict(inputs=_X, sequence_length=np.array([-1, 2], "int32")),
            ValueError, r"`sequence_length`", r"-1",
            traced=(_RUNTIME, r"`sequence_length`.*-1")),
      _Case("resets_shape", _chunks(),
            dict(inputs=_X, resets=np.ones([2, 3], bool)), ValueError,
            r"`resets`", r"\(2, 3\)", unknown=(_RUNTIME, r"`resets`.*3")),
  ]
  return [c._replace(name="run_chunks/" + c.name) for c in bad]


def _runner(**kwargs):
  return stepper.StatefulRunner(_CELL, 2, **kwargs)


_RUNNER = stepper.StatefulRunner(_CELL, 2)


def _stateful_runner_cases():
  eager = (_EAGER,)
  bad = []
  for value in (0, -1, 2.0, "2", None):
    bad += _static(_Case(f"batch_size_{value!r}",
                         lambda v=value: stepper.StatefulRunner(_CELL, v), {},
                         ValueError, r"`batch_size`", re.escape(repr(value))),
                   modes=eager)
  bad += _static(
      _Case("initial_states_batch",
            lambda: _runner(initial_states=[tf.ones([3, 2])]), {}, ValueError,
            r"initial_states", r"3"),
      _Case("step_int", lambda: stepper.StatefulRunner(42, 2), {}, TypeError,
            r"`step`", r"got int"),
      modes=eager)
  bad += [
      _Case("call_batch", lambda chunk: _RUNNER(chunk),
            dict(chunk=_ones(3, 4, 3)), ValueError, r"chunk", r"3",
            unknown=(_RUNTIME, r"chunk.*3")),
      _Case("call_rank_2", lambda chunk: _RUNNER(chunk),
            dict(chunk=_ones(2, 3)), ValueError, r"chunk|inputs",
            r"\(2, 3\)", unknown=(ValueError, r"\(None, None\)")),
      _Case("call_resets_shape", lambda chunk, r: _RUNNER(chunk, resets=r),
            dict(chunk=_X, r=np.ones([2, 3], bool)), ValueError, r"`resets`",
            r"\(2, 3\)", unknown=(_RUNTIME, r"`resets`.*3")),
      _Case("reset_states_int", lambda w: _RUNNER.reset_states(w),
            dict(w=np.ones([2], "int32")), TypeError, r"`where`", r"int32"),
      _Case("reset_states_length", lambda w: _RUNNER.reset_states(w),
            dict(w=np.ones([3], bool)), ValueError, r"`where`", r"\(3,\)",
            unknown=(_RUNTIME, r"`where`.*3")),
      _Case("reset_states_rank_2", lambda w: _RUNNER.reset_states(w),
            dict(w=np.ones([2, 1], bool)), ValueError, r"`where`",
            r"\(2, 1\)", unknown=(ValueError, r"\(None, None\)")),
  ]
  return [c._replace(name="StatefulRunner/" + c.name) for c in bad]


@functools.lru_cache(maxsize=None)
def _bidirectional(**kwargs):
  return lambda **t: stepper.bidirectional(_CELL, _CELL, **t, **kwargs)


_WIDE = keras.layers.SimpleRNNCell(3)
_WIDE.build((None, 3))
_CELL64 = keras.layers.SimpleRNNCell(2, dtype="float64")
_CELL64.build((None, 3))


def _bidirectional_cases():
  x = dict(inputs=_X)
  bad = _static(
      _Case("merge_mode_unknown", _bidirectional(merge_mode="max"), x,
            ValueError, r"`merge_mode`", r"'max'"),
      _Case("initial_states_not_pair",
            lambda inputs: stepper.bidirectional(
                _CELL, _CELL, inputs, (tf.ones([2, 2]),) * 3), x,
            ValueError, r"`initial_states`", r"length 3"),
      _Case("merge_sum_different_widths",
            lambda **t: stepper.bidirectional(_CELL, _WIDE, **t,
                                              merge_mode="sum"), x,
            ValueError, r"`merge_mode`", r"'sum'.*\(2, 4, 2\).*\(2, 4, 3\)"),
      _Case("merge_concat_dtypes",
            lambda inputs: stepper.bidirectional(
                _CELL, _CELL64, inputs, merge_mode="concat"), x, TypeError,
            r"`merge_mode`", r"float32.*float64"),
      _Case("step_int", lambda **t: stepper.bidirectional(_CELL, 42, **t), x,
            TypeError, r"`step`", r"got int"),
  )
  bad += [
      _Case("sequence_length_negative", _bidirectional(),
            dict(inputs=_X, sequence_length=np.array([-1, 2], "int32")),
            ValueError, r"`sequence_length`", r"-1",
            traced=(_RUNTIME, r"`sequence_length`.*-1")),
      _Case("mask_shape", _bidirectional(),
            dict(inputs=_X, mask=np.ones([2, 5], bool)), ValueError,
            r"`mask`", r"\(2, 5\)", unknown=(_RUNTIME, r"`mask`.*5")),
      _Case("inputs_rank_2", _bidirectional(), dict(inputs=_ones(2, 3)),
            ValueError, r"inputs has shape", r"\(2, 3\)",
            unknown=(ValueError, r"\(None, None\)")),
  ]
  return [c._replace(name="bidirectional/" + c.name) for c in bad]


def _stack_cases():
  eager = (_EAGER,)
  bad = _static(
      _Case("steps_not_list", lambda: stepper.stack(_CELL), {}, TypeError,
            r"`steps`", r"SimpleRNNCell"),
      _Case("steps_empty", lambda: stepper.stack([]), {}, ValueError,
            r"`steps`", r"empty"),
      _Case("steps_int", lambda: stepper.stack([_CELL, 42]), {}, TypeError,
            r"`step`", r"got int"),
      _Case("residual_length", lambda: stepper.stack([_CELL, _CELL],
                                                     residual=[True]), {},
            ValueError, r"`residual`", r"1 entries"),
      _Case("residual_type", lambda: stepper.stack([_CELL], residual="yes"),
            {}, TypeError, r"`residual`", r"'yes'"),
      _Case("dropout_negative", lambda: stepper.stack([_CELL], dropout=-0.1),
            {}, ValueError, r"`dropout`", r"-0.1"),
      _Case("dropout_one", lambda: stepper.stack([_CELL], dropout=1.0), {},
            ValueError, r"`dropout`", r"1.0"),
      _Case("dropout_string", lambda: stepper.stack([_CELL], dropout="0.5"),
            {}, TypeError, r"`dropout`", r"'0.5'"),
      _Case("seed_string", lambda: stepper.stack([_CELL, _CELL], dropout=0.5,
                                                 seed="abc"), {},
            TypeError, r"`seed`", r"'abc'"),
      _Case("seed_float", lambda: stepper.stack([_CELL, _CELL], dropout=0.5,
                                                seed=1.5), {},
            TypeError, r"`seed`", r"1.5"),
      modes=eager)
  bad += [
      _Case("initial_states_not_per_layer",
            lambda inputs, s: stepper.model_rnn(
                stepper.stack([_CELL, _CELL]), inputs, [s]),
            dict(inputs=_X, s=_S), ValueError, r"`initial_states`",
            r"1 state\(s\)"),
  ]
  return [c._replace(name="stack/" + c.name) for c in bad]


_STATE = stepper.TrainableState(_LSTM)


def _trainable_state_cases():
  eager = (_EAGER,)
  bad = _static(
      _Case("step_callable", lambda: stepper.TrainableState(_add), {},
            ValueError, r"`step`|TrainableState", r"callable '_add'"),
      _Case("step_int", lambda: stepper.TrainableState(42), {}, TypeError,
            r"`step`", r"got int"),
      modes=eager)
  for value in (-2, 2.5, "3", True, None):
    bad += _static(_Case(f"initial_state_{value!r}",
                         lambda v=value: _STATE.initial_state(v), {},
                         ValueError if value == -2 else TypeError,
                         r"`batch_size`",
                         re.escape(repr(value))))
  bad += [
      _Case("initial_state_tensor_negative",
            lambda b: _STATE.initial_state(b), dict(b=np.int32(-2)),
            ValueError, r"`batch_size`", r"-2",
            traced=(_RUNTIME, r"`batch_size`.*-2")),
      _Case("initial_state_tensor_float", lambda b: _STATE.initial_state(b),
            dict(b=np.float32(2)), TypeError, r"`batch_size`", r"float32"),
      _Case("initial_state_tensor_rank_1", lambda b: _STATE.initial_state(b),
            dict(b=np.array([2], "int32")), ValueError, r"`batch_size`",
            r"\(1,\)", unknown=(ValueError, r"\(None,\)")),
  ]
  return [c._replace(name="TrainableState/" + c.name) for c in bad]


def _dataset(x, y):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(2)


def _trainer(**kwargs):
  args = dict(loss="mse", optimizer=keras.optimizers.SGD(0.1))
  args.update(kwargs)
  return stepper.Trainer(_CELL, **args)


_TRAINER = _trainer()
_DATA = _dataset(_ones(4, 5, 3), _ones(4, 5, 2))


def _trainer_cases():
  bad = [
      _Case("loss_int", lambda: _trainer(loss=42), {}, TypeError, r"`loss`",
            r"got int"),
      _Case("loss_name", lambda: _trainer(loss="mean_cube"), {}, ValueError,
            r"`loss`", r"'mean_cube'"),
      _Case("optimizer_string", lambda: _trainer(optimizer="adam"), {},
            TypeError, r"`optimizer`", r"got str"),
      _Case("strategy_int", lambda: _trainer(strategy=42), {}, TypeError,
            r"`strategy`", r"got int"),
      _Case("head_int", lambda: _trainer(head=42), {}, TypeError, r"`head`",
            r"got int"),
      _Case("stream_string", lambda: _trainer(stream="yes"), {}, TypeError,
            r"`stream`", r"'yes'"),
      _Case("hoist_int", lambda: _trainer(hoist=1), {}, TypeError,
            r"`hoist`", r"1 of type int"),
      _Case("jit_compile_none", lambda: _trainer(jit_compile=None), {},
            TypeError, r"`jit_compile`", r"None"),
      _Case("online_without_stream", lambda: _trainer(online="rtrl"), {},
            ValueError, r"`online`.*`stream`", r"'rtrl'"),
      _Case("online_with_tbptt",
            lambda: _trainer(online="uoro", stream=True, tbptt=(2, 2)), {},
            ValueError, r"`online`.*`tbptt`", r"\(2, 2\)"),
      _Case("online_bptt", lambda: _trainer(online="bptt", stream=True), {},
            ValueError, r"`online`", r"'bptt'"),
      _Case("online_upper_case",
            lambda: _trainer(online="SnAp1", stream=True), {}, ValueError,
            r"`online`", r"'SnAp1'"),
  ]
  for value in ((3, 2), (0, 1), 5, (1, 2, 3), (1.0, 2)):
    bad.append(_Case(f"tbptt_{value!r}", lambda v=value: _trainer(tbptt=v),
                     {}, ValueError, r"`tbptt`", re.escape(str(value)[:5])))
  for value in (0, -1.0, float("nan"), float("inf"), "1", True):
    bad.append(_Case(f"gradient_clip_norm_{value!r}",
                     lambda v=value: _trainer(gradient_clip_norm=v), {},
                     ValueError, r"`gradient_clip_norm`",
                     re.escape(repr(value))))
  bad += [
      _Case("fit_epochs_0", lambda: _TRAINER.fit(_DATA, epochs=0), {},
            ValueError, r"`epochs`", r"got 0"),
      _Case("fit_steps_0", lambda: _TRAINER.fit(_DATA, steps=0), {},
            ValueError, r"`steps`", r"got 0"),
      _Case("fit_dataset_array", lambda: _TRAINER.fit(_ones(4, 5, 3)), {},
            TypeError, r"`dataset`", r"ndarray"),
      _Case("fit_dataset_not_pairs",
            lambda: _TRAINER.fit(tf.data.Dataset.from_tensor_slices(
                _ones(4, 5, 3)).batch(2)), {}, ValueError, r"`dataset`",
            r"TensorSpec"),
      _Case("fit_inputs_rank_2",
            lambda: _TRAINER.fit(_dataset(_ones(4, 3), _ones(4, 2))), {},
            ValueError, r"dataset inputs", r"\(None, 3\)"),
      _Case("fit_targets_shape",
            lambda: _TRAINER.fit(_dataset(_ones(4, 5, 3), _ones(4, 5, 7))),
            {}, ValueError, r"targets", r"\(None, 5, 7\)"),
      _Case("fit_features",
            lambda: _TRAINER.fit(_dataset(_ones(4, 5, 6), _ones(4, 5, 2))),
            {}, ValueError, r"`dataset`", r"6"),
      _Case("fit_validation_data_array",
            lambda: _TRAINER.fit(_DATA, validation_data=_ones(2)), {},
            TypeError, r"`validation_data`", r"ndarray"),
      _Case("fit_callbacks_not_list",
            lambda: _TRAINER.fit(_DATA, callbacks=stepper.BatchLosses()), {},
            TypeError, r"`callbacks`", r"BatchLosses"),
      _Case("fit_callbacks_int",
            lambda: _TRAINER.fit(_DATA, callbacks=[42]), {}, TypeError,
            r"`callbacks`", r"int"),
      _Case("evaluate_dataset_array", lambda: _TRAINER.evaluate(_ones(2)), {},
            TypeError, r"`dataset`", r"ndarray"),
      _Case("predict_rank_2", lambda: _TRAINER.predict(_ones(2, 3)), {},
            ValueError, r"inputs has shape", r"\(2, 3\)"),
  ]
  return [c._replace(name="Trainer/" + c.name, modes=(_EAGER,)) for c in bad]


_MSE = keras.losses.MeanSquaredError()
_UPDATER = tbptt.Updater(_CELL, _MSE, k1=2, k2=3)
_Y = _ones(2, 4, 2)
_UPDATE_J = lambda x, y, j: _UPDATER.update(x, y, [tf.zeros([2, 2])], j)
_UPDATE_0 = lambda x, y: _UPDATER.update(x, y, [tf.zeros([2, 2])], 0)


def _tbptt_cases():
  eager = (_EAGER,)
  bad = []
  for name, kwargs, error, arg, got in (
      ("k1_0", dict(k1=0, k2=2), ValueError, r"`k1`", r"got 0"),
      ("k2_string", dict(k1=1, k2="2"), ValueError, r"`k2`", r"'2'"),
      ("k2_less_than_k1", dict(k1=3, k2=2), ValueError, r"`k2`", r"2"),
      ("loss_none", dict(k1=1, k2=1, loss=None), TypeError, r"`loss`",
       r"None"),
      ("loss_int", dict(k1=1, k2=1, loss=42), TypeError, r"`loss`",
       r"got 42"),
      ("loss_unknown_name", dict(k1=1, k2=1, loss="mean_cube"), ValueError,
       r"`loss`", r"'mean_cube'")):
    args = dict(loss=_MSE)
    args.update(kwargs)
    bad += _static(_Case(f"Updater_{name}",
                         lambda a=args: tbptt.Updater(_CELL, **a), {}, error,
                         arg, got), modes=eager)
  for entry in ("updates", "iterate"):
    run = lambda x, y, entry=entry: list(getattr(tbptt, entry)(
        _CELL, x, y, _MSE, k1=2, k2=2))
    bad += _static(
        _Case(f"{entry}_targets_batch_1", run, dict(x=_X, y=_ones(1, 4, 2)),
              ValueError, r"targets", r"\(1, 4, 2\)"),
        _Case(f"{entry}_targets_batch_3", run, dict(x=_X, y=_ones(3, 4, 2)),
              ValueError, r"targets", r"\(3, 4, 2\)"),
        _Case(f"{entry}_targets_features", run, dict(x=_X, y=_ones(2, 4, 1)),
              ValueError, r"targets", r"\(2, 4, 1\)"),
        _Case(f"{entry}_targets_time", run, dict(x=_X, y=_ones(2, 5, 2)),
              ValueError, r"targets", r"5"),
        _Case(f"{entry}_targets_nesting",
              lambda x, y, entry=entry: list(getattr(tbptt, entry)(
                  _CELL, x, [y, y], _MSE, k1=2, k2=2)),
              dict(x=_X, y=_Y), ValueError, r"`targets`", r"\['\.', '\.'\]"),
        _Case(f"{entry}_targets_none",
              lambda x, entry=entry: list(getattr(tbptt, entry)(
                  _CELL, x, None, _MSE, k1=2, k2=2)),
              dict(x=_X), ValueError, r"`targets`", r"None"),
        _Case(f"{entry}_inputs_rank_2", run, dict(x=_ones(2, 3), y=_Y),
              ValueError, r"inputs has shape", r"\(2, 3\)"),
        modes=eager)
  bad += [
      _Case("update_j_negative",
            _UPDATE_J,
            dict(x=_X, y=_Y, j=np.int32(-1)), ValueError, r"`j`", r"-1",
            traced=(_RUNTIME, r"`j`.*-1")),
      _Case("update_j_too_large",
            _UPDATE_J,
            dict(x=_X, y=_Y, j=np.int32(2)), ValueError, r"`j`", r"got 2",
            traced=(_RUNTIME, r"`j`.*\] \[2\]")),
      _Case("update_targets_features",
            _UPDATE_0,
            dict(x=_X, y=_ones(2, 4, 1)), ValueError, r"targets",
            r"\(2, 4, 1\)", unknown=(ValueError, r"\(None, None, 1\)")),
      _Case("update_targets_batch",
            _UPDATE_0,
            dict(x=_X, y=_ones(1, 4, 2)), ValueError, r"targets",
            r"\(1, 4, 2\)", unknown=(_RUNTIME, r"targets.*1")),
  ]
  bad += _static(_Case(
      "updates_time_unknown_in_function",
      lambda: tf.function(lambda x: tbptt.updates(_CELL, x, x, _MSE, k1=1,
                                                  k2=1)).get_concrete_function(
          tf.TensorSpec([2, None, 3])), {}, ValueError, r"`inputs`",
      r"unknown number of time steps"), modes=eager)
  return [c._replace(name="tbptt/" + c.name) for c in bad]


_CONTROL = keras.layers.SimpleRNN(2, return_sequences=True)


def _verify_cases():
  eager = (_EAGER,)
  x = dict(x=_X)
  compare = lambda **kwargs: lambda x: verify.compare(_CELL, _CONTROL, x,
                                                      **kwargs)
  numerical = lambda **kwargs: lambda x: verify.numerical(_CELL64, x,
                                                          **kwargs)
  horizon = lambda **kwargs: lambda x: verify.gradient_horizon(_CELL, x,
                                                               **kwargs)
  bad = [
      _Case("compare_rtol_negative", compare(rtol=-1), x, ValueError,
            r"`rtol`", r"-1"),
      _Case("compare_rtol_nan", compare(rtol=float("nan")), x, ValueError,
            r"`rtol`", r"nan"),
      _Case("compare_atol_negative", compare(atol=-1.0), x, ValueError,
            r"`atol`", r"-1"),
      _Case("compare_control_none",
            lambda x: verify.compare(_CELL, None, x), x, TypeError,
            r"`control`", r"None"),
      _Case("compare_control_int", lambda x: verify.compare(_CELL, 42, x), x,
            TypeError, r"`control`", r"42"),
      _Case("compare_weight_map_list", compare(weight_map=[(0, 0)]), x,
            TypeError, r"`weight_map`", r"list"),
      _Case("compare_inputs_rank_2", compare(), dict(x=_ones(2, 3)),
            ValueError, r"inputs", r"\(2, 3\)"),
      _Case("numerical_epsilon_0", numerical(epsilon=0), x, ValueError,
            r"`epsilon`", r"got 0"),
      _Case("numerical_epsilon_negative", numerical(epsilon=-1e-6), x,
            ValueError, r"`epsilon`", r"-1e-06"),
      _Case("numerical_rtol_negative", numerical(rtol=-1.0), x, ValueError,
            r"`rtol`", r"-1"),
      _Case("numerical_max_coordinates_0", numerical(max_coordinates=0), x,
            ValueError, r"`max_coordinates`", r"got 0"),
      _Case("horizon_loss_at_out_of_range", horizon(loss_at=9), x,
            ValueError, r"`loss_at`", r"9"),
      _Case("horizon_window_0", horizon(window=0), x, ValueError,
            r"`window`", r"got 0"),
      _Case("find_nonfinite_inputs_none",
            lambda x: verify.find_nonfinite(_CELL, None), x, ValueError,
            r"`inputs`", r"None"),
      _Case("find_nonfinite_rank_2",
            lambda x: verify.find_nonfinite(_CELL, x), dict(x=_ones(2, 3)),
            ValueError, r"inputs has shape", r"\(2, 3\)"),
  ]
  return [c._replace(name="verify/" + c.name, modes=eager) for c in bad]


def _misc_cases():
  eager = (_EAGER,)
  bad = _static(
      _Case("as_step_int", lambda: stepper.as_step(42), {}, TypeError,
            r"`step`", r"got int"),
      _Case("as_step_string", lambda: stepper.as_step("gru"), {}, TypeError,
            r"`step`", r"got str"),
      _Case("in_mode_unknown",
            lambda: stepper.testing.in_mode(lambda: 0, "gpu"), {}, ValueError,
            r"`mode`", r"'gpu'"),
      _Case("step_rnn_inputs_rank_2",
            lambda: stepper.StepRNN(_CELL)(tf.ones([2, 3])), {}, ValueError,
            r"inputs", r"\(2, 3\)"),
      _Case("step_rnn_features",
            lambda: stepper.StepRNN(_CELL)(tf.ones([2, 4, 5])), {},
            ValueError, r"`inputs`", r"5"),
      _Case("step_rnn_reverse_output_mask_string",
            lambda: stepper.StepRNN(_CELL, reverse_output_mask="no"), {},
            TypeError, r"`reverse_output_mask`", r"'no'"),
      _Case("step_rnn_reset_states_to_initial_state_int",
            lambda: stepper.StepRNN(_CELL).reset_states(1), {}, TypeError,
            r"`to_initial_state`", r"1 of type int"),
      modes=eager)
  return [c._replace(name="misc/" + c.name) for c in bad]


_ONLINE_Y = _ones(2, 4, 2)


def _online(**kwargs):
  args = dict(method="rtrl")
  args.update(kwargs)
  return lambda x, y: stepper.online.gradients(_CELL, x, y, _MSE, **args)


def _online_cases():
  xy = dict(x=_X, y=_ONLINE_Y)
  bad = [
      _Case("method_upper_case", _online(method="RTRL"), xy, ValueError,
            r"`method`", r"'RTRL'"),
      _Case("method_none", _online(method=None), xy, ValueError,
            r"`method`", r"None"),
      _Case("seed_bool", _online(method="bptt", seed=True), xy, TypeError,
            r"`seed`", r"True"),
      _Case("seed_float", _online(method="uoro", seed=1.5), xy, TypeError,
            r"`seed`", r"1\.5"),
      _Case("seed_string", _online(method="snap1", seed="1"), xy, TypeError,
            r"`seed`", r"'1'"),
      _Case("callable_without_variables",
            lambda x, y: stepper.online.gradients(
                _add, x, y, _MSE, method="snap1", initial_states=[_S]),
            xy, ValueError, r"`variables`", r"got None"),
      _Case("variables_not_a_list", _online(variables=42), xy, TypeError,
            r"`variables`", r"42"),
      _Case("targets_batch", _online(), dict(x=_X, y=_ones(3, 4, 2)),
            ValueError, r"`targets`", r"\(3, 4, 2\)"),
      _Case("targets_rank_1", _online(), dict(x=_X, y=_ones(2)),
            ValueError, r"`targets`", r"\(2,\)"),
      # [2, 4, 1] against [2, 4, 2] predictions: a loss would broadcast.
      _Case("targets_last_axis", _online(method="bptt"),
            dict(x=_X, y=_ones(2, 4, 1)), ValueError, r"`targets`",
            r"\(2, 4, 1\)"),
      _Case("targets_last_axis_online", _online(),
            dict(x=_X, y=_ones(2, 4, 3)), ValueError, r"`targets`",
            r"\(2, 4, 3\)"),
      _Case("max_influence_exceeded", _online(max_influence=10), xy,
            ValueError, r"`max_influence` = 10", r"\[2, 2, 12\] of 48"),
      _Case("max_influence_zero", _online(max_influence=0), xy,
            ValueError, r"`max_influence`", r"got 0"),
  ]
  return [c._replace(name="online/" + c.name, modes=(_EAGER, _FUNCTION))
          for c in bad]


_CASES = (_model_rnn_cases() + _run_chunks_cases() + _stateful_runner_cases()
          + _bidirectional_cases() + _stack_cases() + _trainable_state_cases()
          + _trainer_cases() + _tbptt_cases() + _verify_cases()
          + _online_cases() + _misc_cases())
_PARAMS = [pytest.param(case, mode, id=f"{case.name}-{mode}")
           for case in _CASES for mode in case.modes]


_TRACED = {}


def _call(case: _Case, mode: str):
  names = list(case.tensors)
  values = [case.tensors[n] for n in names]
  if mode == _EAGER:
    return case.fn(**{n: tf.constant(v) for n, v in zip(names, values)})
  signature = None
  if mode == _UNKNOWN:  # Batch and time (the first two dimensions) unknown.
    signature = [tf.TensorSpec(
        [None] * min(np.ndim(v), 2) + list(np.shape(v)[2:]),
        tf.as_dtype(np.asarray(v).dtype)) for v in values]
  # Cases sharing a function and a signature share its trace.
  key = (case.fn, tuple(names), mode,
         None if signature is None else tuple(signature))
  if key not in _TRACED:
    _TRACED[key] = tf.function(
        lambda *args: case.fn(**dict(zip(names, args))),
        input_signature=signature, autograph=False)
  return _TRACED[key](*[tf.constant(v) for v in values])


@pytest.mark.parametrize("case,mode", _PARAMS)
def test_bad_input_raises_naming_argument_and_value(case, mode):
  error, got = case.error, case.got
  if mode != _EAGER and case.traced is not None:
    error, got = case.traced
  if mode == _UNKNOWN and case.unknown is not None:
    error, got = case.unknown
  with pytest.raises(Exception) as info:
    _call(case, mode)
  message = str(info.value)
  assert isinstance(info.value, error), (
      f"expected {error.__name__}, got {type(info.value).__name__}: "
      f"{message[:600]}")
  assert re.search(case.arg, message, re.S), (
      f"message does not name {case.arg!r}: {message[:600]}")
  assert re.search(got, message, re.S), (
      f"message does not show {got!r}: {message[:600]}")


def test_catalogue_size():
  assert len(_PARAMS) >= 250, len(_PARAMS)


def _unknown(*shapes, dtype=tf.float32):
  return [tf.TensorSpec(s, dtype) for s in shapes]


def _strings(op) -> list[str]:
  return [tf.make_ndarray(t.op.get_attr("value")).item().decode()
          for t in op.inputs if t.op.type == "Const" and t.dtype == tf.string]


def _ancestors(op) -> set:
  """Names of every op `op` depends on, through data and control edges."""
  seen, stack = set(), [op]
  while stack:
    current = stack.pop()
    for parent in [t.op for t in current.inputs] + list(
        current.control_inputs):
      if parent.name not in seen:
        seen.add(parent.name)
        stack.append(parent)
  return seen


# Run-time checks under unknown shapes: `(name, fn, signature, message)`.
_GATES = [
    ("model_rnn_inputs_batch",
     lambda a, b, s: stepper.model_rnn(_add, {"a": a, "b": b}, [s]),
     _unknown([None, None, 3], [None, None, 3], [None, 2]),
     r"different batch sizes"),
    ("model_rnn_inputs_time",
     lambda a, b, s: stepper.model_rnn(_add, {"a": a, "b": b}, [s]),
     _unknown([None, None, 3], [None, None, 3], [None, 2]),
     _Q_B + r".*time steps"),
    ("model_rnn_initial_states_batch",
     lambda x, s: stepper.model_rnn(_CELL, x, [s]),
     _unknown([None, None, 3], [None, 2]),
     r"initial_states\[0\] and the inputs have different batch sizes"),
    ("run_chunks_initial_states_batch",
     lambda x, s: stepper.run_chunks(_CELL, x, 2, [s]),
     _unknown([None, None, 3], [None, 2]),
     r"initial_states\[0\] and the inputs have different batch sizes"),
    ("stateful_runner_chunk_batch", lambda x: _RUNNER(x),
     _unknown([None, None, 3]), r"chunk has a batch size other"),
    ("tbptt_update_j",
     _UPDATE_J,
     _unknown([2, 4, 3], [2, 4, 2]) + [tf.TensorSpec([], tf.int32)],
     r"`j` must lie in"),
]


@pytest.mark.parametrize("name,fn,signature,message", _GATES,
                         ids=[g[0] for g in _GATES])
def test_run_time_check_gates_every_loop(name, fn, signature, message):
  """The assertion is an ancestor of every `while` loop of the trace: no
  step can run before it passes (an unread assertion raced the loop)."""
  del name
  graph = tf.function(fn, autograph=False).get_concrete_function(
      *signature).graph
  operations = graph.get_operations()
  checks = [op.name for op in operations if op.type == "Assert" and
            any(re.search(message, s) for s in _strings(op))]
  loops = [op for op in operations if op.type in ("While", "StatelessWhile")]
  assert checks, f"no run-time check matching {message!r}"
  assert loops
  for loop in loops:
    assert set(checks) & _ancestors(loop), (
        f"{loop.name} does not wait for {checks}")

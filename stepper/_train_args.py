"""The `stepper.Trainer` constructor's arguments, validated and assembled.

A private module with public names: each `check_*` raises a TypeError or
ValueError naming the argument, the expected and the received value;
`with_head` puts the head on the step; `row_wise` says whether the head may
run after the loop instead, on all steps at once (`over_time`).
"""

from typing import Any, Callable

import keras
import tensorflow as tf

from stepper import _checks
from stepper import _loop
from stepper import steps as steps_lib


def with_head(step: steps_lib.Step, head: Any) -> steps_lib.Step:
  """The step followed by `head` on its output at every time step."""
  if head is None:
    return step
  if not callable(head):
    raise TypeError(f"`head` must be a Keras layer (or None); got "
                    f"{type(head).__name__}.")

  def headed(call: Callable) -> Callable:
    def fn(x_t, states, training):
      y, new_states = call(x_t, states, training)
      return head(y, training=training), new_states
    return fn

  return steps_lib.wrap_call(
      step, headed,
      name=f"{step.name} with head {getattr(head, 'name', '')!r}",
      input_spec=step.input_spec, initial_state_fn=step.initial_state)


# Layers that map each row of a `[rows, ...]` input alone, with no state and
# no batch statistics: applied to `[batch * time, ...]` they give each step
# exactly what `batch` rows at a time give (Dropout: one draw of the same
# distribution, as Keras draws it over the whole sequence). Exact types: a
# subclass may override `call`.
_ROW_WISE = (keras.layers.Dense, keras.layers.Activation, keras.layers.ReLU,
             keras.layers.LeakyReLU, keras.layers.Identity)


def row_wise(head: Any) -> bool:
  """Whether `head` treats each row alone, so that it may run once on every
  step's rows after the loop (`[batch * time, units]`: one large matmul for
  a `Dense`) rather than inside it.

  True for `Dense`, `Activation`, `ReLU`, `LeakyReLU`, `Identity`;
  `Softmax` and `LayerNormalization` over the last axis only; `Dropout`
  without `noise_shape`; `EinsumDense` whose equation keeps the first
  (batch) index out of the kernel; a `Sequential` of these. False (the head
  runs in the loop, at every step, as before) for anything else: layers
  with batch statistics (`BatchNormalization`), user layers, subclasses.

  >>> row_wise(keras.Sequential([keras.layers.Dense(4),
  ...                            keras.layers.Activation("tanh")]))
  True
  >>> row_wise(keras.layers.BatchNormalization())
  False
  """
  kind = type(head)
  if kind is keras.Sequential:
    return all(row_wise(layer) for layer in head.layers)
  if kind in _ROW_WISE:
    return True
  if kind in (keras.layers.Softmax, keras.layers.LayerNormalization):
    return list(tf.nest.flatten(head.axis)) == [-1]
  if kind is keras.layers.Dropout:
    return head.noise_shape is None
  if kind is keras.layers.EinsumDense:
    lhs, out = head.equation.split("->")
    x, kernel = lhs.split(",")
    return x[:3] == out[:3] == "..." or (x[0] == out[0] and
                                         x[0] not in kernel)
  return False


def over_time(head: Any, outputs: tf.Tensor, training: Any) -> tf.Tensor:
  """A `row_wise` head on `outputs` `[batch, time, ...]`, as one call on
  `[batch * time, ...]`; returns `[batch, time, ...]`."""
  merged = head(_loop.merge_leading_dims(outputs), training=training)
  return tf.reshape(merged, tf.concat(
      [tf.shape(outputs)[:2], tf.shape(merged)[1:]], 0))


def check_optimizer(optimizer: Any) -> keras.optimizers.Optimizer:
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    raise TypeError("`optimizer` must be a keras.optimizers.Optimizer, e.g. "
                    f"keras.optimizers.Adam(1e-3); got "
                    f"{type(optimizer).__name__}.")
  return optimizer


def check_strategy(strategy: Any) -> tf.distribute.Strategy:
  if strategy is None:
    return tf.distribute.get_strategy()
  if not isinstance(strategy, tf.distribute.Strategy):
    raise TypeError("`strategy` must be a tf.distribute.Strategy (or None); "
                    f"got {type(strategy).__name__}.")
  return strategy


def check_tbptt(tbptt: Any) -> tuple[int, int] | None:
  if tbptt is None:
    return None
  if (not isinstance(tbptt, (tuple, list)) or len(tbptt) != 2 or
      any(isinstance(k, bool) or not isinstance(k, int) for k in tbptt)):
    raise ValueError(f"`tbptt` must be None or a pair of ints (k1, k2); got "
                     f"{tbptt!r}.")
  k1, k2 = tbptt
  if not 1 <= k1 <= k2:
    raise ValueError(
        f"`tbptt` = (k1, k2) = ({k1}, {k2}) needs 1 <= k1 <= k2: every k1 "
        "steps an update backpropagates k2 steps, which must cover the k1 "
        "steps it takes the loss on.")
  return k1, k2


def check_clip_norm(clip: Any) -> float | None:
  if clip is None:
    return None
  # NaN passed `clip <= 0` and turned every weight into NaN; so did inf
  # (the clip factor inf / inf).
  return _checks.check_number(clip, "gradient_clip_norm", positive=True)


def check_online(online: Any, *, tbptt: Any, stream: bool) -> str | None:
  """`online`: None, or an online estimator of `stepper.online`.

  Raises:
    ValueError: Naming `online` (and the argument it conflicts with) for
      an unknown method, `"bptt"`, `tbptt` or no `stream`.
  """
  if online is None:
    return None
  estimators = ["rtrl", "snap1", "uoro"]
  if online == "bptt":
    raise ValueError(
        "`online`='bptt' is not an online estimator: full BPTT over a "
        "stream is `online=None, stream=True` (the state carried, the "
        f"gradient cut at each batch). Pass one of {estimators} or None.")
  if not isinstance(online, str) or online not in estimators:
    raise ValueError(f"`online` must be one of {estimators} "
                     f"(case-sensitive) or None; got {online!r}.")
  if tbptt is not None:
    raise ValueError(
        f"`online`={online!r} and `tbptt`={tbptt!r} exclude each other: an "
        "online estimator carries the influence forward instead of "
        "truncating backpropagation. Pass tbptt=None.")
  if not stream:
    raise ValueError(
        f"`online`={online!r} needs `stream`=True: the state and the "
        "influence carry from batch to batch (row b of every batch "
        "continues row b of the last; see stepper.data.streams).")
  return online

"""The competitors: one LSTM recurrence run by each tool under test.

Every variant steps the same `keras.layers.LSTMCell` (the Keras built-ins
`keras.layers.LSTM`/`GRU` bring their own fused kernels and weights), so the
differences measured are the cost of the loop, not of the cell. The `_gru`
and `_model` variants step a `GRUCell` and an LSTM written as a functional
step model (`make_step_model`), each against its own hand-written loop
(`while_loop_gru`, `while_loop_model`). Each variant is two functions of the
input `x` `[batch, time, features]`:

* `train(x)`: the loss `mean(outputs ** 2)` and the gradients of every
  trainable weight (forward+backward);
* `infer(x)`: the sum of the outputs (forward only; a scalar, so fetching the
  result costs the same for every variant).
"""

import dataclasses
from typing import Callable

import keras
import tensorflow as tf

import stepper
from stepper import _fastpath


@dataclasses.dataclass(frozen=True)
class Config:
  """A benchmark problem: an LSTM with `units` on `[batch, time, features]`."""
  name: str
  batch: int
  time: int
  units: int
  features: int

  def with_time(self, time: int) -> "Config":
    return dataclasses.replace(self, time=time)


CONFIGS = {
    # Loop overhead dominates: a tiny step, many steps.
    "small": Config("small", batch=16, time=1000, units=32, features=32),
    "medium": Config("medium", batch=32, time=100, units=128, features=128),
    "large": Config("large", batch=64, time=500, units=256, features=256),
    # For smoke tests and `--quick`.
    "tiny": Config("tiny", batch=4, time=20, units=8, features=8),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """A runnable competitor for one config."""
  name: str
  train: Callable[[tf.Tensor], object]
  infer: Callable[[tf.Tensor], object]


def _loss(outputs: tf.Tensor) -> tf.Tensor:
  return tf.reduce_mean(tf.square(outputs))


def _trainer(forward: Callable, weights: list) -> Callable:
  def train(x):
    with tf.GradientTape() as tape:
      loss = _loss(forward(x))
    return loss, tape.gradient(loss, weights)
  return train


def _inferer(forward: Callable) -> Callable:
  return lambda x: tf.reduce_sum(forward(x))


def _time_major(x: tf.Tensor) -> tf.Tensor:
  return tf.transpose(x, [1, 0, 2])


def _input_array(x: tf.Tensor) -> tuple[tf.TensorArray, int | tf.Tensor]:
  """`x` `[batch, time, ...]` as a `TensorArray` of steps, and `time`."""
  xs = _time_major(x)
  time = xs.shape[0] if xs.shape[0] is not None else tf.shape(xs)[0]
  return tf.TensorArray(x.dtype, size=time).unstack(xs), time


def hand_written_loop(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  """The floor: a minimal `tf.while_loop` + `TensorArray` around the cell
  (or around a step model `[x_t, *states] -> [y_t, *new_states]`)."""
  inputs, time = _input_array(x)
  outputs = tf.TensorArray(x.dtype, size=time)
  if isinstance(cell, keras.Model):
    states = [tf.zeros([tf.shape(x)[0], s.shape[-1]], x.dtype)
              for s in cell.inputs[1:]]
    call = lambda x_t, states: (lambda out: (out[0], out[1:]))(
        cell([x_t, *states]))
  else:
    states = cell.get_initial_state(batch_size=tf.shape(x)[0])
    call = cell

  def body(t, states, outputs):
    y, states = call(inputs.read(t), states)
    return t + 1, states, outputs.write(t, y)

  _, _, outputs = tf.while_loop(lambda t, *_: t < time, body,
                                (0, states, outputs), maximum_iterations=time)
  return _time_major(outputs.stack())


def matmul_skeleton(cell: keras.layers.LSTMCell, x: tf.Tensor,
                    backward: bool = True) -> list[tf.Tensor]:
  """A lower bound: the LSTM step's matmuls alone, step by step.

  Per step, forward: `z = x_t @ kernel + h @ recurrent_kernel`,
  `h = tanh(z[:, :units])` (keeps the chain sequential and bounded);
  backward (a second loop, in reverse): `dz = z_t + tile(dh)` stands in for
  the gate gradients, `dh = dz @ recurrent_kernel^T`, and the two weight
  gradients `x_t^T dz`, `h_{t-1}^T dz` are accumulated. Those are the five
  matmuls, with the shapes and the step-to-step dependencies, that any loop
  running the cell one step at a time must do; the gates' elementwise work,
  the loop's bookkeeping and the weight reads are left out.

  Returns:
    `[d_kernel, d_recurrent_kernel, dh_0]` (or `[h_T]` without `backward`).
  """
  kernel, recurrent = cell.kernel, cell.recurrent_kernel
  units = recurrent.shape[0]
  inputs, time = _input_array(x)
  zs = tf.TensorArray(x.dtype, size=time)
  hs = tf.TensorArray(x.dtype, size=time)
  h0 = tf.zeros([tf.shape(x)[0], units], x.dtype)

  def forward(t, h, zs, hs):
    z = tf.matmul(inputs.read(t), kernel) + tf.matmul(h, recurrent)
    return t + 1, tf.tanh(z[:, :units]), zs.write(t, z), hs.write(t, h)

  _, h, zs, hs = tf.while_loop(lambda t, *_: t < time, forward,
                               (0, h0, zs, hs))
  if not backward:
    return [h]

  def backward_step(t, dh, d_kernel, d_recurrent):
    dz = zs.read(t) + tf.tile(dh, [1, 4])
    return (t - 1, tf.matmul(dz, recurrent, transpose_b=True),
            d_kernel + tf.matmul(inputs.read(t), dz, transpose_a=True),
            d_recurrent + tf.matmul(hs.read(t), dz, transpose_a=True))

  _, dh, d_kernel, d_recurrent = tf.while_loop(
      lambda t, *_: t >= 0, backward_step,
      (time - 1, tf.zeros_like(h), tf.zeros_like(kernel),
       tf.zeros_like(recurrent)))
  return [d_kernel, d_recurrent, dh]


def recurrent_skeleton(cell: keras.layers.LSTMCell, x: tf.Tensor,
                       backward: bool = True) -> list[tf.Tensor]:
  """The bound with the input half hoisted: `matmul_skeleton`'s recurrence
  with `x @ kernel` done for all steps before the loop and `x^T dz` after it.

  Forward: `p = x @ kernel` as one `[batch * time, features]` matmul, then
  per step `z = p_t + h @ recurrent_kernel`, `h = tanh(z[:, :units])`;
  backward per step `dz = z_t + tile(dh)`, `dh = dz @ recurrent_kernel^T`,
  `h_{t-1}^T dz` accumulated, and `dz` kept; then `d_kernel = x^T dz` as one
  matmul. Three matmuls per step, the ones that depend on the state: what
  any loop that hoists the input half must still do step by step.

  Returns:
    `[d_kernel, d_recurrent_kernel, dh_0]` (or `[h_T]` without `backward`).
  """
  kernel, recurrent = cell.kernel, cell.recurrent_kernel
  units = recurrent.shape[0]
  xs = _time_major(x)
  time = xs.shape[0] if xs.shape[0] is not None else tf.shape(xs)[0]
  rows = tf.reshape(xs, [-1, xs.shape[-1]])
  projected = tf.reshape(tf.matmul(rows, kernel),
                         tf.concat([tf.shape(xs)[:2], [4 * units]], 0))
  inputs = tf.TensorArray(x.dtype, size=time).unstack(projected)
  zs = tf.TensorArray(x.dtype, size=time)
  hs = tf.TensorArray(x.dtype, size=time)
  h0 = tf.zeros([tf.shape(x)[0], units], x.dtype)

  def forward(t, h, zs, hs):
    z = inputs.read(t) + tf.matmul(h, recurrent)
    return t + 1, tf.tanh(z[:, :units]), zs.write(t, z), hs.write(t, h)

  _, h, zs, hs = tf.while_loop(lambda t, *_: t < time, forward,
                               (0, h0, zs, hs))
  if not backward:
    return [h]
  dzs = tf.TensorArray(x.dtype, size=time)

  def backward_step(t, dh, d_recurrent, dzs):
    dz = zs.read(t) + tf.tile(dh, [1, 4])
    return (t - 1, tf.matmul(dz, recurrent, transpose_b=True),
            d_recurrent + tf.matmul(hs.read(t), dz, transpose_a=True),
            dzs.write(t, dz))

  _, dh, d_recurrent, dzs = tf.while_loop(
      lambda t, *_: t >= 0, backward_step,
      (time - 1, tf.zeros_like(h), tf.zeros_like(recurrent), dzs))
  d_kernel = tf.matmul(rows, tf.reshape(dzs.stack(), [-1, 4 * units]),
                       transpose_a=True)
  return [d_kernel, d_recurrent, dh]


def _skeleton(cell: keras.layers.LSTMCell, *, jit_compile: bool,
              skeleton: Callable = matmul_skeleton
              ) -> tuple[Callable, Callable]:
  return (tf.function(lambda x: skeleton(cell, x),
                      jit_compile=jit_compile),
          tf.function(lambda x: tf.reduce_sum(
              skeleton(cell, x, backward=False)[0]),
                      jit_compile=jit_compile))


def _scan(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  states = cell.get_initial_state(batch_size=tf.shape(x)[0])
  y0 = tf.zeros_like(states[0])

  def fn(carry, x_t):
    return cell(x_t, carry[1])

  outputs, _ = tf.scan(fn, _time_major(x), initializer=(y0, states))
  return _time_major(outputs)


def _eager_loop(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  states = cell.get_initial_state(batch_size=x.shape[0])
  outputs = []
  for x_t in tf.unstack(x, axis=1):
    y, states = cell(x_t, states)
    outputs.append(y)
  return tf.stack(outputs, axis=1)


def _model_rnn(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  return stepper.model_rnn(cell, x)[0]


def _model_rnn_unroll4(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  return stepper.model_rnn(cell, x, unroll=4)[0]


def _plain_model_rnn(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  with _fastpath.disabled():  # Active while tracing, where it matters.
    return stepper.model_rnn(cell, x, hoist=False)[0]


def _hoisted_model_rnn(cell: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
  return stepper.model_rnn(cell, x, hoist=True)[0]


def _run_chunks(gradient: str, chunk_size: int) -> Callable:
  def forward(cell, x):
    return stepper.run_chunks(cell, x, chunk_size, gradient=gradient)[0]
  return forward


def _graph(forward: Callable, cell: keras.layers.Layer, *,
           jit_compile: bool = False) -> tuple[Callable, Callable]:
  fwd = lambda x: forward(cell, x)
  return (tf.function(_trainer(fwd, cell.trainable_variables),
                      jit_compile=jit_compile),
          tf.function(_inferer(fwd), jit_compile=jit_compile))


def _keras_rnn(cell: keras.layers.Layer) -> tuple[Callable, Callable]:
  layer = keras.layers.RNN(cell, return_sequences=True)
  return _graph(lambda _, x: layer(x), cell)


def _builtin(layer_class: type, config: Config) -> tuple[Callable, Callable]:
  layer = layer_class(config.units, return_sequences=True)
  layer.build((config.batch, config.time, config.features))
  return (tf.function(_trainer(layer, layer.trainable_variables)),
          tf.function(_inferer(layer)))


def make_step_model(config: Config, seed: int = 0) -> keras.Model:
  """An LSTM written as a functional step model `[x_t, h, c] -> [h, h, c]`:
  `LayerNormalization` and a `Dense` projection of `x_t` (hoistable), a
  `Dense` of `h`, and the gates in `keras.ops`."""
  keras.utils.set_random_seed(seed)
  x = keras.Input((config.features,))
  h, c = keras.Input((config.units,)), keras.Input((config.units,))
  p = keras.layers.Dense(4 * config.units)(keras.layers.LayerNormalization()(x))
  z = p + keras.layers.Dense(4 * config.units, use_bias=False)(h)
  i, f, g, o = keras.ops.split(z, 4, axis=-1)
  c_new = keras.ops.sigmoid(f) * c + keras.ops.sigmoid(i) * keras.ops.tanh(g)
  h_new = keras.ops.sigmoid(o) * keras.ops.tanh(c_new)
  return keras.Model([x, h, c], [h_new, h_new, c_new])


def _make_gru(config: Config) -> keras.layers.GRUCell:
  return make_cell(config, cell_class=keras.layers.GRUCell)


def _with(make: Callable, forward: Callable, config: Config, *,
          jit_compile: bool = False) -> tuple[Callable, Callable]:
  """`_graph` around a step of its own (`make(config)`), not the shared cell."""
  return _graph(forward, make(config), jit_compile=jit_compile)


# name -> (description, builder(config, cell, chunk_size) -> (train, infer)).
_BUILDERS = {
    "while_loop": (
        "hand-written tf.while_loop + TensorArray (the floor)",
        lambda c, cell, k: _graph(hand_written_loop, cell)),
    "keras_lstm": (
        "keras.layers.LSTM (own fused kernel; cuDNN on GPU)",
        lambda c, cell, k: _builtin(keras.layers.LSTM, c)),
    "keras_gru": (
        "keras.layers.GRU (a GRU: 3 gates, not 4; cuDNN on GPU)",
        lambda c, cell, k: _builtin(keras.layers.GRU, c)),
    "keras_rnn": (
        "keras.layers.RNN(LSTMCell)",
        lambda c, cell, k: _keras_rnn(cell)),
    "eager_loop": (
        "Python loop, eager",
        lambda c, cell, k: (
            _trainer(lambda x: _eager_loop(cell, x), cell.trainable_variables),
            _inferer(lambda x: _eager_loop(cell, x)))),
    "tf_scan": (
        "tf.scan",
        lambda c, cell, k: _graph(_scan, cell)),
    "stepper": (
        "stepper.model_rnn in tf.function",
        lambda c, cell, k: _graph(_model_rnn, cell)),
    "stepper_xla": (
        "stepper.model_rnn in tf.function(jit_compile=True)",
        lambda c, cell, k: _graph(_model_rnn, cell, jit_compile=True)),
    "stepper_unroll4": (
        "stepper.model_rnn(unroll=4) in tf.function",
        lambda c, cell, k: _graph(_model_rnn_unroll4, cell)),
    "stepper_xla_unroll4": (
        "stepper.model_rnn(unroll=4) in tf.function(jit_compile=True)",
        lambda c, cell, k: _graph(_model_rnn_unroll4, cell, jit_compile=True)),
    "stepper_hoist": (
        "stepper.model_rnn(hoist=True): the input half (x @ kernel) for all "
        "steps before the loop, tf.function",
        lambda c, cell, k: _graph(_hoisted_model_rnn, cell)),
    "stepper_hoist_xla": (
        "stepper.model_rnn(hoist=True) in tf.function(jit_compile=True)",
        lambda c, cell, k: _graph(_hoisted_model_rnn, cell,
                                  jit_compile=True)),
    "stepper_plain": (
        "stepper.model_rnn without its fast paths (before), tf.function",
        lambda c, cell, k: _graph(_plain_model_rnn, cell)),
    "stepper_plain_xla": (
        "stepper.model_rnn without its fast paths (before), XLA",
        lambda c, cell, k: _graph(_plain_model_rnn, cell, jit_compile=True)),
    "while_loop_xla": (
        "the hand-written loop in tf.function(jit_compile=True)",
        lambda c, cell, k: _graph(hand_written_loop, cell, jit_compile=True)),
    "matmul_skeleton": (
        "lower bound: the cell's five matmuls per step alone, no gates "
        "(tf.function)",
        lambda c, cell, k: _skeleton(cell, jit_compile=False)),
    "matmul_skeleton_xla": (
        "lower bound: the cell's five matmuls per step alone, no gates (XLA)",
        lambda c, cell, k: _skeleton(cell, jit_compile=True)),
    "recurrent_skeleton": (
        "lower bound with the input half hoisted: three matmuls per step "
        "(tf.function)",
        lambda c, cell, k: _skeleton(cell, jit_compile=False,
                                     skeleton=recurrent_skeleton)),
    "recurrent_skeleton_xla": (
        "lower bound with the input half hoisted: three matmuls per step "
        "(XLA)",
        lambda c, cell, k: _skeleton(cell, jit_compile=True,
                                     skeleton=recurrent_skeleton)),
    "run_chunks_through": (
        "stepper.run_chunks(gradient='through') in tf.function",
        lambda c, cell, k: _graph(_run_chunks("through", k), cell)),
    "run_chunks_truncate": (
        "stepper.run_chunks(gradient='truncate') in tf.function",
        lambda c, cell, k: _graph(_run_chunks("truncate", k), cell)),
}

# Other steps, each against its own hand-written loop (the `_gru`, `_model`
# rows).
for _suffix, _make, _what in (
    ("gru", _make_gru, "GRUCell"),
    ("model", make_step_model, "LSTM step model")):
  _BUILDERS.update({
      f"while_loop_{_suffix}": (
          f"hand-written loop around a {_what} (the floor for the _{_suffix} "
          "rows)",
          lambda c, cell, k, make=_make: _with(make, hand_written_loop, c)),
      f"stepper_{_suffix}": (
          f"stepper.model_rnn({_what}) in tf.function",
          lambda c, cell, k, make=_make: _with(make, _model_rnn, c)),
      f"stepper_{_suffix}_xla": (
          f"stepper.model_rnn({_what}) in tf.function(jit_compile=True)",
          lambda c, cell, k, make=_make: _with(make, _model_rnn, c,
                                               jit_compile=True)),
      f"stepper_{_suffix}_hoist": (
          f"stepper.model_rnn({_what}, hoist=True) in tf.function",
          lambda c, cell, k, make=_make: _with(make, _hoisted_model_rnn, c)),
  })

NAMES = tuple(_BUILDERS)
FLOOR = "while_loop"


def floor_of(name: str) -> str:
  """The hand-written loop a variant's ratio is taken to: `while_loop`, or
  the `_gru` / `_model` rows' own loop."""
  for suffix in ("_gru", "_model"):
    if name.endswith(suffix) or suffix + "_" in name:  # `_xla`, `_hoist`.
      return FLOOR + suffix
  return FLOOR


def describe(name: str) -> str:
  return _BUILDERS[name][0]


def unavailable(name: str) -> str | None:
  """Why a variant cannot run in this checkout, or None if it can."""
  if name.startswith("run_chunks") and not hasattr(stepper, "run_chunks"):
    return "stepper.run_chunks does not exist in this checkout"
  return None


def make_cell(config: Config, seed: int = 0,
              cell_class: type = keras.layers.LSTMCell) -> keras.layers.Layer:
  """The LSTM cell shared by the loop variants (or a `cell_class` cell),
  built for `config`."""
  keras.utils.set_random_seed(seed)
  cell = cell_class(config.units)
  cell.build((config.batch, config.features))
  return cell


def make_inputs(config: Config, seed: int = 0) -> tf.Tensor:
  return tf.random.stateless_normal(
      [config.batch, config.time, config.features], seed=[seed, 1])


def build(name: str, config: Config, cell: keras.layers.Layer,
          chunk_size: int) -> Variant:
  """Builds variant `name` for `config` around `cell`.

  Raises:
    ValueError: For an unknown name or a variant that cannot run here.
  """
  if name not in _BUILDERS:
    raise ValueError(f"Unknown variant {name!r}; expected one of {NAMES}.")
  reason = unavailable(name)
  if reason:
    raise ValueError(f"Variant {name!r} cannot run: {reason}.")
  train, infer = _BUILDERS[name][1](config, cell, min(chunk_size, config.time))
  return Variant(name, train, infer)


def force(result: object) -> None:
  """Waits for every tensor in `result` (copies scalars/small grads to host)."""
  for leaf in tf.nest.flatten(result):
    if leaf is not None:
      leaf.numpy()

"""What a training stream carries from batch to batch (`Trainer(stream=True)`).

In stream mode row `b` of every batch continues row `b` of the previous
batch (`stepper.data.streams` builds such datasets). Truncated BPTT(k2; k1)
over a stream makes exactly the updates of one batch holding the whole
streams; an update's gradient reaches `k2 - k1` steps further back than its
`k1` loss steps, possibly into earlier batches. Between batches the stream
therefore keeps:

* `states`: the state entering the next update's backpropagated window (a
  constant, computed by the previous update's forward pass);
* `history`: the last `min(k2 - k1, steps so far)` steps of inputs, targets
  and resets, which that window runs through again.

For `k1 = 2, k2 = 5`, batches of 4 steps (batch 1 = steps 4-7)::

  stream step   0 1 2 3 | 4 5 6 7
  update 2        . . . | L L           loss on 4-5, backprop to step 1
  update 3            . | . . L L       loss on 6-7, backprop to step 3
  kept for batch 2: the state entering step 5; history = steps 5-7

With full BPTT (`tbptt=None`) `history` is empty and `states` is the state
after the batch's last step: each batch is one update whose gradient stops
at the batch's first step (Keras' `stateful=True`).

>>> signal = np.random.default_rng(0).normal(size=(400, 2)).astype("float32")
>>> dataset = stepper.data.streams(signal, signal[:, :1], batch_size=4,
...                                window=5)
>>> trainer = stepper.Trainer(
...     keras.layers.GRUCell(8), keras.layers.Dense(1), loss="mse",
...     optimizer=keras.optimizers.SGD(0.1), tbptt=(5, 15), stream=True)
>>> _ = trainer.fit(dataset, verbose=0)
>>> trainer.global_step  # 100 steps per stream, an update every 5.
20

Semantics pinned by the tests: separate `fit` calls continue the stream (a
new `fit` picks up the carried state and history); a new epoch inside one
`fit` starts the stream over from the initial state; `reset_states()` drops
the carried state and the history, and the update grid restarts at the next
batch. With TBPTT every batch's length must be a multiple of `k1`, except a
last shorter batch that ends the stream (its remainder makes the last,
partial update, as in one long batch). `evaluate` carries its own state
across its batches from the initial state and leaves the training stream
alone. Checkpoints hold the data position (the iterator), the carried state
and the history; under a `tf.distribute.Strategy` neither the iterator nor
the stream is checkpointed (a resumed `fit` restarts both), and each replica
carries its own rows.

`StreamState` is checkpointed with the model: its variables are copied from
the carried tensors before a save and back after a restore.
"""

from typing import Any, Callable

import tensorflow as tf

from stepper import _checks

Nest = Any


class StreamState:
  """The carried state and the TBPTT history of one training stream.

  Under a `tf.distribute.Strategy`, `states` and `history` hold per-replica
  values: each replica carries its own rows.

  Attributes:
    states: The carried states (per replica), or `None` at a stream's start.
    history: The last steps of the stream's elements, `(inputs, targets)`
      or `(inputs, targets, resets)` (per replica), each leaf
      `[rows, steps, ...]`, or `None`.
    ended: The length of the stream's last batch once one shorter than
      `k1`'s grid came (no batch may follow), else False.
  """

  def __init__(self, strategy: tf.distribute.Strategy, *, k1: int | None,
               overlap: int):
    """Creates an empty stream.

    Args:
      strategy: The strategy whose replicas carry the rows.
      k1: The update grid in steps (every batch but a stream's last must be
        a multiple of it), or `None` for one update per batch.
      overlap: Steps of history the next batch's updates run through again
        (`k2 - k1` for TBPTT, else 0).
    """
    self._strategy = strategy
    self._k1 = k1
    self._overlap = overlap
    self._structures = None  # Set by `build`.
    self._checkpoint = tf.Module(name="stream")
    self._checkpointed = False  # Set by `checkpoint_parts`.
    # Per replica, compiled; one function each (the history's length varies
    # only until it reaches `k2 - k1`).
    self._extend = tf.function(self._replica_extend, reduce_retracing=True)
    self._tail = tf.function(self._replica_tail, reduce_retracing=True)
    self.reset()

  def _replica_extend(self, history: tuple, element: tuple) -> tuple:
    return self._strategy.run(extend, (history, element))

  def _replica_tail(self, element: tuple) -> tuple:
    return self._strategy.run(lambda e: tail(e, self._overlap), (element,))

  def reset(self) -> None:
    """Back to a stream's start: no carried state, no history; the update
    grid restarts at the next batch."""
    self.states = None
    self.history = None
    self.ended = False
    self._rows = None

  def begin(self, element: tuple) -> tuple[tuple, Any, int, int]:
    """The next batch, checked and extended by the history.

    Args:
      element: A (distributed) dataset element, each leaf
        `[rows, time, ...]`.

    Returns:
      `(element, states, offset, time)`: `element` with the `offset` history
      steps in front, the carried states (`None` at a stream's start) and
      the batch's own number of steps.

    Raises:
      ValueError: If the rows changed since the last batch, or a batch
        follows the stream's last (shorter) batch.
    """
    local = self._strategy.experimental_local_results(element[1])
    rows = tuple(int(t.shape[0]) for t in local)
    if self._rows is not None and rows != self._rows:
      raise ValueError(
          f"The stream `dataset`'s batch size changed from "
          f"{sum(self._rows)} to {sum(rows)} rows (per replica: "
          f"{list(self._rows)} -> {list(rows)}); in stream mode row b of "
          "every batch continues row b of the last. Build the dataset with "
          "stepper.data.streams, or call reset_states() between streams.")
    if self.ended:
      raise ValueError(
          f"The stream `dataset` has a batch after one of {self.ended} "
          f"steps; in stream mode with truncated BPTT every batch's length "
          f"must be a multiple of k1 = {self._k1}, except a stream's last. "
          "Use windows that are multiples of k1, or call reset_states() to "
          "start a new stream.")
    self._rows = rows
    time = int(local[0].shape[1])
    if self.history is None:
      return element, self.states, 0, time
    offset = int(self._strategy.experimental_local_results(
        self.history[1])[0].shape[1])
    return self._extend(self.history, element), self.states, offset, time

  def end(self, element: tuple, states: Any, time: int) -> None:
    """Records what the batch just trained leaves for the next one.

    Args:
      element: The batch as `begin` returned it (with the history).
      states: The states entering the next update's window (per replica).
      time: The batch's own number of steps.
    """
    self.states = states
    self.history = self._tail(element) if self._overlap else None
    if self._k1 is not None and time % self._k1:
      self.ended = time  # Truthy: only a new stream may follow.

  # Checkpoints.

  def build(self, states: Nest, element_spec: tuple) -> None:
    """Creates the checkpoint variables, like `states` (one replica's, any
    batch) and the dataset's `element_spec` (any number of steps)."""
    if self._structures is not None:
      return
    def variable(spec, name):  # Any shape: rows and steps vary.
      return tf.Variable(tf.zeros([0], spec.dtype), trainable=False,
                         shape=tf.TensorShape(None), name=name)
    self._structures = (states, tuple(element_spec))
    module = self._checkpoint
    module.states = [variable(s, "state") for s in tf.nest.flatten(states)]
    module.history = [variable(s, "history")
                      for s in tf.nest.flatten(tuple(element_spec))]
    module.flags = tf.Variable([0, 0, 0], trainable=False,
                               name="has_states_has_history_ended")

  def checkpoint_parts(self) -> dict:
    """What a `tf.train.Checkpoint` of a trainer without a strategy holds
    for this stream; `save` and `restore` then
    move the carried tensors in and out."""
    if self._structures is None:
      return {}
    self._checkpointed = True
    return {"stream": self._checkpoint}

  def save(self) -> None:
    """Copies the carried tensors into the variables (one replica: the
    trainer checkpoints a stream only without a strategy, like the data
    iterator)."""
    if not self._checkpointed:
      return
    module = self._checkpoint
    module.flags.assign([int(self.states is not None),
                         int(self.history is not None), int(self.ended)])
    for part, variables in ((self.states, module.states),
                            (self.history, module.history)):
      if part is not None:
        for variable, value in zip(variables, tf.nest.flatten(part)):
          variable.assign(value)

  def restore(self) -> None:
    """Sets the carried tensors from the (restored) variables."""
    if not self._checkpointed:
      return
    has_states, has_history, ended = [
        int(f) for f in self._checkpoint.flags.numpy()]
    self.reset()
    states, history = self._structures
    module = self._checkpoint
    if has_states:
      self.states = tf.nest.pack_sequence_as(
          states, [v.value() for v in module.states])
      self._rows = (int(tf.nest.flatten(self.states)[0].shape[0]),)
    if has_history:
      self.history = tf.nest.pack_sequence_as(
          history, [v.value() for v in module.history])
    self.ended = ended


def check_stream_spec(spec: tuple, k1: int | None, name: str) -> None:
  """Static checks of a stream dataset's `element_spec`.

  Raises:
    ValueError: If the batches' static length is not a multiple of `k1`.
  """
  time = tf.nest.flatten(spec[1])[0].shape[1]
  if k1 is not None and time is not None and time % k1:
    raise ValueError(
        f"`{name}` has {time} steps per batch; in stream mode with "
        f"truncated BPTT every batch's length must be a multiple of k1 = "
        f"{k1} (only a stream's last batch may be shorter), so that "
        "the updates continue across batches. Use a window that is a "
        "multiple of k1 (stepper.data.streams(..., window=...)).")


def check_element_spec(spec: Any, name: str,
                       static_time: bool = False) -> tuple:
  """A training dataset's elements must be `(inputs, targets)` or
  `(inputs, targets, resets)`: inputs `[batch, time, ...]` (known after
  `time`; `time` too with `static_time`), one targets tensor, `resets` bool
  `[batch, time]`.

  Returns:
    The inputs' and the targets' specs.

  Raises:
    TypeError: If `resets` is not bool.
    ValueError: For any other mismatch, naming `name`'s part.
  """
  if not isinstance(spec, tuple) or len(spec) not in (2, 3):
    raise ValueError(
        f"`{name}` elements must be pairs (inputs, targets) or triples "
        f"(inputs, targets, resets); got elements {spec}.")
  for path, s in zip(_checks.leaf_paths(spec[0], f"{name} inputs"),
                     tf.nest.flatten(spec[0])):
    _checks.check_rank_at_least(s, 3, path, "[batch, time, ...]")
    if not s.shape[2:].is_fully_defined():
      raise ValueError(f"{path} has shape {_checks.shape_str(s.shape)}; "
                       "the dimensions after [batch, time] must be known.")
    if static_time and s.shape[1] is None:
      raise ValueError(
          f"{path} has shape {_checks.shape_str(s.shape)}; truncated BPTT "
          "needs a static number of time steps (it sets the windows).")
  if not isinstance(spec[1], tf.TensorSpec):
    raise ValueError(f"`{name}` targets must be one tensor; got "
                     f"{spec[1]}.")
  resets = resets_of(spec)
  if resets is not None:
    if not isinstance(resets, tf.TensorSpec) or resets.dtype != tf.bool:
      got = resets.dtype.name if isinstance(resets, tf.TensorSpec) else resets
      raise TypeError(f"`{name}` resets must be bool [batch, time] (True "
                      f"where a sequence starts); got {got}.")
    if resets.shape.rank != 2:
      raise ValueError(f"`{name}` resets must be bool [batch, time]; got "
                       f"shape {tuple(resets.shape)}.")
  return spec[0], spec[1]


def resets_of(element: tuple) -> Any:
  """A dataset element's `resets`, or None for `(inputs, targets)`."""
  return element[2] if len(element) > 2 else None


def extend(history: tuple | None, element: tuple) -> tuple:
  """The batch with the history's steps in front (one replica's rows).

  Args:
    history: `None`, or like `element`, each leaf `[rows, steps, ...]`.
    element: A dataset element `(inputs, targets)` or `(inputs, targets,
      resets)`, each leaf `[rows, time, ...]`.

  Returns:
    Like `element`, each leaf `[rows, steps + time, ...]`.
  """
  if history is None:
    return element
  return tf.nest.map_structure(lambda a, b: tf.concat([a, b], 1), history,
                               element)


def tail(element: tuple, steps: int) -> tuple:
  """The last `steps` steps of each leaf of `element` (all of them if it is
  shorter): the next batch's history."""
  return tf.nest.map_structure(
      lambda t: t[:, tf.maximum(0, tf.shape(t)[1] - steps):], element)

"""Step models and cells shared by several test modules."""

import collections

import keras
import tensorflow as tf


def step_model(cell, features, dtype):
  """A functional step model `[x_t, *states] -> [y_t, *new_states]`."""
  x = keras.Input((features,), dtype=dtype)
  states = [keras.Input((size,), dtype=dtype)
            for size in tf.nest.flatten(cell.state_size)]
  y, new_states = cell(x, states)
  return keras.Model([x, *states], [y, *new_states])


NestedInput = collections.namedtuple("NestedInput", ["feature1", "feature2"])
NestedState = collections.namedtuple("NestedState", ["state1", "state2"])


class NestedCell(keras.layers.Layer):
  """The nested-input, nested-state cell of seed 002 (plus a tanh)."""

  def __init__(self, unit_1, unit_2, unit_3, **kwargs):
    super().__init__(**kwargs)
    self.state_size = NestedState(state1=unit_1,
                                  state2=tf.TensorShape([unit_2, unit_3]))
    self.output_size = (unit_1, tf.TensorShape([unit_2, unit_3]))
    self.units = unit_1, unit_2, unit_3

  def build(self, input_shapes):
    u1, u2, u3 = self.units
    i1 = input_shapes.feature1[-1]
    i2, i3 = input_shapes.feature2[-2:]
    self.kernel_1 = self.add_weight(shape=(i1, u1), initializer="uniform",
                                    name="kernel_1")
    self.kernel_2_3 = self.add_weight(shape=(i2, i3, u2, u3),
                                      initializer="uniform", name="kernel_2_3")

  def call(self, inputs, states):
    s1, s2 = states
    out_1 = tf.tanh(tf.matmul(inputs.feature1, self.kernel_1) + 0.5 * s1)
    out_2_3 = tf.einsum("bij,ijkl->bkl", inputs.feature2, self.kernel_2_3)
    return (out_1, out_2_3), NestedState(state1=out_1, state2=s2 + out_2_3)

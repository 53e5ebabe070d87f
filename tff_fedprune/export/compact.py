"""Channels-last tensors of which only some channels are non-zero.

The representation `export.tflite` keeps between the layers of an export: a
gated layer's output is its k kept channels and their indices, carried
compact through pooling and activations and scattered to full width only
where a layer needs every channel.
"""

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Compact:
  """A channels-last tensor of which only `indices` (of `width`) are non-zero.

  `indices` is a tensor (chosen per input) or, for a fixed channel set, a
  sorted numpy array, whose slicing is done at export.
  """

  values: tf.Tensor
  indices: tf.Tensor | np.ndarray
  width: int

  @property
  def fixed(self) -> bool:
    return isinstance(self.indices, np.ndarray)

  def full(self) -> tf.Tensor:
    if self.fixed:
      # A constant (k, width) 0/1 matrix: FULLY_CONNECTED with constant weights.
      return channel_matmul(
          self.values, np.eye(self.width, dtype=np.float32)[self.indices])
    shape = tf.shape(self.values)
    flat = tf.reshape(self.values, [-1, shape[-1]])
    # (width, k) one-hot: a FULLY_CONNECTED with runtime weights.
    scatter = tf.one_hot(self.indices, self.width, axis=0,
                         dtype=self.values.dtype)
    full = tf.matmul(flat, scatter, transpose_b=True)
    return tf.reshape(full, tf.concat([shape[:-1], [self.width]], 0))

  def select(self, indices: np.ndarray) -> tf.Tensor:
    """The values of channels `indices` (fixed sets; others count as 0)."""
    if np.array_equal(self.indices, indices):
      return self.values
    selection = (self.indices[:, None] == indices[None, :]).astype(np.float32)
    return channel_matmul(self.values, selection)

  def flatten(self) -> 'Compact':
    """Keras `Flatten` of the full tensor, kept compact (fixed sets only)."""
    _, h, w, k = self.values.shape
    positions = np.arange(h * w)[:, None] * self.width
    return Compact(tf.reshape(self.values, [-1, h * w * k]),
                    (positions + self.indices[None, :]).ravel(),
                    h * w * self.width)


def full(x):
  return x.full() if isinstance(x, Compact) else x


def channel_matmul(x, matrix: np.ndarray):
  """x (..., C) @ a constant (C, C') matrix: a FULLY_CONNECTED."""
  shape = tf.shape(x)
  y = tf.matmul(tf.reshape(x, [-1, shape[-1]]), matrix)
  return tf.reshape(y, tf.concat([shape[:-1], [matrix.shape[1]]], 0))


def narrowed_sum(inputs, indices: np.ndarray, width: int) -> 'Compact':
  """A residual addition computed on the channels `indices` only."""
  total = None
  for x in inputs:
    if isinstance(x, Compact) and not x.fixed:
      x = x.full()
    part = (x.select(indices) if isinstance(x, Compact)
            else channel_matmul(x, np.eye(width, dtype=np.float32)[:, indices]))
    total = part if total is None else total + part
  return Compact(total, indices, width)


def is_fixed(x):
  return isinstance(x, Compact) and x.fixed

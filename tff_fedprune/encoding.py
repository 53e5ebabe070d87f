"""Sparse encoding of masked client updates (docs/design.md, section 3).

Each tensor of a masked update travels in the smallest of three forms:

* dense: all values as float32, when every coordinate is kept;
* bitmap: the kept values (float32) plus a 1-bit-per-coordinate mask;
* gaps: the kept values plus their positions, delta-coded and bit-packed at
  ceil(log2(size)) bits (only for tensors of at most 2**16 coordinates).

The mask travels with the values (a coordinate sent with value 0 still counts
as sent), so the server recovers both the update and its mask exactly. Bit
packing and delta coding are tensorflow-model-optimization's tensor_encoding
stages (`BitpackingEncodingStage`, `DifferenceBetweenIntegersEncodingStage`),
the library behind `tff.aggregators.EncodedSumFactory`; they pack 28 bits into
each int32 so that every word fits a 4-byte varint. `encoded_bytes` is the
exact size of what `encode` emits: 4 bytes per float32 or int32 element.
"""

import collections
import math

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages import stages_impl
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages.research import misc

DENSE, BITMAP, GAPS = 'dense', 'bitmap', 'gaps'
_WORD_BITS = 28  # tfmot packs into 28 of the 32 bits of each int32 word.
_MAX_GAP_BITS = 16  # tfmot's BitpackingEncodingStage accepts 1..16 bits.


def gap_bits(size: int) -> int:
  """Bits per delta-coded position for a tensor of `size` coordinates."""
  return max(1, math.ceil(math.log2(max(size, 2))))


class TensorCodec:
  """Encodes and decodes one tensor shape (as graph code for TFF)."""

  def __init__(self, shape):
    self.shape = tf.TensorShape(shape)
    self.size = int(np.prod(self.shape.as_list()))
    self._bitmap = stages_impl.BitpackingEncodingStage(1)
    bits = gap_bits(self.size)
    self._gaps_allowed = bits <= _MAX_GAP_BITS
    if self._gaps_allowed:
      self._gap_pack = stages_impl.BitpackingEncodingStage(bits)
      self._delta = misc.DifferenceBetweenIntegersEncodingStage()

  @property
  def encoded_spec(self) -> collections.OrderedDict:
    return collections.OrderedDict(
        dense=tf.TensorSpec([None], tf.float32),
        values=tf.TensorSpec([None], tf.float32),
        bitmap=tf.TensorSpec([None], tf.int32),
        gaps=tf.TensorSpec([None], tf.int32),
    )

  def encode(self, update, mask) -> collections.OrderedDict:
    """The smallest form of `update` restricted to `mask` (0/1 floats)."""
    flat = tf.reshape(update, [-1])
    kept = tf.reshape(mask, [-1]) > 0.5
    positions = tf.cast(tf.where(kept)[:, 0], tf.int32)
    num_kept = tf.size(positions)
    values = tf.gather(flat, positions)
    empty_f = tf.zeros([0], tf.float32)
    empty_i = tf.zeros([0], tf.int32)
    words = lambda bits: (num_kept * bits + _WORD_BITS - 1) // _WORD_BITS
    bitmap_words = -(-self.size // _WORD_BITS)

    def as_dense():
      return flat, empty_f, empty_i, empty_i

    def as_bitmap():
      packed = self._bitmap.encode(tf.cast(kept, tf.float32), {})
      return empty_f, values, packed[self._bitmap.ENCODED_VALUES_KEY], empty_i

    def as_gaps():
      diffs = self._delta.encode(positions, {})[self._delta.ENCODED_VALUES_KEY]
      packed = self._gap_pack.encode(tf.cast(diffs, tf.float32), {})
      return empty_f, values, empty_i, packed[self._gap_pack.ENCODED_VALUES_KEY]

    if self._gaps_allowed:
      sparse = tf.cond(
          words(gap_bits(self.size)) < bitmap_words, as_gaps, as_bitmap
      )
    else:
      sparse = as_bitmap()
    dense, values, bitmap, gaps = tf.cond(
        tf.equal(num_kept, self.size), as_dense, lambda: sparse
    )
    return collections.OrderedDict(
        dense=dense, values=values, bitmap=bitmap, gaps=gaps
    )

  def decode(self, encoded):
    """(update, mask) back from `encode`'s output."""
    dense, values = encoded['dense'], encoded['values']
    bitmap, gaps = encoded['bitmap'], encoded['gaps']

    def from_dense():
      return dense, tf.ones([self.size], tf.float32)

    def positions_from_bitmap():
      unpacked = self._bitmap.decode(
          {self._bitmap.ENCODED_VALUES_KEY: bitmap}, {}, shape=[self.size]
      )
      return tf.cast(tf.where(unpacked > 0.5)[:, 0], tf.int32)

    def positions_from_gaps():
      diffs = self._gap_pack.decode(
          {self._gap_pack.ENCODED_VALUES_KEY: gaps}, {},
          shape=tf.shape(values),
      )
      return self._delta.decode(
          {self._delta.ENCODED_VALUES_KEY: tf.cast(diffs, tf.int32)}, {}
      )

    def positions_from_sparse():
      if self._gaps_allowed:
        return tf.cond(
            tf.size(gaps) > 0, positions_from_gaps, positions_from_bitmap
        )
      return positions_from_bitmap()

    def from_sparse():
      positions = tf.cond(
          tf.size(values) > 0,
          positions_from_sparse,
          lambda: tf.zeros([0], tf.int32),
      )
      index = positions[:, tf.newaxis]
      update = tf.scatter_nd(index, values, [self.size])
      mask = tf.scatter_nd(index, tf.ones_like(values), [self.size])
      return update, mask

    update, mask = tf.cond(tf.size(dense) > 0, from_dense, from_sparse)
    return tf.reshape(update, self.shape), tf.reshape(mask, self.shape)


def encoded_bytes(encoded) -> tf.Tensor:
  """Exact bytes of an encoded structure: 4 per float32/int32 element."""
  return tf.add_n(
      [tf.cast(tf.size(t), tf.int64) * 4 for t in tf.nest.flatten(encoded)]
  )

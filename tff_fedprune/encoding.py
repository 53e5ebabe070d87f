"""Sparse, optionally quantised encoding of masked client updates.

docs/design.md, section 3. A tensor's kept values and their positions travel
separately; the server recovers both the update and its mask (a coordinate
sent with value 0 still counts as sent).

Positions, in the smallest form that describes the mask exactly:

* none: every coordinate kept, or none (then nothing at all is sent);
* bitmap: 1 bit per coordinate;
* gaps: the number kept, then delta-coded positions at ceil(log2(size)) bits;
* channels (tensors of rank >= 2): one bit per index of every axis, when the
  mask is their outer product. The salience mask of a kernel is (input
  channel kept) x (output channel salient), so a 3x3x64x64 kernel's positions
  cost 134 bits instead of 36,864.

Values: float32 (`bits=32`), or quantised to `bits` in {16, 8, 4} between the
tensor's smallest and largest kept value (both sent as float32) with
stochastic rounding, so the decoded value is an unbiased estimate of the
sent one. The rounding draws from a stateless generator seeded by the
caller (the learning process uses (run seed, round, client)), so a rerun
reproduces every bit.

Built on tensorflow-model-optimization's tensor_encoding library (the one
behind `tff.aggregators.EncodedSumFactory`): `UniformQuantizationEncodingStage`
quantises (deterministic rounding of the input plus a uniform dither of one
quantisation step is exactly stochastic rounding),
`DifferenceBetweenIntegersEncodingStage` delta-codes positions, and
`tf_utils.pack_into_int` packs integers into 31 of the 32 bits of each int32
word (tfmot's own bit-packing stage uses 28). `encoded_bytes` is the exact
size of what `encode` emits: 4 bytes per float32 or int32 element.
"""

import collections
import math
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages import stages_impl
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages.research import misc
from tensorflow_model_optimization.python.core.internal.tensor_encoding.utils import tf_utils

UPLOAD_BITS = (32, 16, 8, 4)
NONE, BITMAP, GAPS, CHANNELS = 'none', 'bitmap', 'gaps', 'channels'
WORD_BITS = 31  # pack_into_int round-trips at 31 bits; 32 would overflow.


def gap_bits(size: int) -> int:
  """Bits per delta-coded position for a tensor of `size` coordinates."""
  return max(1, math.ceil(math.log2(max(size, 2))))


def check_upload_bits(bits: int) -> None:
  if bits not in UPLOAD_BITS:
    raise ValueError(f'upload_bits must be one of {UPLOAD_BITS}, got {bits}')


def pack(values, bits: int):
  """int32 values in [0, 2**bits) packed into int32 words of 31 bits."""
  packed = tf_utils.pack_into_int(tf.reshape(values, [-1]), bits, WORD_BITS)
  return tf.reshape(packed, [-1])


def unpack(words, bits: int, count):
  """The first `count` values `pack(values, bits)` packed into `words`."""
  return tf_utils.unpack_from_int(
      tf.reshape(words, [-1, 1]), bits, WORD_BITS, [count]
  )


def _outer(indicators):
  """The outer product of one 0/1 vector per axis, shaped by their lengths."""
  rank = len(indicators)
  outer = tf.ones([1] * rank)
  for axis, indicator in enumerate(indicators):
    outer = outer * tf.reshape(
        indicator, [-1 if a == axis else 1 for a in range(rank)]
    )
  return outer


def _words(num_bits):
  return (num_bits + WORD_BITS - 1) // WORD_BITS


class TensorCodec:
  """Encodes and decodes one tensor shape (as graph code for TFF)."""

  def __init__(self, shape, bits: int = 32):
    check_upload_bits(bits)
    self.shape = tf.TensorShape(shape)
    self.dims = self.shape.as_list()
    self.size = int(np.prod(self.dims))
    self.bits = bits
    self._gap_bits = gap_bits(self.size)
    self._delta = misc.DifferenceBetweenIntegersEncodingStage()
    if bits < 32:
      self._quantizer = stages_impl.UniformQuantizationEncodingStage(
          bits=bits, stochastic=False
      )

  def encode(self, update, mask, seed=None) -> collections.OrderedDict:
    """`update` restricted to `mask` (0/1 floats), in its smallest form.

    `seed` (int [2]) seeds the stochastic rounding; needed when bits < 32.
    """
    flat = tf.reshape(update, [-1])
    kept = tf.reshape(mask, [-1]) > 0.5
    positions = tf.cast(tf.where(kept)[:, 0], tf.int32)
    count = tf.size(positions)
    encoded = self._encode_positions(kept, positions, count)
    values = tf.gather(flat, positions)
    if self.bits == 32:
      encoded['values'] = values
    else:
      if seed is None:
        raise ValueError(f'{self.bits}-bit values need a rounding seed')
      encoded['quantized'], encoded['value_range'] = tf.cond(
          count > 0,
          lambda: self._quantize(values, seed),
          lambda: (tf.zeros([0], tf.int32), tf.zeros([0], tf.float32)),
      )
    return encoded

  def _channel_indicators(self, kept):
    """Per-axis 0/1 vectors and whether the mask is their outer product."""
    grid = tf.reshape(tf.cast(kept, tf.float32), self.dims)
    rank = len(self.dims)
    axes = [
        tf.reduce_max(grid, axis=[a for a in range(rank) if a != axis])
        for axis in range(rank)
    ]
    exact = tf.reduce_all(tf.equal(_outer(axes), grid))
    return tf.cast(tf.concat(axes, 0), tf.int32), exact

  def _encode_positions(self, kept, positions, count):
    empty = tf.zeros([0], tf.int32)
    costs = [
        tf.where(
            tf.logical_or(tf.equal(count, 0), tf.equal(count, self.size)),
            0, 1 << 30,
        ),
        tf.constant(_words(self.size)),
        1 + _words(count * self._gap_bits),
    ]
    branches = [
        lambda: (empty, empty, empty),
        lambda: (pack(tf.cast(kept, tf.int32), 1), empty, empty),
        lambda: (empty, tf.concat([[count], pack(
            self._delta.encode(positions, {})[self._delta.ENCODED_VALUES_KEY],
            self._gap_bits)], 0), empty),
    ]
    if len(self.dims) >= 2:
      indicators, exact = self._channel_indicators(kept)
      costs.append(tf.where(exact, _words(sum(self.dims)), 1 << 30))
      branches.append(lambda: (empty, empty, pack(indicators, 1)))
    form = tf.argmin(tf.stack(costs), output_type=tf.int32)
    bitmap, gaps, channels = tf.switch_case(form, branches)
    return collections.OrderedDict(bitmap=bitmap, gaps=gaps, channels=channels)

  def _quantize(self, values, seed):
    low, high = tf.reduce_min(values), tf.reduce_max(values)
    params = self._quantizer_params(tf.stack([low, high]))
    step = (high - low) / (2**self.bits - 1)
    noise = tf_utils.random_floats(tf.size(values), seed) - 0.5
    quantized = self._quantizer.encode(values + noise * step, params)[
        self._quantizer.ENCODED_VALUES_KEY
    ]
    return pack(tf.cast(quantized, tf.int32), self.bits), tf.stack([low, high])

  def _quantizer_params(self, value_range):
    params, _ = self._quantizer.get_params()
    params = collections.OrderedDict(params)
    params[self._quantizer.MIN_MAX_VALUES_KEY] = value_range
    return params

  def _decode_kept(self, encoded, any_values):
    """The flat boolean mask from the position fields."""
    bitmap, gaps, channels = (
        encoded['bitmap'], encoded['gaps'], encoded['channels']
    )

    def from_bitmap():
      return unpack(bitmap, 1, self.size) > 0

    def from_gaps():
      diffs = unpack(gaps[1:], self._gap_bits, gaps[0])
      positions = self._delta.decode(
          {self._delta.ENCODED_VALUES_KEY: diffs}, {}
      )
      return tf.scatter_nd(
          positions[:, tf.newaxis], tf.ones_like(positions), [self.size]
      ) > 0

    def from_channels():
      bits = tf.cast(unpack(channels, 1, sum(self.dims)), tf.float32)
      return tf.reshape(_outer(tf.split(bits, self.dims)) > 0.5, [-1])

    def all_or_nothing():
      return tf.fill([self.size], any_values)

    return tf.case(
        [
            (tf.size(bitmap) > 0, from_bitmap),
            (tf.size(gaps) > 0, from_gaps),
            (tf.size(channels) > 0, from_channels),
        ],
        default=all_or_nothing,
    )

  def decode(self, encoded):
    """(update, mask) back from `encode`'s output."""
    if self.bits == 32:
      any_values = tf.size(encoded['values']) > 0
    else:
      any_values = tf.size(encoded['value_range']) > 0
    kept = self._decode_kept(encoded, any_values)
    positions = tf.cast(tf.where(kept)[:, 0], tf.int32)
    if self.bits == 32:
      values = encoded['values']
    else:
      values = tf.cond(
          any_values,
          lambda: self._dequantize(encoded, tf.size(positions)),
          lambda: tf.zeros([0], tf.float32),
      )
    update = tf.scatter_nd(positions[:, tf.newaxis], values, [self.size])
    mask = tf.cast(kept, tf.float32)
    return tf.reshape(update, self.shape), tf.reshape(mask, self.shape)

  def _dequantize(self, encoded, count):
    quantized = tf.cast(unpack(encoded['quantized'], self.bits, count),
                        tf.float32)
    return self._quantizer.decode(
        {self._quantizer.ENCODED_VALUES_KEY: quantized},
        self._quantizer_params(encoded['value_range']),
    )


def position_form(encoded) -> str:
  """Which position form an evaluated `encode` output used."""
  for form in (BITMAP, GAPS, CHANNELS):
    if np.size(encoded[form]):
      return form
  return NONE


def encoded_bytes(encoded) -> tf.Tensor:
  """Exact bytes of an encoded structure: 4 per float32/int32 element."""
  return tf.add_n(
      [tf.cast(tf.size(t), tf.int64) * 4 for t in tf.nest.flatten(encoded)]
  )


def tensor_seeds(seed: Optional[tf.Tensor], count: int) -> list:
  """`count` independent stateless seeds derived from one (or Nones)."""
  if seed is None:
    return [None] * count
  return [tf.random.experimental.stateless_fold_in(seed, i)
          for i in range(count)]

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

Values (`ValueFormat`): float32 (`bits=32`), or quantised to `bits` in
{16, 8, 4, 2, 1}:

* stochastic (the default): between the tensor's smallest and largest kept
  value (both sent as float32) with stochastic rounding, so the decoded
  value is an unbiased estimate of the sent one. The rounding draws from a
  stateless generator seeded by the caller (the learning process uses (run
  seed, round, client)), so a rerun reproduces every bit.
* deterministic (1 and 2 bits, for error feedback; `SignLevelsEncodingStage`):
  the sign, scaled by the tensor's mean magnitude (1 bit), or the sign and
  whether the magnitude is above that mean, each group scaled by its own
  mean magnitude (2 bits). Both are contractions (the error's norm is below
  the input's), which error feedback needs; unbiased 1-bit rounding is not.
* rotated (`rotation='hadamard'`): before quantisation, the kept values are
  cut into blocks of `rotation_block` (the last one zero-padded: the padding
  is sent and counted) and each block is multiplied by a randomised
  Hadamard matrix (tfmot's `HadamardEncodingStage`), which spreads a
  block's energy evenly over its coordinates and so narrows the range the
  levels must cover. The rotation's signs are seeded by an int32 sent with
  the tensor (4 bytes), derived from the rounding seed.

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
import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.internal.tensor_encoding.core import encoding_stage
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages import stages_impl
from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages.research import misc
from tensorflow_model_optimization.python.core.internal.tensor_encoding.utils import tf_utils

UPLOAD_BITS = (32, 16, 8, 4, 2, 1)
SIGN_LEVEL_BITS = (1, 2)
STOCHASTIC, DETERMINISTIC = 'stochastic', 'deterministic'
ROUNDINGS = (STOCHASTIC, DETERMINISTIC)
ROTATIONS = ('none', 'hadamard')
NONE, BITMAP, GAPS, CHANNELS = 'none', 'bitmap', 'gaps', 'channels'
WORD_BITS = 31  # pack_into_int round-trips at 31 bits; 32 would overflow.


def gap_bits(size: int) -> int:
  """Bits per delta-coded position for a tensor of `size` coordinates."""
  return max(1, math.ceil(math.log2(max(size, 2))))


def check_upload_bits(bits: int) -> None:
  if bits not in UPLOAD_BITS:
    raise ValueError(f'upload_bits must be one of {UPLOAD_BITS}, got {bits}')


@dataclasses.dataclass(frozen=True)
class ValueFormat:
  """How the kept values of an upload cross the wire.

  `bits` per value (32: float32); below 32, `rounding` stochastic (unbiased)
  or deterministic (`SignLevelsEncodingStage`, 1 or 2 bits), optionally
  after a blockwise randomised Hadamard `rotation` of `rotation_block`
  coordinates (a power of two).
  """

  bits: int = 32
  rounding: str = STOCHASTIC
  rotation: str = 'none'
  rotation_block: int = 256

  def __post_init__(self):
    check_upload_bits(self.bits)
    if self.rounding not in ROUNDINGS:
      raise ValueError(f'unknown rounding {self.rounding!r}; choose from'
                       f' {ROUNDINGS}')
    if self.rotation not in ROTATIONS:
      raise ValueError(f'unknown rotation {self.rotation!r}; choose from'
                       f' {ROTATIONS}')
    if self.rounding == DETERMINISTIC and self.bits not in SIGN_LEVEL_BITS:
      raise ValueError('deterministic rounding takes 1 or 2 bits, got'
                       f' {self.bits}')
    if self.rotation != 'none' and self.bits == 32:
      raise ValueError('a rotation needs quantised values: upload_bits'
                       ' below 32')
    block = self.rotation_block
    if block < 2 or block & (block - 1):
      raise ValueError('rotation_block must be a power of two >= 2, got'
                       f' {block}')

  @classmethod
  def for_upload(cls, bits: int = 32, rotation: str = 'none',
                 error_feedback: bool = False, rotation_block: int = 256):
    """The format a client uses: with error feedback, 1 and 2 bits round
    deterministically (unbiased 1-bit rounding is not a contraction)."""
    rounding = (DETERMINISTIC if error_feedback and bits in SIGN_LEVEL_BITS
                else STOCHASTIC)
    return cls(bits, rounding, rotation, rotation_block)

  @property
  def quantized(self) -> bool:
    return self.bits < 32

  def for_statistics(self) -> 'ValueFormat':
    """The format of moving statistics (BN means and variances) beside it.

    At 1 or 2 bits they travel at 8, stochastically rounded and unrotated:
    a 1-bit error (or a sign scaled by the mean magnitude) can push a
    moving variance below zero, which breaks its layer, and they are too
    few (a few hundred values) to matter for the upload.
    """
    if self.bits in SIGN_LEVEL_BITS:
      return ValueFormat(8)
    return self


class SignLevelsEncodingStage(encoding_stage.EncodingStageInterface):
  """Deterministic 1- or 2-bit levels: signs scaled by mean magnitudes.

  1 bit: x -> sign(x) * mean|x|. 2 bits: the sign and whether |x| exceeds
  mean|x|; each of the two groups decodes to its own mean magnitude. Each
  group's decoded magnitude is the one closest to its members in L2, so the
  error's norm is below the input's (a contraction, as error feedback needs).
  The scales travel as float32.
  """

  ENCODED_VALUES_KEY = 'levels'
  SCALES_KEY = 'scales'

  def __init__(self, bits: int = 1):
    if bits not in SIGN_LEVEL_BITS:
      raise ValueError(f'sign levels take 1 or 2 bits, got {bits}')
    self._bits = bits

  name = property(lambda self: 'sign_levels')
  compressible_tensors_keys = property(
      lambda self: [self.ENCODED_VALUES_KEY])
  commutes_with_sum = property(lambda self: False)
  decode_needs_input_shape = property(lambda self: False)

  def get_params(self):
    return collections.OrderedDict(), collections.OrderedDict()

  def encode(self, x, encode_params):
    del encode_params  # Unused.
    magnitude = tf.abs(x)
    positive = tf.cast(x >= 0, tf.int32)
    mean = tf.reduce_mean(magnitude)
    if self._bits == 1:
      return collections.OrderedDict(
          [(self.ENCODED_VALUES_KEY, positive),
           (self.SCALES_KEY, tf.reshape(mean, [1]))])
    high = magnitude > mean
    scales = tf.stack([
        tf.math.divide_no_nan(
            tf.reduce_sum(tf.where(group, magnitude, 0.)),
            tf.reduce_sum(tf.cast(group, x.dtype)))
        for group in (tf.logical_not(high), high)
    ])
    return collections.OrderedDict(
        [(self.ENCODED_VALUES_KEY, 2 * tf.cast(high, tf.int32) + positive),
         (self.SCALES_KEY, scales)])

  def decode(self, encoded_tensors, decode_params, num_summands=None,
             shape=None):
    del decode_params, num_summands, shape  # Unused.
    levels = encoded_tensors[self.ENCODED_VALUES_KEY]
    scales = encoded_tensors[self.SCALES_KEY]
    sign = tf.cast(2 * (levels % 2) - 1, scales.dtype)
    return sign * tf.gather(scales, levels // 2)


class _DitheredUniform:
  """tfmot's uniform quantisation between min and max, stochastically rounded.

  Deterministic rounding of the input plus a uniform dither of one step is
  exactly stochastic rounding; the dither is drawn from the caller's seed.
  """

  def __init__(self, bits: int):
    self.bits = bits
    self._stage = stages_impl.UniformQuantizationEncodingStage(
        bits=bits, stochastic=False)

  def quantize(self, values, seed):
    low, high = tf.reduce_min(values), tf.reduce_max(values)
    params = self._params(tf.stack([low, high]))
    step = (high - low) / (2**self.bits - 1)
    noise = tf_utils.random_floats(tf.size(values), seed) - 0.5
    quantized = self._stage.encode(values + noise * step, params)[
        self._stage.ENCODED_VALUES_KEY
    ]
    return tf.cast(quantized, tf.int32), tf.stack([low, high])

  def dequantize(self, levels, scales):
    return self._stage.decode(
        {self._stage.ENCODED_VALUES_KEY: tf.cast(levels, tf.float32)},
        self._params(scales),
    )

  def _params(self, value_range):
    params, _ = self._stage.get_params()
    params = collections.OrderedDict(params)
    params[self._stage.MIN_MAX_VALUES_KEY] = value_range
    return params


class _SignLevels:
  """`SignLevelsEncodingStage` behind the quantizer interface (no seed)."""

  def __init__(self, bits: int):
    self.bits = bits
    self._stage = SignLevelsEncodingStage(bits)

  def quantize(self, values, seed):
    del seed  # Deterministic.
    encoded = self._stage.encode(values, {})
    return (encoded[self._stage.ENCODED_VALUES_KEY],
            encoded[self._stage.SCALES_KEY])

  def dequantize(self, levels, scales):
    return self._stage.decode({self._stage.ENCODED_VALUES_KEY: levels,
                               self._stage.SCALES_KEY: scales}, {})


class BlockRotation:
  """tfmot's `HadamardEncodingStage` on fixed-size blocks of a 1-D tensor.

  The stage needs a static length; the kept values' count is dynamic, so
  they are zero-padded to whole blocks of `block` (at most the tensor's
  size rounded up to a power of two) and the blocks are rotated as a batch.
  """

  def __init__(self, size: int, block: int):
    self.block = min(block, 2**math.ceil(math.log2(max(size, 2))))
    self._stage = stages_impl.HadamardEncodingStage()

  def padded(self, count):
    return (count + self.block - 1) // self.block * self.block

  def _params(self, seed):
    return {self._stage.SEED_PARAMS_KEY: tf.stack(
        [tf.constant(0, tf.int64), tf.cast(seed[0], tf.int64)])}

  def rotate(self, values, seed):
    blocks = tf.reshape(
        tf.pad(values, [[0, self.padded(tf.size(values)) - tf.size(values)]]),
        [-1, self.block])
    rotated = self._stage.encode(blocks, self._params(seed))
    return tf.reshape(rotated[self._stage.ENCODED_VALUES_KEY], [-1])

  def unrotate(self, rotated, seed, count):
    blocks = tf.reshape(rotated, [-1, self.block])
    unrotated = self._stage.decode(
        {self._stage.ENCODED_VALUES_KEY: blocks}, self._params(seed),
        shape=tf.constant([1, self.block]))
    return tf.reshape(unrotated, [-1])[:count]


def rotation_seed(seed):
  """The int32 [1] a tensor's rotation is seeded by (sent with it)."""
  return tf.random.stateless_uniform(
      [1], tf.random.experimental.stateless_fold_in(seed, 1), minval=0,
      maxval=tf.int32.max, dtype=tf.int32)


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

  def __init__(self, shape, values: ValueFormat = ValueFormat()):
    self.shape = tf.TensorShape(shape)
    self.dims = self.shape.as_list()
    self.size = int(np.prod(self.dims))
    self.values = values
    self.bits = values.bits
    self._gap_bits = gap_bits(self.size)
    self._delta = misc.DifferenceBetweenIntegersEncodingStage()
    if values.quantized:
      self._quantizer = (_SignLevels(self.bits)
                         if values.rounding == DETERMINISTIC
                         else _DitheredUniform(self.bits))
    self._rotation = (BlockRotation(self.size, values.rotation_block)
                      if values.rotation != 'none' else None)

  def encode(self, update, mask, seed=None) -> collections.OrderedDict:
    """`update` restricted to `mask` (0/1 floats), in its smallest form.

    `seed` (int [2]) seeds the stochastic rounding and the rotation; needed
    when bits < 32.
    """
    flat = tf.reshape(update, [-1])
    kept = tf.reshape(mask, [-1]) > 0.5
    positions = tf.cast(tf.where(kept)[:, 0], tf.int32)
    count = tf.size(positions)
    encoded = self._encode_positions(kept, positions, count)
    values = tf.gather(flat, positions)
    if self.bits == 32:
      encoded['values'] = values
      return encoded
    if seed is None:
      raise ValueError(f'{self.bits}-bit values need a rounding seed')
    empty = (tf.zeros([0], tf.int32), tf.zeros([0], tf.float32),
             tf.zeros([0], tf.int32))
    encoded['quantized'], encoded['scales'], encoded['rotation_seed'] = (
        tf.cond(count > 0, lambda: self._quantize(values, seed),
                lambda: empty))
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
    """(packed levels, scales, rotation seed: empty without a rotation)."""
    rotation = tf.zeros([0], tf.int32)
    if self._rotation is not None:
      rotation = rotation_seed(seed)
      values = self._rotation.rotate(values, rotation)
    levels, scales = self._quantizer.quantize(values, seed)
    return pack(levels, self.bits), scales, rotation

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
      any_values = tf.size(encoded['scales']) > 0
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
    sent = count if self._rotation is None else self._rotation.padded(count)
    levels = unpack(encoded['quantized'], self.bits, sent)
    values = self._quantizer.dequantize(levels, encoded['scales'])
    if self._rotation is None:
      return values
    return self._rotation.unrotate(values, encoded['rotation_seed'], count)


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

"""Tests of the sparse, optionally quantised update encoding."""

from absl.testing import absltest
from absl.testing import parameterized
import math

import numpy as np
import tensorflow as tf

from tff_fedprune import encoding


def words(num_bits):
  return math.ceil(num_bits / encoding.WORD_BITS)


def predicted_bytes(shape, mask, bits):
  """Bytes of each position form plus the values, by the module's rules."""
  size, kept = int(np.prod(shape)), int(mask.sum())
  if bits == 32:
    values = kept
  else:
    values = words(kept * bits) + 2 if kept else 0
  forms = {
      'bitmap': words(size),
      'gaps': 1 + words(kept * encoding.gap_bits(size)),
  }
  if kept in (0, size):
    forms['none'] = 0
  if len(shape) >= 2:
    indicators = [mask.max(axis=tuple(a for a in range(len(shape)) if a != i))
                  for i in range(len(shape))]
    outer = indicators[0]
    for indicator in indicators[1:]:
      outer = np.multiply.outer(outer, indicator)
    if np.array_equal(outer, mask):
      forms['channels'] = words(sum(shape))
  return {form: 4 * (n + values) for form, n in forms.items()}


def channel_mask(shape, density, rng):
  """A kernel mask (input channel kept) x (output channel kept)."""
  rows = (rng.random(shape[-2]) < density).astype(np.float32)
  cols = (rng.random(shape[-1]) < density).astype(np.float32)
  return np.ones(shape, np.float32) * rows[:, None] * cols[None, :]


def encode_decode(shape, mask, bits=32, seed=(3, 4), value_seed=0, **form):
  """`form`: the other `encoding.ValueFormat` fields."""
  rng = np.random.default_rng(value_seed)
  update = rng.normal(size=shape).astype(np.float32) * mask
  codec = encoding.TensorCodec(shape, encoding.ValueFormat(bits, **form))
  encoded = codec.encode(
      tf.constant(update), tf.constant(mask), tf.constant(seed, tf.int64)
  )
  decoded_update, decoded_mask = codec.decode(encoded)
  return update, encoded, decoded_update.numpy(), decoded_mask.numpy()


def random_mask(shape, density, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.random(shape) < density).astype(np.float32)


class EncodingTest(parameterized.TestCase):

  @parameterized.parameters(
      ((3, 3, 16, 32), 0.5, 'bitmap'), ((3, 3, 16, 32), 0.02, 'gaps'),
      ((3, 3, 16, 32), 1.0, 'none'), ((64,), 0.7, 'bitmap'),
      ((300, 300), 0.01, 'gaps'), ((1,), 1.0, 'none'), ((7,), 0.0, 'none'))
  def test_round_trip_smallest_form_and_exact_bytes(self, shape, density,
                                                    form):
    for bits in encoding.UPLOAD_BITS:
      mask = random_mask(shape, density)
      update, encoded, dec_update, dec_mask = encode_decode(shape, mask, bits)
      np.testing.assert_array_equal(dec_mask, mask)
      if bits == 32:
        np.testing.assert_array_equal(dec_update, update)
      self.assertEqual(encoding.position_form(encoded), form)
      nbytes = sum(t.numpy().nbytes for t in encoded.values())
      self.assertEqual(int(encoding.encoded_bytes(encoded)), nbytes)
      self.assertEqual(
          nbytes, min(predicted_bytes(shape, mask, bits).values())
      )

  @parameterized.parameters(32, 16, 8, 4)
  def test_channel_form_decodes_the_kernel_update_and_mask(self, bits):
    shape = (3, 3, 16, 32)
    mask = channel_mask(shape, 0.6, np.random.default_rng(1))
    update, encoded, dec_update, dec_mask = encode_decode(shape, mask, bits)
    self.assertEqual(encoding.position_form(encoded), 'channels')
    self.assertEqual(encoded['channels'].shape[0], words(3 + 3 + 16 + 32))
    np.testing.assert_array_equal(dec_mask, mask)
    # The same update and mask as one flat tensor go as a bitmap, and decode
    # to the same values (the same seed rounds them the same way).
    flat_mask = mask.reshape(-1)
    _, flat_encoded, flat_update, flat_decoded_mask = encode_decode(
        flat_mask.shape, flat_mask, bits)
    self.assertEqual(encoding.position_form(flat_encoded), 'bitmap')
    np.testing.assert_array_equal(dec_update.reshape(-1), flat_update)
    np.testing.assert_array_equal(flat_decoded_mask, flat_mask)
    if bits == 32:
      np.testing.assert_array_equal(dec_update, update)

  @parameterized.parameters(16, 8, 4)
  def test_quantisation_error_is_within_one_step(self, bits):
    shape = (3, 3, 16, 32)
    mask = random_mask(shape, 0.5)
    update, _, dec_update, _ = encode_decode(shape, mask, bits)
    kept = update[mask > 0]
    step = (kept.max() - kept.min()) / (2**bits - 1)
    error = np.abs(dec_update - update)
    self.assertLessEqual(error.max(), step * (1 + 1e-4))
    self.assertEqual(np.abs(dec_update[mask == 0]).max(), 0.0)

  @parameterized.parameters(8, 4, 2, 1)
  def test_stochastic_rounding_is_unbiased(self, bits):
    shape, draws = (200,), 400
    mask = np.ones(shape, np.float32)
    decoded = np.stack([
        encode_decode(shape, mask, bits, seed=(7, s))[2]
        for s in range(draws)
    ])
    update = encode_decode(shape, mask, bits)[0]
    step = (update.max() - update.min()) / (2**bits - 1)
    # Each draw errs by at most one step (variance <= step^2 / 4).
    bound = 5 * step / (2 * math.sqrt(draws))
    np.testing.assert_array_less(np.abs(decoded.mean(0) - update), bound)
    self.assertGreater(np.abs(decoded[0] - decoded[1]).max(), 0)

  @parameterized.parameters(2, 1)
  def test_rotated_stochastic_rounding_is_unbiased(self, bits):
    shape, draws = (200,), 400
    mask = np.ones(shape, np.float32)
    runs = [encode_decode(shape, mask, bits, seed=(7, s), rotation='hadamard',
                          rotation_block=64) for s in range(draws)]
    update = runs[0][0]
    # Each rotated coordinate errs by at most one step of its tensor; the
    # inverse rotation is orthonormal, so a decoded one's variance is at
    # most the largest step^2 / 4.
    step = max(np.ptp(e['scales']) for _, e, _, _ in runs) / (2**bits - 1)
    bound = 5 * step / (2 * math.sqrt(draws))
    mean = np.mean([decoded for _, _, decoded, _ in runs], axis=0)
    np.testing.assert_array_less(np.abs(mean - update), bound)

  @parameterized.parameters(1, 2)
  def test_sign_levels_are_deterministic_contractions(self, bits):
    shape = (3, 3, 16, 32)
    mask = random_mask(shape, 0.5)
    update, encoded, decoded, _ = encode_decode(
        shape, mask, bits, rounding=encoding.DETERMINISTIC)
    again = encode_decode(shape, mask, bits, seed=(8, 9),
                          rounding=encoding.DETERMINISTIC)[2]
    np.testing.assert_array_equal(decoded, again)
    self.assertLen(encoded['scales'], bits)
    kept = update[mask > 0]
    self.assertLess(np.linalg.norm(decoded - update), np.linalg.norm(kept))
    np.testing.assert_array_equal(np.sign(decoded[mask > 0]), np.sign(kept))
    if bits == 1:
      np.testing.assert_allclose(
          decoded[mask > 0], np.sign(kept) * np.abs(kept).mean(), rtol=1e-6)
    else:
      self.assertLen(np.unique(np.abs(decoded[mask > 0])), 2)

  @parameterized.parameters(1, 255, 256, 257, 1000)
  def test_block_rotation_round_trips(self, count):
    rotation = encoding.BlockRotation(4096, 256)
    values = np.random.default_rng(count).normal(size=count).astype(np.float32)
    seed = tf.constant([12345])
    rotated = rotation.rotate(tf.constant(values), seed)
    self.assertEqual(rotated.shape[0], rotation.padded(count))
    self.assertEqual(rotation.padded(count) % 256, 0)
    np.testing.assert_allclose(np.linalg.norm(rotated),
                               np.linalg.norm(values), rtol=1e-5)
    np.testing.assert_allclose(rotation.unrotate(rotated, seed, count), values,
                               atol=1e-5)
    # A small tensor's block is its size rounded up to a power of two.
    self.assertEqual(encoding.BlockRotation(20, 256).block, 32)

  @parameterized.parameters(
      (1, encoding.STOCHASTIC), (2, encoding.STOCHASTIC),
      (1, encoding.DETERMINISTIC), (2, encoding.DETERMINISTIC))
  def test_rotated_bytes_count_padding_scales_and_seed(self, bits, rounding):
    shape, block = (3, 3, 16, 32), 64
    mask = channel_mask(shape, 0.6, np.random.default_rng(4))
    _, encoded, decoded, decoded_mask = encode_decode(
        shape, mask, bits, rounding=rounding, rotation='hadamard',
        rotation_block=block)
    np.testing.assert_array_equal(decoded_mask, mask)
    kept = int(mask.sum())
    padded = -(-kept // block) * block
    scales = 2 if rounding == encoding.STOCHASTIC else bits
    expected = 4 * (words(sum(shape)) + words(padded * bits) + scales + 1)
    nbytes = sum(t.numpy().nbytes for t in encoded.values())
    self.assertEqual(int(encoding.encoded_bytes(encoded)), nbytes)
    self.assertEqual(nbytes, expected)
    self.assertEqual(np.abs(decoded[mask == 0]).max(), 0.0)

  def test_value_formats_refuse_bad_combinations(self):
    for kwargs, message in (
        (dict(bits=32, rotation='hadamard'), 'a rotation needs quantised'),
        (dict(bits=4, rounding=encoding.DETERMINISTIC),
         'deterministic rounding takes 1 or 2 bits'),
        (dict(bits=1, rotation='hadamard', rotation_block=48),
         'rotation_block must be a power of two'),
        (dict(bits=1, rotation='kashin'), 'unknown rotation'),
    ):
      with self.assertRaisesRegex(ValueError, message):
        encoding.ValueFormat(**kwargs)
    self.assertEqual(
        encoding.ValueFormat.for_upload(1, error_feedback=True).rounding,
        encoding.DETERMINISTIC)
    self.assertEqual(
        encoding.ValueFormat.for_upload(4, error_feedback=True).rounding,
        encoding.STOCHASTIC)

  def test_rounding_is_a_function_of_the_seed(self):
    mask = random_mask((64, 8), 0.7)
    first = encode_decode((64, 8), mask, 4, seed=(1, 2))[1]
    again = encode_decode((64, 8), mask, 4, seed=(1, 2))[1]
    other = encode_decode((64, 8), mask, 4, seed=(1, 3))[1]
    np.testing.assert_array_equal(first['quantized'], again['quantized'])
    self.assertFalse(np.array_equal(first['quantized'], other['quantized']))

  def test_quantised_values_need_a_seed(self):
    codec = encoding.TensorCodec((4,), encoding.ValueFormat(8))
    with self.assertRaisesRegex(ValueError, 'rounding seed'):
      codec.encode(tf.ones([4]), tf.ones([4]))

  @parameterized.parameters(0, 7, 3, 64)
  def test_bad_bits_are_refused(self, bits):
    with self.assertRaisesRegex(ValueError, 'upload_bits'):
      encoding.ValueFormat(bits)

  @parameterized.parameters(1, 4, 8, 17, 30, 31)
  def test_packing_into_31_bits_round_trips(self, bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 30, 31, 32, 1000):
      values = rng.integers(0, 2**bits, size=count, dtype=np.int64)
      packed = encoding.pack(tf.constant(values, tf.int32), bits)
      self.assertEqual(packed.shape[0], words(count * bits))
      np.testing.assert_array_equal(
          encoding.unpack(packed, bits, count), values
      )

  def test_zero_valued_kept_coordinates_stay_in_the_mask(self):
    codec = encoding.TensorCodec((4,))
    mask = tf.constant([1.0, 1.0, 0.0, 1.0])
    update = tf.constant([0.0, 2.0, 0.0, 0.0])
    _, decoded_mask = codec.decode(codec.encode(update, mask))
    np.testing.assert_array_equal(decoded_mask, mask)

  def test_channel_structured_kernel_at_8_bits_is_a_tenth_of_dense(self):
    shape = (3, 3, 64, 64)
    mask = channel_mask(shape, 0.7, np.random.default_rng(2))
    _, encoded, _, _ = encode_decode(shape, mask, 8)
    ratio = int(encoding.encoded_bytes(encoded)) / (4 * mask.size)
    self.assertLess(ratio, 0.26 * mask.mean() + 0.01)


if __name__ == '__main__':
  absltest.main()

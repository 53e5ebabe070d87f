"""Tests of the sparse update encoding."""

from absl.testing import absltest
from absl.testing import parameterized
import math

import numpy as np
import tensorflow as tf

from tff_fedprune import encoding


def predicted_bytes(size, kept):
  """Bytes of each form: 4 per float32 value, int32 words of 28 packed bits."""
  sizes = {'bitmap': 4 * (math.ceil(size / 28) + kept)}
  if kept == size:
    sizes['dense'] = 4 * size
  bits = max(1, math.ceil(math.log2(max(size, 2))))
  if bits <= 16:
    sizes['gaps'] = 4 * (math.ceil(kept * bits / 28) + kept)
  return sizes


def encode_decode(shape, density, seed=0):
  rng = np.random.default_rng(seed)
  mask = (rng.random(shape) < density).astype(np.float32)
  update = rng.normal(size=shape).astype(np.float32) * mask
  codec = encoding.TensorCodec(shape)
  encoded = codec.encode(tf.constant(update), tf.constant(mask))
  decoded_update, decoded_mask = codec.decode(encoded)
  return update, mask, codec, encoded, decoded_update, decoded_mask


class EncodingTest(parameterized.TestCase):

  @parameterized.parameters(
      ((3, 3, 16, 32), 0.5, 'bitmap'), ((3, 3, 16, 32), 0.02, 'gaps'),
      ((3, 3, 16, 32), 1.0, 'dense'), ((64,), 0.7, 'bitmap'),
      ((300, 300), 0.01, 'bitmap'), ((1,), 1.0, 'dense'), ((7,), 0.0, 'gaps'))
  def test_round_trip_smallest_form_and_exact_bytes(self, shape, density,
                                                    form):
    update, mask, codec, encoded, dec_update, dec_mask = encode_decode(
        shape, density)
    np.testing.assert_array_equal(dec_update, update)
    np.testing.assert_array_equal(dec_mask, mask)
    emitted = [k for k in ('dense', 'bitmap', 'gaps') if encoded[k].shape[0]]
    self.assertEqual(emitted, [] if density == 0 else [form])
    nbytes = sum(t.numpy().nbytes for t in encoded.values())
    self.assertEqual(int(encoding.encoded_bytes(encoded)), nbytes)
    predicted = predicted_bytes(codec.size, int(mask.sum()))
    self.assertEqual(nbytes, min(predicted.values()))

  def test_zero_valued_kept_coordinates_stay_in_the_mask(self):
    codec = encoding.TensorCodec((4,))
    mask = tf.constant([1.0, 1.0, 0.0, 1.0])
    update = tf.constant([0.0, 2.0, 0.0, 0.0])
    _, decoded_mask = codec.decode(codec.encode(update, mask))
    np.testing.assert_array_equal(decoded_mask, mask)

  def test_bitmap_is_far_smaller_than_dense_at_half_density(self):
    _, mask, _, encoded, _, _ = encode_decode((3, 3, 64, 64), 0.5)
    dense_bytes = 4 * mask.size
    self.assertLess(int(encoding.encoded_bytes(encoded)), 0.56 * dense_bytes)


if __name__ == '__main__':
  absltest.main()

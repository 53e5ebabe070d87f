"""Tests of `secure_sum`: bounded integer records through TFF's secure sum."""

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import secure_sum

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


class SecureBitsTest(absltest.TestCase):

  def test_width_holds_the_largest_sum(self):
    self.assertEqual(secure_sum.secure_bits(8, 1), 8)
    self.assertEqual(secure_sum.secure_bits(8, 100), 15)  # 25500 < 2^15.
    self.assertEqual(secure_sum.secure_bits(1, 4), 3)


class QuantizedSecureSumTest(testing.LocalRuntimeTestCase):

  def create(self, bits, bound, size):
    return secure_sum.QuantizedSecureSumFactory(bits, bound).create(
        tff.TensorType(np.float32, [size]))

  def test_levels_sum_exactly_and_the_offset_is_undone(self):
    process = self.create(1, 0.5, 4)
    values = [np.array([0.5, -0.5, 0.5, 9.0], np.float32),
              np.array([0.5, 0.5, -0.5, -9.0], np.float32)]
    result = process.next(process.initialize(), values).result
    np.testing.assert_array_equal(result, [1.0, 0.0, 0.0, 0.0])  # Clamped.

  def test_stochastic_rounding_is_unbiased_and_reproducible(self):
    process = self.create(8, 1.0, 50000)
    rng = np.random.default_rng(0)
    values = [rng.uniform(-1, 1, 50000).astype(np.float32) for _ in range(3)]
    first = process.next(process.initialize(), values).result
    again = process.next(process.initialize(), values).result
    np.testing.assert_array_equal(first, again)
    error = first - np.sum(values, 0)
    step = 2 / 255
    self.assertLessEqual(np.max(np.abs(error)), 3 * step + 1e-5)
    self.assertLess(abs(np.mean(error)), 4 * step / np.sqrt(50000))


if __name__ == '__main__':
  absltest.main()

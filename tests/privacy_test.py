"""Tests of `privacy`: clipping, seeded Gaussian noise and the accounting."""

import math

from absl.testing import absltest
import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import privacy

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

SIZE = 20000


def dp_config(noise_multiplier, clip=1.0, expected_clients=4.0, **kwargs):
  return privacy.DpConfig(noise_multiplier, clip, expected_clients,
                          num_clients=100, seed=3, **kwargs)


def records(norms, seed=0):
  """One [SIZE] record per client with the given L2 norms."""
  rng = np.random.default_rng(seed)
  out = []
  for norm in norms:
    v = rng.normal(size=SIZE).astype(np.float32)
    out.append(v * np.float32(norm / np.linalg.norm(v)))
  return out


def mean_process(dp):
  return privacy.build_dp_factory(dp).create(
      tff.TensorType(np.float32, [SIZE]))


class EpsilonTest(absltest.TestCase):

  def test_equals_dp_accounting_for_the_same_parameters(self):
    dp = dp_config(1.3, expected_clients=10.0)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.3)), 50)
    self.assertEqual(privacy.epsilon(dp, 50), accountant.get_epsilon(0.01))
    self.assertLess(privacy.epsilon(dp, 10), privacy.epsilon(dp, 50))

  def test_no_noise_is_infinite_and_no_round_spends_nothing(self):
    self.assertEqual(privacy.epsilon(dp_config(0.0), 5), math.inf)
    self.assertEqual(privacy.epsilon(dp_config(1.0), 0), 0.0)


class DpMeanTest(testing.LocalRuntimeTestCase):

  def test_no_noise_is_the_clipped_mean_over_expected_clients(self):
    values = records([0.5, 3.0, 1.0])
    process = mean_process(dp_config(0.0))
    result = process.next(process.initialize(), values).result
    clipped = [tf.clip_by_global_norm([v], 1.0)[0][0].numpy() for v in values]
    plain = tff.aggregators.SumFactory().create(
        tff.TensorType(np.float32, [SIZE]))
    total = plain.next(plain.initialize(), clipped).result
    np.testing.assert_array_equal(result * 4, total)

  def test_clipping_holds(self):
    process = mean_process(dp_config(0.0))
    result = process.next(process.initialize(), records([50.0])).result
    self.assertAlmostEqual(np.linalg.norm(result * 4), 1.0, places=4)

  def test_noise_std_is_z_times_clip_and_seeded(self):
    process = mean_process(dp_config(2.0, clip=0.5))
    zeros = [np.zeros(SIZE, np.float32)]
    state = process.initialize()
    first = process.next(state, zeros)
    noise = first.result * 4
    # The sample std of SIZE normals is within 4 / sqrt(2 SIZE) of sigma.
    self.assertAlmostEqual(np.std(noise) / 1.0, 1.0, delta=4 / math.sqrt(
        2 * SIZE))
    self.assertAlmostEqual(np.mean(noise), 0.0, delta=4 / math.sqrt(SIZE))
    again = process.next(process.initialize(), zeros).result
    np.testing.assert_array_equal(first.result, again)
    later = process.next(first.state, zeros).result
    self.assertLess(abs(np.corrcoef(later, first.result)[0, 1]), 0.05)

  def test_adaptive_clip_adapts_and_is_seeded(self):
    dp = dp_config(0.5, clip=1.0, expected_clients=40.0, adaptive_clip=True)
    process = mean_process(dp)
    values = records([0.1] * 40)
    out = [process.next(process.initialize(), values) for _ in range(2)]
    np.testing.assert_array_equal(out[0].result, out[1].result)
    clip = out[0].measurements['dp_query_metrics']['clip']
    self.assertLess(clip, 1.0)  # Every norm was below it: it shrinks.


if __name__ == '__main__':
  absltest.main()

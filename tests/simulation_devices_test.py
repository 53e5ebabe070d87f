"""Tests of device tiers and the simulated round time."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from tests import testing
from tff_fedprune.simulation import config as config_lib
from tff_fedprune.simulation import data_source
from tff_fedprune.simulation import devices
from tff_fedprune.simulation import program
from tff_fedprune.simulation import round_rows


class TierSpecTest(parameterized.TestCase):

  def test_parses_tiers_keeping_the_written_label(self):
    tiers = devices.parse_tiers('0.5:1:1, 1.0:4:10')
    self.assertEqual(tiers, [devices.DeviceTier(0.5, 1.0, 1.0, '0.5'),
                             devices.DeviceTier(1.0, 4.0, 10.0, '1.0')])
    self.assertEqual(devices.parse_tiers(''), [])

  @parameterized.parameters(
      ('0.5:1', 'not keep_ratio:speed:Mbps'), ('0.5:a:1', 'not keep_ratio'),
      ('1.5:1:1', r'in \(0, 1\]'), ('0.5:0:1', 'speed and Mbps'),
      ('0.5:1:1,0.5:2:2', 'repeats a keep ratio'))
  def test_malformed_tiers_are_refused(self, spec, message):
    with self.assertRaisesRegex(devices.TierSpecError, message):
      devices.parse_tiers(spec)

  @parameterized.parameters(
      ('0.5,0.6', 'sum to 1'), ('1', 'has 1 values for 2'),
      ('x,y', 'not a list'), ('-0.5,1.5', 'must be >= 0'))
  def test_malformed_shares_are_refused(self, spec, message):
    with self.assertRaisesRegex(devices.TierSpecError, message):
      devices.parse_shares(spec, 2)

  def test_default_shares_are_equal(self):
    self.assertEqual(devices.parse_shares('', 4), [0.25] * 4)


class AssignTiersTest(absltest.TestCase):

  def test_counts_follow_the_shares_and_the_seed_fixes_who(self):
    tiers = devices.assign_tiers(10, [0.4, 0.3, 0.3], seed=0)
    self.assertEqual(np.bincount(tiers).tolist(), [4, 3, 3])
    np.testing.assert_array_equal(
        tiers, devices.assign_tiers(10, [0.4, 0.3, 0.3], seed=0))
    self.assertFalse(np.array_equal(
        tiers, devices.assign_tiers(10, [0.4, 0.3, 0.3], seed=1)))

  def test_largest_remainder_keeps_every_client(self):
    tiers = devices.assign_tiers(7, [1 / 3] * 3, seed=2)
    self.assertEqual(sorted(np.bincount(tiers).tolist()), [2, 2, 3])


class ClientSecondsTest(absltest.TestCase):

  def test_download_compute_and_upload_at_the_tier_rates(self):
    tier = devices.DeviceTier(0.5, speed=2.0, mbps=8.0, label='0.5')
    time = devices.client_seconds(
        tier, train_flops=4e10, download_bytes=2e6, upload_bytes=1e6,
        reference_flops_per_s=1e10)
    self.assertAlmostEqual(time.download, 2.0)  # 16e6 bit at 8e6 bit/s.
    self.assertAlmostEqual(time.compute, 2.0)
    self.assertAlmostEqual(time.upload, 1.0)
    self.assertAlmostEqual(time.total, 5.0)

  def test_round_lasts_its_slowest_client_or_the_deadline(self):
    rows = [round_rows.ClientRow(1, c, 1.0, 0.0, 0.0, 0, 0, '1.0', s)
            for c, s in ((0, 2.0), (1, 7.5))]
    self.assertEqual(program.simulated_round_seconds(rows), 7.5)
    self.assertEqual(program.simulated_round_seconds(rows, 5.0), 5.0)
    self.assertTrue(np.isnan(program.simulated_round_seconds([])))


class TieredConfigTest(parameterized.TestCase):

  def config(self, **overrides):
    return testing.small_config('/tmp/unused', num_clients=10,
                                clients_per_round=10, **overrides)

  def test_tiers_set_the_training_keep_ratios(self):
    config = self.config(device_tiers='0.5:1:1,1.0:4:10', tier_shares='0.4,0.6')
    ratios = [config.keep_ratio_of(c) for c in range(10)]
    self.assertEqual(sorted(ratios), [0.5] * 4 + [1.0] * 6)
    config_lib.validate(config)

  def test_min_keep_ratio_samples_only_the_wide_tiers(self):
    config = self.config(device_tiers='0.5:1:1,1.0:4:10', tier_shares='0.4,0.6',
                         tier_min_keep_ratio=1.0)
    sampled = data_source.sample_clients(config, 1).completing
    self.assertLen(sampled, 6)
    self.assertTrue(all(config.keep_ratio_of(c) == 1.0 for c in sampled))

  @parameterized.parameters(
      (dict(device_tiers='0.5:1:1', client_keep_ratios='0.5'),
       'replaces --client_keep_ratios'),
      (dict(tier_shares='1.0'), '--tier_shares needs --device_tiers'),
      (dict(device_tiers='0.5:1:1', tier_min_keep_ratio=1.0), 'leaves no'),
      (dict(round_deadline_s=3.0), 'needs --device_tiers'),
      (dict(device_tiers='0.5:1:1', round_deadline_s=3.0, algorithm='fednova'),
       'serves fedavg and fedprox'),
      (dict(channel_policy='heterofl', dynamic_pruning=False),
       'needs --dynamic_pruning'),
      (dict(channel_policy='fjord', gate_balance=0.1), 'fixed prefix'),
      (dict(device_tiers='0.5:1'), 'not keep_ratio:speed:Mbps'),
  )
  def test_bad_combinations_are_refused_in_one_line(self, overrides, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.validate(self.config(**overrides))


if __name__ == '__main__':
  absltest.main()

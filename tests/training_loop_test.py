"""Tests of the experiment driver: outputs, resume, validation."""

import csv
import dataclasses
import json
import os

from absl.testing import absltest
from absl.testing import parameterized

from tff_fedprune.simulation import loop


def read_rows(run_dir):
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    return list(csv.DictReader(f))


def small_config(root, **overrides):
  return dataclasses.replace(
      loop.ExperimentConfig(
          experiment_name='run', root_output_dir=root, dataset='synthetic',
          num_clients=4, clients_per_round=2, partition='iid', batch_size=16,
          total_rounds=3, client_learning_rate=0.05, seed=7,
          dynamic_pruning=True, keep_ratio=0.5),
      **overrides)


class RunExperimentTest(absltest.TestCase):

  def test_outputs_and_resume_reproduce_an_uninterrupted_run(self):
    root = self.create_tempdir().full_path
    straight = small_config(os.path.join(root, 'a'))
    loop.run_experiment(straight, progress=False)
    interrupted = small_config(os.path.join(root, 'b'), total_rounds=2)
    loop.run_experiment(interrupted, progress=False)
    self.assertLen(read_rows(interrupted.run_dir), 2)
    summary = loop.run_experiment(
        dataclasses.replace(interrupted, total_rounds=3), progress=False)

    a, b = read_rows(straight.run_dir), read_rows(interrupted.run_dir)
    self.assertEqual([r['round'] for r in b], ['1', '2', '3'])
    self.assertContainsSubset(
        ['round'] + list(loop.METRIC_COLUMNS), list(b[0]))
    for row_a, row_b in zip(a, b):
      row_a.pop('round_seconds')
      row_b.pop('round_seconds')
      self.assertEqual(row_a, row_b)
    self.assertEqual(summary['rounds_completed'], 3)
    self.assertEqual(summary['final']['round'], 3)
    with open(os.path.join(interrupted.run_dir, 'summary.json')) as f:
      self.assertEqual(json.load(f)['config']['total_rounds'], 3)
    for name in ('tensorboard', 'checkpoints', 'model/model.keras',
                 'model/preprocessing.json'):
      self.assertTrue(os.path.exists(os.path.join(interrupted.run_dir, name)),
                      name)
    # A finished run reruns as a no-op with the same rows.
    loop.run_experiment(
        dataclasses.replace(interrupted, total_rounds=3), progress=False)
    self.assertLen(read_rows(interrupted.run_dir), 3)

  def test_scaffold_counts_control_variate_traffic(self):
    root = self.create_tempdir().full_path
    config = small_config(root, total_rounds=1, algorithm='scaffold')
    loop.run_experiment(config, progress=False)
    dense = small_config(os.path.join(root, 'dense'), total_rounds=1)
    loop.run_experiment(dense, progress=False)
    row, dense_row = read_rows(config.run_dir)[0], read_rows(dense.run_dir)[0]
    # c travels down and dc_k up: dense-equivalent traffic grows by the
    # trainable weights per client, the measured upload by encoded dc_k.
    self.assertGreater(int(row['dense_upload_bytes']),
                       int(dense_row['dense_upload_bytes']))
    self.assertEqual(row['download_bytes'], row['dense_upload_bytes'])
    self.assertGreater(int(row['upload_bytes']), 0)
    self.assertLess(int(row['upload_bytes']), int(row['dense_upload_bytes']))

  def test_client_failures_are_dropped_and_measured(self):
    root = self.create_tempdir().full_path
    config = small_config(root, num_clients=10, clients_per_round=10,
                          client_failure_rate=0.3, total_rounds=2)
    loop.run_experiment(config, progress=False)
    for row in read_rows(config.run_dir):
      self.assertEqual(row['clients_dropped'], '3')
      self.assertEqual(row['clients_completed'], '7')
      self.assertNotEqual(row['test_accuracy'], 'nan')
    completing, dropped = loop.sample_clients(config, 1)
    self.assertLen(set(completing) | set(dropped), 10)
    self.assertEqual(loop.sample_clients(config, 1),
                     (completing, dropped))

  def test_refuses_to_resume_a_different_configuration(self):
    root = self.create_tempdir().full_path
    config = small_config(root, total_rounds=1)
    loop.run_experiment(config, progress=False)
    with self.assertRaisesRegex(loop.ConfigError,
                                'different client_learning_rate'):
      loop.run_experiment(
          dataclasses.replace(config, client_learning_rate=0.1),
          progress=False)


class ValidateTest(parameterized.TestCase):

  @parameterized.parameters(
      ({'dataset': 'imagenet'}, 'unknown dataset'),
      ({'model': 'alexnet'}, 'unknown model'),
      ({'partition': 'random'}, 'unknown partition'),
      ({'server_optimizer': 'lamb'}, 'unknown server optimizer'),
      ({'clients_per_round': 11}, 'exceeds --num_clients=10'),
      ({'keep_ratio': 0.0}, r'keep ratio must be in \(0, 1\], got 0.0'),
      ({'keep_ratio': 1.2}, r'keep ratio must be in \(0, 1\], got 1.2'),
      ({'client_keep_ratios': '0.5,0'}, r'keep ratio must be in \(0, 1\]'),
      ({'client_keep_ratios': '0.5,x'}, 'not a list of numbers'),
      ({'algorithm': 'fedsgd'}, 'unknown algorithm'),
      ({'salience_threshold': 1.0}, 'salience_threshold'),
      ({'prox_mu': -1.0}, 'prox_mu'),
      ({'client_failure_rate': 1.0}, 'client_failure_rate'),
      ({'workers': 'localhost'}, 'not host:port'),
      ({'dirichlet_alpha': 0.0}, 'dirichlet_alpha must be > 0'),
      ({'dirichlet_alpha': -1.0}, 'dirichlet_alpha must be > 0'),
      ({'total_rounds': 0}, 'total_rounds must be >= 1'),
      ({'client_momentum': 1.0}, 'client_momentum'),
      ({'client_learning_rate': 0.0}, 'client_learning_rate must be > 0'),
      ({'experiment_name': 'a/b'}, 'must not contain'),
  )
  def test_rejects(self, overrides, message):
    config = small_config('/tmp/unused', num_clients=10, clients_per_round=5)
    with self.assertRaisesRegex(loop.ConfigError, message):
      loop.validate(dataclasses.replace(config, **overrides))

  def test_client_keep_ratios_cycle_over_clients(self):
    config = small_config('/tmp/unused', client_keep_ratios='0.5,0.7,1.0')
    self.assertEqual([config.keep_ratio_of(c) for c in range(5)],
                     [0.5, 0.7, 1.0, 0.5, 0.7])
    self.assertEqual(small_config('/tmp/unused').keep_ratio_of(3), 0.5)

  def test_unreachable_worker_is_a_clear_error_writing_nothing(self):
    root = self.create_tempdir().full_path
    config = small_config(os.path.join(root, 'out'), workers='localhost:1')
    with self.assertRaisesRegex(loop.ConfigError,
                                'localhost:1 did not answer'):
      loop.run_experiment(config, progress=False)
    self.assertFalse(os.path.exists(config.root_output_dir))

  def test_output_dir_that_is_a_file(self):
    path = self.create_tempfile().full_path
    with self.assertRaisesRegex(loop.ConfigError, 'not a directory'):
      loop.validate(small_config(path))


if __name__ == '__main__':
  absltest.main()

"""Tests of the run configuration: validation, defaults, resumption."""

import dataclasses
import json
import os

from absl.testing import absltest
from absl.testing import parameterized

import keras_models
from tests import testing
from tff_fedprune.simulation import config as config_lib
from tff_fedprune.simulation import fields
from tff_fedprune.simulation import run_directory


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
      ({'gate_balance': -0.1}, '--gate_balance must be >= 0'),
      ({'self_distillation': 1.0, 'dynamic_pruning': False},
       '--self_distillation needs --dynamic_pruning'),
      ({'client_failure_rate': 1.0}, 'client_failure_rate'),
      ({'workers': 'localhost'}, 'not host:port'),
      ({'dirichlet_alpha': 0.0}, 'dirichlet_alpha must be > 0'),
      ({'dirichlet_alpha': -1.0}, 'dirichlet_alpha must be > 0'),
      ({'total_rounds': 0}, 'total_rounds must be >= 1'),
      ({'client_momentum': 1.0}, 'client_momentum'),
      ({'client_learning_rate': 0.0}, 'client_learning_rate must be > 0'),
      ({'experiment_name': 'a/b'}, 'must name a directory inside'),
      ({'experiment_name': '..'}, 'must name a directory inside'),
      ({'experiment_name': '.'}, 'must name a directory inside'),
      ({'experiment_name': ''}, 'must name a directory inside'),
      ({'server_learning_rate': float('inf')}, 'must be finite'),
      ({'client_learning_rate': float('inf')}, 'must be finite'),
      ({'weight_decay': float('inf')}, 'must be finite'),
      ({'prox_mu': float('nan')}, 'must be finite'),
      ({'upload_bits': 7},
       r'--upload_bits must be one of \(32, 16, 8, 4, 2, 1\)'),
      ({'upload_rotation': 'hadamard'},
       '--upload_rotation=hadamard rotates quantised values'),
      ({'upload_bits': 1, 'upload_rotation': 'hadamard',
        'upload_rotation_block': 100},
       '--upload_rotation_block must be a power of two, got 100'),
      ({'upload_bits': 1, 'algorithm': 'scaffold'},
       "--upload_bits=1 quantises the model update only: scaffold's"),
      ({'upload_rotation': 'kashin'}, 'unknown upload rotation'),
      ({'upload_bits': 0}, r'--upload_bits must be one of'),
      ({'error_feedback': True, 'algorithm': 'scaffold'},
       '--error_feedback serves fedavg and fedprox, not scaffold'),
      ({'target_accuracy': 1.5}, r'--target_accuracy must be in \(0, 1\]'),
      ({'seed': -1}, r'--seed must be in \[0, 2\^32\)'),
      ({'seed': 2**40}, r'--seed must be in \[0, 2\^32\)'),
      ({'workers': 'host:8000'}, 'mutual TLS'),
      ({'workers': 'host:8000', 'worker_ca_cert': '/no/ca.pem',
        'worker_client_cert': '/no/c.pem', 'worker_client_key': '/no/k'},
       'no such file: /no/ca.pem'),
  )
  def test_rejects(self, overrides, message):
    config = testing.small_config('/tmp/unused', num_clients=10, clients_per_round=5)
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.validate(dataclasses.replace(config, **overrides),
                          keras_models.MODELS)

  def test_client_keep_ratios_cycle_over_clients(self):
    config = testing.small_config('/tmp/unused', client_keep_ratios='0.5,0.7,1.0')
    self.assertEqual([config.keep_ratio_of(c) for c in range(5)],
                     [0.5, 0.7, 1.0, 0.5, 0.7])
    self.assertEqual(testing.small_config('/tmp/unused').keep_ratio_of(3), 0.5)

  def test_keep_ratio_warmup_starts_dense_and_reaches_the_tier(self):
    config = testing.small_config(
        '/tmp/unused', num_clients=4, device_tiers='0.5:1:1,1.0:4:10',
        keep_ratio=1.0, keep_ratio_warmup_rounds=4)
    narrow = [c for c in range(4) if config.keep_ratio_of(c) == 0.5][0]
    self.assertEqual([config.training_keep_ratio(narrow, r) for r in range(
        1, 7)], [1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    self.assertEqual(dataclasses.replace(
        config, keep_ratio_warmup_rounds=0).training_keep_ratio(narrow, 1), 0.5)
    config_lib.validate(config)
    for overrides in ({'channel_policy': 'heterofl'},
                      {'dynamic_pruning': False}):
      with self.assertRaisesRegex(config_lib.ConfigError,
                                  '--keep_ratio_warmup_rounds serves'):
        config_lib.validate(dataclasses.replace(config, **overrides))

  def test_local_socket_workers_need_no_certificates(self):
    config_lib.validate(testing.small_config(
        '/tmp/unused', workers='unix:/tmp/a.sock,unix:/tmp/b.sock'))

  def test_workers_in_plaintext_only_when_asked(self):
    config = testing.small_config('/tmp/unused', workers='host:8000',
                                  insecure_workers=True)
    config_lib.validate(config)
    self.assertIsNone(config.worker_credentials())

  def test_eval_keep_ratio_defaults_to_keep_ratio(self):
    config = testing.small_config('/tmp/unused', client_keep_ratios='0.3,1.0')
    self.assertEqual(config.evaluation_keep_ratio, 0.5)
    self.assertEqual(
        dataclasses.replace(config, eval_keep_ratio=0.9).evaluation_keep_ratio,
        0.9)
    with self.assertRaisesRegex(config_lib.ConfigError, 'keep ratio'):
      config_lib.validate(dataclasses.replace(config, eval_keep_ratio=0.0))

  def test_old_config_without_new_keys_resumes(self):
    config = testing.small_config(self.create_tempdir().full_path)
    os.makedirs(config.run_dir)
    old = dataclasses.asdict(config)
    del old['eval_keep_ratio']
    del old['gated_bn']
    del old['upload_bits']
    del old['error_feedback']
    del old['gate_selection']
    with open(os.path.join(config.run_dir, 'config.json'), 'w') as f:
      json.dump(old, f)
    run_directory.check_resumable(config)
    for change, field in ((dict(eval_keep_ratio=0.9), 'eval_keep_ratio'),
                          (dict(gated_bn='full'), 'gated_bn'),
                          (dict(upload_bits=8), 'upload_bits'),
                          (dict(gate_selection='centered'),
                           'gate_selection')):
      with self.assertRaisesRegex(config_lib.ConfigError, field):
        run_directory.check_resumable(dataclasses.replace(config, **change))

  def test_checkpoints_stay_bound_to_their_configuration(self):
    config = testing.small_config(self.create_tempdir().full_path)
    checkpoints = os.path.join(config.run_dir, 'checkpoints')
    os.makedirs(os.path.join(checkpoints, 'program_state_1'))
    with self.assertRaisesRegex(config_lib.ConfigError,
                                'has checkpoints but no config.json'):
      run_directory.check_resumable(config)
    with open(os.path.join(checkpoints, 'config.json'), 'w') as f:
      json.dump(dataclasses.asdict(config), f)
    run_directory.check_resumable(config)  # config.json gone: the binding says.
    other = dataclasses.replace(config, seed=8)
    with open(os.path.join(config.run_dir, 'config.json'), 'w') as f:
      json.dump(dataclasses.asdict(other), f)  # Edited to match another run.
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'different seed \(checkpoints/config.json\)'):
      run_directory.check_resumable(other)

  def test_a_malformed_config_json_is_a_config_error(self):
    config = testing.small_config(self.create_tempdir().full_path)
    os.makedirs(config.run_dir)
    for content in ('{', '[]', '\xff'):
      with open(os.path.join(config.run_dir, 'config.json'), 'w',
                encoding='latin-1') as f:
        f.write(content)
      with self.subTest(content), self.assertRaisesRegex(
          config_lib.ConfigError, 'config.json'):
        run_directory.check_resumable(config)

  def test_integers_and_text_in_range(self):
    base = testing.small_config(self.create_tempdir().full_path)
    for change, message in ((dict(batch_size=2**40), 'batch_size must be at'),
                            (dict(data_dir='a\udcff'), 'data_dir must be UTF-8'),
                            (dict(experiment_name='a\x00'), 'NUL')):
      with self.subTest(message), self.assertRaisesRegex(
          config_lib.ConfigError, message):
        config_lib.validate(dataclasses.replace(base, **change))

  def test_every_field_has_help(self):
    for field in dataclasses.fields(config_lib.ExperimentConfig):
      self.assertTrue(fields.help_text(field), field.name)

  def test_output_dir_that_is_a_file(self):
    path = self.create_tempfile().full_path
    with self.assertRaisesRegex(config_lib.ConfigError, 'not a directory'):
      config_lib.validate(testing.small_config(path))


if __name__ == '__main__':
  absltest.main()

"""Tests of the experiment driver: outputs, resume, validation."""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tests import testing
from tff_fedprune import gated_conv
from tff_fedprune import privacy
from tff_fedprune.simulation import config as config_lib
from tff_fedprune.simulation import data_source
from tff_fedprune.simulation import devices
from tff_fedprune.simulation import flops
from tff_fedprune.simulation import loop
from tff_fedprune.simulation import program
from tff_fedprune.simulation import run_directory

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


def read_rows(run_dir, name='metrics.csv'):
  with open(os.path.join(run_dir, name)) as f:
    return list(csv.DictReader(f))


def run(config, built=None):
  return loop.run_experiment(config, keras_models.BUILDERS, progress=False,
                             built=built)


class RunExperimentTest(parameterized.TestCase):

  # SCAFFOLD resumes its driver-held control variates from the checkpoint;
  # 8-bit uploads round with seeds of (seed, round, client), not hidden state;
  # so do 1-bit rotated ones, whose error-feedback residuals are checkpointed.
  @parameterized.parameters(
      ('fedavg', 32, {}), ('scaffold', 8, {}),
      ('fedavg', 1, {'error_feedback': True, 'upload_rotation': 'hadamard'}),
      # DP noise is drawn from a seed in the checkpointed aggregator state;
      # the values go through the 8-bit secure sum.
      ('fedavg', 8, {'upload_support': 'server', 'dp_noise_multiplier': 1.0,
                     'dp_clip': 0.5}))
  def test_outputs_and_resume_reproduce_an_uninterrupted_run(
      self, algorithm, upload_bits, values):
    root = self.create_tempdir().full_path
    straight = testing.small_config(os.path.join(root, 'a'),
                                    algorithm=algorithm,
                                    upload_bits=upload_bits, **values)
    # One process serves all three runs (they differ in resumable fields).
    built = loop.build_process(straight, keras_models.BUILDERS['cnn'],
                               data_source.load_data(straight))
    run(straight, built)
    interrupted = testing.small_config(os.path.join(root, 'b'), total_rounds=2,
                                       algorithm=algorithm,
                                       upload_bits=upload_bits, **values)
    run(interrupted, built)
    self.assertLen(read_rows(interrupted.run_dir), 2)
    summary = run(dataclasses.replace(interrupted, total_rounds=3), built)

    a, b = read_rows(straight.run_dir), read_rows(interrupted.run_dir)
    self.assertEqual([r['round'] for r in b], ['1', '2', '3'])
    self.assertContainsSubset(
        ['round'] + list(program.COLUMNS), list(b[0]))
    for row_a, row_b in zip(a, b):
      row_a.pop('round_seconds')
      row_b.pop('round_seconds')
      self.assertEqual(row_a, row_b)
    for name in (loop.CLIENTS_CSV, loop.LAYERS_CSV):  # Replayed, not doubled.
      self.assertEqual(read_rows(straight.run_dir, name),
                       read_rows(interrupted.run_dir, name))
    self.assertEqual(summary['rounds_completed'], 3)
    self.assertEqual(summary['final']['round'], 3)
    dp = straight.dp()
    for row in b:
      self.assertEqual(
          row['dp_epsilon'],
          str(privacy.epsilon(dp, int(row['round'])) if dp else math.nan))
    self.assertEqual(str(summary['dp_epsilon']), b[-1]['dp_epsilon'])
    for row in b:
      self.assertAlmostEqual(
          float(row['bits_per_parameter']),
          32 * int(row['upload_bytes']) / int(row['dense_upload_bytes']))
    self.assertAlmostEqual(
        summary['bits_per_parameter'],
        32 * summary['total_upload_bytes'] / summary['total_dense_upload_bytes'])
    with open(os.path.join(interrupted.run_dir, 'summary.json')) as f:
      self.assertEqual(json.load(f)['config']['total_rounds'], 3)
    for name in ('tensorboard', 'checkpoints', 'model/model.keras',
                 'model/preprocessing.json'):
      self.assertTrue(os.path.exists(os.path.join(interrupted.run_dir, name)),
                      name)
    # A finished run reruns as a no-op with the same rows; a target accuracy
    # (resumable) adds the upload it took to reach it.
    summary = run(dataclasses.replace(
        interrupted, total_rounds=3, target_accuracy=1e-6), built)
    self.assertLen(read_rows(interrupted.run_dir), 3)
    self.assertEqual(summary['upload_to_target'], {
        'target_accuracy': 1e-6, 'round': 1,
        'upload_bytes': int(b[0]['upload_bytes'])})

  def test_huge_dp_noise_leaves_the_model_near_chance(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(
        root, dynamic_pruning=False, dp_noise_multiplier=1e4, dp_clip=1.0,
        total_rounds=2, clients_per_round=4)
    summary = run(config)
    self.assertLess(summary['final']['test_accuracy'], 0.25)  # 10 classes.
    self.assertEqual(summary['final']['dp_epsilon'],
                     privacy.epsilon(config.dp(), 2))
    self.assertEqual(summary['dp_delta'], 1 / config.num_clients)

  @parameterized.parameters('feddp', 'heterofl')
  def test_device_tiers_are_timed_evaluated_and_recorded(self, policy):
    root = self.create_tempdir().full_path
    config = testing.small_config(
        root, total_rounds=2, num_clients=4, clients_per_round=4,
        device_tiers='0.5:1:1,1.0:4:10', tier_shares='0.5,0.5',
        channel_policy=policy, keep_ratio=1.0, target_accuracy=1e-6)
    summary = run(config)
    rows = read_rows(config.run_dir)
    clients = read_rows(config.run_dir, loop.CLIENTS_CSV)
    tiers = {t['label']: t for t in summary['device_tiers']}
    self.assertEqual(sorted(len(t['clients']) for t in tiers.values()), [2, 2])
    for row in clients:
      tier = tiers[row['tier']]
      self.assertIn(int(row['client']), tier['clients'])
      self.assertEqual(float(row['keep_ratio']), tier['keep_ratio'])
      self.assertEqual(int(row['download_bytes']), tier['download_bytes'])
      expected = devices.client_seconds(
          devices.DeviceTier(**{k: tier[k] for k in (
              'keep_ratio', 'speed', 'mbps', 'label')}),
          train_flops=float(row['train_flops']),
          download_bytes=int(row['download_bytes']),
          upload_bytes=int(row['upload_bytes']),
          reference_flops_per_s=config.reference_flops_per_s).total
      self.assertAlmostEqual(float(row['simulated_seconds']), expected)
    for r in rows:
      mine = [c for c in clients if c['round'] == r['round']]
      self.assertAlmostEqual(float(r['simulated_round_seconds']),
                             max(float(c['simulated_seconds']) for c in mine))
      self.assertEqual(int(r['download_bytes']),
                       sum(int(c['download_bytes']) for c in mine))
    self.assertAlmostEqual(float(rows[1]['simulated_seconds']), sum(
        float(r['simulated_round_seconds']) for r in rows))
    self.assertEqual(float(rows[-1]['test_accuracy_tier_1.0']),
                     float(rows[-1]['test_accuracy']))
    self.assertBetween(float(rows[-1]['test_accuracy_tier_0.5']), 0.0, 1.0)
    self.assertEqual(summary['upload_to_target']['simulated_seconds'],
                     float(rows[0]['simulated_seconds']))
    # A prefix device downloads only its sub-model; FedDP's the whole model.
    narrow, wide = tiers['0.5']['download_bytes'], tiers['1.0']['download_bytes']
    self.assertEqual(narrow < wide, policy == 'heterofl')

  def test_keep_ratio_warmup_trains_the_scheduled_widths(self):
    config = testing.small_config(
        self.create_tempdir().full_path, total_rounds=3, num_clients=4,
        clients_per_round=4, device_tiers='0.5:1:1,1.0:4:10', keep_ratio=1.0,
        keep_ratio_warmup_rounds=2)
    run(config)
    narrow = [c for c in read_rows(config.run_dir, loop.CLIENTS_CSV)
              if c['tier'] == '0.5']
    by_round = {}
    for c in narrow:
      by_round.setdefault(int(c['round']), []).append(c)
    self.assertEqual([{float(c['keep_ratio']) for c in by_round[r]}
                      for r in (1, 2, 3)], [{1.0}, {0.75}, {0.5}])
    flops = [sum(float(c['train_flops']) / float(c['dense_train_flops'])
                 for c in by_round[r]) for r in (1, 2, 3)]
    self.assertGreater(flops[0], flops[1])
    self.assertGreater(flops[1], flops[2])

  def test_round_deadline_leaves_late_clients_out(self):
    root = self.create_tempdir().full_path
    tiered = dict(total_rounds=1, num_clients=4, clients_per_round=4,
                  device_tiers='0.5:1:1,1.0:4:10', tier_shares='0.5,0.5')
    free = testing.small_config(os.path.join(root, 'free'), **tiered)
    run(free)
    seconds = {c['client']: float(c['simulated_seconds'])
               for c in read_rows(free.run_dir, loop.CLIENTS_CSV)}
    deadline = sorted(seconds.values())[1] + 1e-6  # Two clients make it.
    late = testing.small_config(os.path.join(root, 'late'),
                                round_deadline_s=deadline, **tiered)
    run(late)
    row = read_rows(late.run_dir)[0]
    self.assertEqual(int(row['clients_late']), 2)
    self.assertAlmostEqual(float(row['simulated_round_seconds']), deadline)
    self.assertEqual(int(read_rows(free.run_dir)[0]['clients_late']), 0)
    self.assertNotEqual(row['test_accuracy'],
                        read_rows(free.run_dir)[0]['test_accuracy'])

  def test_scaffold_counts_control_variate_traffic(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(root, total_rounds=1, algorithm='scaffold')
    run(config)
    dense = testing.small_config(os.path.join(root, 'dense'), total_rounds=1)
    run(dense)
    row, dense_row = read_rows(config.run_dir)[0], read_rows(dense.run_dir)[0]
    # c travels down and dc_k up: dense-equivalent traffic grows by the
    # trainable weights per client, the measured upload by encoded dc_k.
    self.assertGreater(int(row['dense_upload_bytes']),
                       int(dense_row['dense_upload_bytes']))
    self.assertEqual(row['download_bytes'], row['dense_upload_bytes'])
    self.assertGreater(int(row['upload_bytes']), 0)
    self.assertLess(int(row['upload_bytes']), int(row['dense_upload_bytes']))

  def test_evaluation_and_saved_model_use_the_eval_keep_ratio(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(root, total_rounds=1,
                                  client_keep_ratios='0.3,1.0',
                                  eval_keep_ratio=0.8, clients_per_round=4,
                                  measure_overfitting=True)
    run(config)
    model = tf.keras.models.load_model(
        os.path.join(config.run_dir, 'model', 'model.keras'))
    self.assertEqual(
        {float(l.keep_ratio.numpy()) for l in gated_conv.gated_layers(model)},
        {np.float32(0.8)})
    # Over-fitting figures: the saved global model on the pooled training
    # data, and the trained clients on their own data.
    row = read_rows(config.run_dir)[0]
    train_data = data_source.load_data(config).train_eval_dataset()
    correct = sum(
        int(np.sum(np.argmax(model(x, training=False), -1) == y.numpy()))
        for x, y in train_data)
    total = sum(len(y) for _, y in train_data)
    self.assertAlmostEqual(float(row['train_accuracy']), correct / total,
                           places=6)
    self.assertBetween(float(row['local_train_accuracy']), 0.0, 1.0)
    flops_ratio = float(read_rows(config.run_dir)[0]['flops_ratio'])
    dense = flops.dense_flops(model)
    # Measured at 0.8, not at --keep_ratio 0.5 (zero saliencies may prune
    # more than the top-k count).
    self.assertGreater(flops_ratio, flops.top_k_flops(model, 0.5) / dense)
    self.assertLessEqual(flops_ratio, flops.top_k_flops(model, 0.8) / dense)
    self.check_costs(config, row)

  def check_costs(self, config, row):
    """clients.csv, layers.csv and the summary agree with metrics.csv."""
    clients = read_rows(config.run_dir, loop.CLIENTS_CSV)
    self.assertLen(clients, config.clients_per_round)
    for c in clients:
      self.assertEqual(float(c['keep_ratio']),
                       config.keep_ratio_of(int(c['client'])))
    self.assertEqual(sum(int(c['upload_bytes']) for c in clients),
                     int(row['upload_bytes']))
    ratios = [float(c['train_flops']) / float(c['dense_train_flops'])
              for c in clients]
    self.assertAlmostEqual(float(row['train_flops_ratio']), np.mean(ratios))
    by_ratio = {float(c['keep_ratio']): r for c, r in zip(clients, ratios)}
    self.assertLess(by_ratio[0.3], by_ratio[1.0])  # Cost falls with keep.
    layers = read_rows(config.run_dir, loop.LAYERS_CSV)
    self.assertEqual([l['layer'] for l in layers], ['block1', 'block2',
                                                     'block3'])
    for l in layers:
      self.assertBetween(float(l['computed_share']), 0.0, 1.0)
    with open(os.path.join(config.run_dir, 'summary.json')) as f:
      summary = json.load(f)
    self.assertAlmostEqual(summary['total_train_flops'],
                           sum(float(c['train_flops']) for c in clients))
    self.assertEqual(set(summary['mean_computed_share']),
                     {'block1', 'block2', 'block3'})

  def test_client_failures_are_dropped_and_measured(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(root, num_clients=10, clients_per_round=10,
                          client_failure_rate=0.3, total_rounds=2)
    run(config)
    for row in read_rows(config.run_dir):
      self.assertEqual(row['clients_dropped'], '3')
      self.assertEqual(row['clients_completed'], '7')
      self.assertNotEqual(row['test_accuracy'], 'nan')
    clients = data_source.sample_clients(config, 1)
    self.assertLen(set(clients.completing) | set(clients.dropped), 10)
    self.assertEqual(data_source.sample_clients(config, 1), clients)

  def test_refuses_to_resume_a_different_configuration(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(root, total_rounds=1)
    run(config)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                'different client_learning_rate'):
      run(dataclasses.replace(config, client_learning_rate=0.1))


class RunDirectoryTest(absltest.TestCase):

  def test_untrainable_model_stops_before_its_state_is_saved(self):
    # A server step of 3e38 leaves weights no client can train from: every
    # update of round 2 is non-finite.
    config = testing.small_config(self.create_tempdir().full_path,
                                  dynamic_pruning=False,
                                  server_learning_rate=3e38)
    with self.assertRaisesRegex(program.NonFiniteModelError,
                                "round 2: every client's update"):
      run(config)
    rows = read_rows(config.run_dir)
    self.assertEqual([r['round'] for r in rows], ['1', '2'])
    self.assertEqual([r['non_finite_updates'] for r in rows], ['0', '2'])
    self.assertEqual(
        sorted(os.listdir(os.path.join(config.run_dir, 'checkpoints'))),
        ['config.json', 'program_state_1'])

  def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(self):
    root = self.create_tempdir().full_path
    straight = testing.small_config(os.path.join(root, 'a'))
    run(straight)
    broken = testing.small_config(os.path.join(root, 'b'), total_rounds=2)
    run(broken)
    checkpoints = os.path.join(broken.run_dir, 'checkpoints')
    data = os.path.join(checkpoints, 'program_state_2', 'variables',
                        'variables.data-00000-of-00001')
    with open(data, 'r+b') as f:
      f.truncate(10)
    stale = os.path.join(checkpoints, 'program_state_3_temp1234')
    os.makedirs(stale)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      run(dataclasses.replace(broken, total_rounds=3))
    self.assertIn(f'checkpoint {os.path.dirname(os.path.dirname(data))} is'
                  ' unreadable', stderr.getvalue())
    self.assertFalse(os.path.exists(stale))
    for a, b in zip(read_rows(straight.run_dir), read_rows(broken.run_dir)):
      a.pop('round_seconds')
      b.pop('round_seconds')
      self.assertEqual(a, b)

  def test_a_second_writer_is_refused_naming_the_first(self):
    config = testing.small_config(self.create_tempdir().full_path)
    os.makedirs(config.run_dir)
    with run_directory.exclusive_writer(config.run_dir):
      with self.assertRaisesRegex(run_directory.RunDirectoryError,
                                  f'another run \\(pid {os.getpid()}\\)'):
        run(config)
    self.assertEqual(os.listdir(config.run_dir), ['lock'])

  def test_model_file_is_replaced_only_when_fully_written(self):
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, 'model.keras')
    model = keras_models.build_model('cnn', (8, 8, 1), 10)
    run_directory.save_keras_model(model, path)
    with open(path, 'rb') as f:
      good = f.read()

    def fail(tmp):
      with open(tmp, 'wb') as f:
        f.write(b'partial')
      raise OSError(28, 'No space left on device')

    model.save = fail
    with self.assertRaises(OSError):
      run_directory.save_keras_model(model, path)
    with open(path, 'rb') as f:
      self.assertEqual(f.read(), good)
    self.assertEqual(os.listdir(directory), ['model.keras'])


class WorkersTest(absltest.TestCase):

  def test_unreachable_worker_is_a_clear_error_writing_nothing(self):
    root = self.create_tempdir().full_path
    config = testing.small_config(os.path.join(root, 'out'),
                                  workers='localhost:1', insecure_workers=True)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                'localhost:1 did not answer'):
      run(config)
    self.assertFalse(os.path.exists(config.root_output_dir))


if __name__ == '__main__':
  absltest.main()

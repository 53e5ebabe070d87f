"""Tests of the heterogeneous-federation report."""

import csv
import json
import os

from absl.testing import absltest
import numpy as np

from tests import testing
from tff_fedprune.simulation import methods
from tff_fedprune.simulation import reporting
from tff_fedprune.simulation import tier_report

TIERS = '0.5:1:1,1.0:4:10'
COMMITTED = os.path.join(testing.ROOT, 'results', 'heterogeneity',
                         'fmnist_cnn')


def write_run(directory, seed, policy, tier_accuracy, dynamic=True,
              rounds=6, **config):
  """A run whose tier accuracies are `tier_accuracy` + round / 100."""
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'seed': seed, 'dynamic_pruning': dynamic,
               'channel_policy': policy, 'device_tiers': TIERS,
               'static_batch_norm': dynamic, **config}, f)
  with open(os.path.join(directory, 'metrics.csv'), 'w') as f:
    writer = csv.writer(f)
    writer.writerow(['round', 'test_accuracy', 'test_accuracy_tier_0.5',
                     'test_accuracy_tier_1.0', 'upload_bytes',
                     'simulated_seconds'])
    for r in range(1, rounds + 1):
      writer.writerow([r, tier_accuracy[1] + r / 100,
                       tier_accuracy[0] + r / 100, tier_accuracy[1] + r / 100,
                       1e6, 10.0 * r])
  with open(os.path.join(directory, 'clients.csv'), 'w') as f:
    writer = csv.writer(f)
    writer.writerow(['round', 'client', 'tier', 'train_flops',
                     'dense_train_flops'])
    writer.writerow([1, 0, '0.5', 30.0, 100.0])
    writer.writerow([1, 1, '1.0', 100.0, 100.0])


class TierReportTest(absltest.TestCase):

  def runs(self):
    root = self.create_tempdir().full_path
    paths = []
    for seed, (feddp, heterofl) in enumerate(((0.5, 0.4), (0.6, 0.45),
                                              (0.55, 0.5))):
      for policy, low in (('feddp', feddp), ('heterofl', heterofl)):
        paths.append(os.path.join(root, f'{policy}_{seed}'))
        write_run(paths[-1], seed, policy, (low, 0.7))
    return [reporting.load_run(p) for p in paths]

  def test_tier_figures_and_paired_differences(self):
    table = tier_report.summarize(self.runs(), target=0.73)
    feddp = table['feddp']
    # Last 5 of rounds 1..6: base + 0.04 on average.
    self.assertAlmostEqual(feddp['tiers']['0.5']['accuracy'][0],
                           np.mean([0.5, 0.6, 0.55]) + 0.04)
    self.assertAlmostEqual(feddp['tiers']['0.5']['train_flops'][0], 0.3)
    self.assertAlmostEqual(feddp['upload_mb'][0], 6.0)
    self.assertAlmostEqual(feddp['time_to_target'][0], 30.0)  # 0.7 + 0.03.
    differences = [0.1, 0.15, 0.05]
    mean, half = reporting.paired_interval(differences)
    self.assertAlmostEqual(mean, 0.1)
    # t(0.975, 2 df) = 4.303; std (ddof 1) = 0.05.
    self.assertAlmostEqual(half, 4.3027 * 0.05 / np.sqrt(3), places=4)
    markdown = tier_report.markdown(table, 0.73)
    self.assertIn('| heterofl | 0.5 | 3 | +10.0 ± 12.4 | - |', markdown)
    self.assertIn('| feddp | 3 | 0.5 | 59.0 ± 4.1 |', markdown)

  def test_a_dense_run_is_one_model_on_every_tier(self):
    root = self.create_tempdir().full_path
    write_run(os.path.join(root, 'dense'), 0, 'feddp', (0.2, 0.7),
              dynamic=False)
    run = reporting.load_run(os.path.join(root, 'dense'))
    self.assertEqual(methods.method_of(run.config), 'dense')
    self.assertEqual(tier_report.tier_accuracy(run, '0.5'),
                     tier_report.tier_accuracy(run, '1.0'))

  def test_matched_flops_take_the_best_tier_within_the_budget(self):
    tiers = {label: dict(train_flops=(cost, 0.0), accuracy=(accuracy, 0.0))
             for label, cost, accuracy in (('0.5', 0.2, 0.6), ('0.7', 0.4, 0.5),
                                           ('1.0', 0.8, 0.7))}
    self.assertTrue(np.isnan(tier_report.at_flops(tiers, 0.1)[0]))
    self.assertEqual(tier_report.at_flops(tiers, 0.3), (0.6, 0.3))
    accuracy, cost = tier_report.at_flops(tiers, 0.6)
    self.assertAlmostEqual(accuracy, 0.65)  # Halfway from 0.6 (best) to 0.7.
    self.assertEqual(cost, 0.6)
    self.assertEqual(tier_report.at_flops(tiers, 0.9), (0.7, 0.8))

  def test_a_remedy_is_paired_with_feddp_over_its_own_rounds(self):
    root = self.create_tempdir().full_path
    write_run(os.path.join(root, 'feddp'), 0, 'feddp', (0.5, 0.7))
    write_run(os.path.join(root, 'warmup'), 0, 'feddp', (0.55, 0.7),
              rounds=3, keep_ratio_warmup_rounds=10)
    feddp, warmup = (reporting.load_run(os.path.join(root, d))
                     for d in ('feddp', 'warmup'))
    self.assertEqual(methods.method_of(warmup.config), 'feddp_warmup')
    rows = tier_report.summarize_remedies([warmup], [feddp], target=0.72)
    low = [r for r in rows if r['tier'] == '0.5'][0]
    self.assertEqual(low['rounds'], 3)
    self.assertAlmostEqual(low['accuracy'], 0.55 + 0.02)  # Rounds 1-3.
    self.assertAlmostEqual(low['feddp_accuracy'], 0.5 + 0.02)
    self.assertEqual((low['time_to_target'], low['feddp_time_to_target']),
                     (20.0, 20.0))
    self.assertIn('| feddp_warmup | 0 | 3 | 0.5 | 57.0 | 52.0 | +5.0 | 0.30 |'
                  ' 20 (20) |', tier_report.markdown(
                      tier_report.summarize([feddp], 0.72), 0.72, rows))

  def test_method_names_of_runs(self):
    feddp = dict(methods.METHODS['feddp'], channel_policy='feddp')
    self.assertEqual(methods.method_of(feddp), 'feddp')
    self.assertEqual(methods.method_of(dict(feddp, gate_balance=0.1)),
                     'feddp_balance')
    self.assertIsNone(methods.method_of(dict(feddp, gate_balance=0.3)))
    self.assertEqual(methods.method_of(dict(
        methods.METHODS['heterofl'], static_batch_norm=True)), 'heterofl')

  def test_committed_report_is_recomputed_from_its_csv_files(self):
    from experiments import heterogeneity_report  # pylint: disable=g-import-not-at-top
    with open(os.path.join(COMMITTED, 'report.md')) as f:
      committed = f.read()
    self.assertEqual(committed, heterogeneity_report.report(
        COMMITTED, heterogeneity_report.TARGET_ACCURACY,
        COMMITTED + '_remedies'))
    with open(os.path.join(testing.ROOT, 'docs', 'results.md')) as f:
      self.assertIn(committed, f.read())


if __name__ == '__main__':
  absltest.main()

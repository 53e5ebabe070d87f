"""Tests of the run report: its numbers equal those recomputed from CSV."""

import csv
import json
import os

from absl.testing import absltest
import numpy as np

from experiments import upload_report
from tests import testing
from tff_fedprune.simulation import reporting

ROOT = testing.ROOT
RESULTS = os.path.join(ROOT, 'results', 'fmnist_comparison')
GRID = os.path.join(ROOT, 'results', 'fmnist_grid')


def committed_runs(directory=RESULTS):
  return sorted(os.path.join(directory, d) for d in os.listdir(directory)
                if os.path.exists(os.path.join(directory, d, 'config.json')))


def read_rows(run_dir):
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    return list(csv.DictReader(f))


def write_run(directory, seed, accuracies, uploads, dynamic_pruning=True,
              **config):
  """A run directory with these per-round figures; returns its path."""
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'seed': seed, 'algorithm': 'fedavg', 'dataset': 'digits',
               'dynamic_pruning': dynamic_pruning, 'keep_ratio': 0.7,
               **config}, f)
  with open(os.path.join(directory, 'metrics.csv'), 'w') as f:
    writer = csv.writer(f)
    writer.writerow(['round', 'test_accuracy', 'upload_bytes',
                     'dense_upload_bytes', 'flops_ratio', 'round_seconds',
                     'update_density'])
    for i, (a, u) in enumerate(zip(accuracies, uploads), 1):
      writer.writerow([i, a, u, 1000, 0.5, 2.0, 0.6])
  return directory


class ReportingTest(absltest.TestCase):

  def test_committed_runs_match_their_csv_files(self):
    paths = committed_runs()
    table = reporting.summarize([reporting.load_run(p) for p in paths])
    self.assertLen(table, 4)
    by_name = {os.path.basename(p): p for p in paths}
    dense_upload = None
    for name, path in by_name.items():
      rows = read_rows(path)
      upload = sum(int(r['upload_bytes']) for r in rows) / 1e6
      if name == 'fmnist_fedavg_dense':
        dense_upload = upload
      final = float(rows[-1]['test_accuracy'])
      matches = [r for r in table if abs(r['upload_mb'] - upload) < 1e-9]
      self.assertLen(matches, 1, name)
      self.assertAlmostEqual(matches[0]['final_accuracy'], final)
      self.assertAlmostEqual(
          matches[0]['best_accuracy'],
          max(float(r['test_accuracy']) for r in rows))
    for row in table:
      self.assertAlmostEqual(row['upload_vs_dense'],
                             row['upload_mb'] / dense_upload)
    markdown = reporting.markdown_table(table)
    self.assertIn('| fedavg gated keep 0.7 tau 0.5 | 1 | 72.35 ± 0.00', markdown)

  def test_committed_grid_report_is_recomputed_from_its_csv_files(self):
    paths = committed_runs(GRID)
    self.assertLen(paths, 24)
    table = reporting.summarize([reporting.load_run(p) for p in paths])
    with open(os.path.join(GRID, 'report.md')) as f:
      report = f.read()
    self.assertEqual(report, reporting.markdown_table(table))
    with open(os.path.join(ROOT, 'docs', 'results.md')) as f:
      self.assertIn(report, f.read())
    cells = {}
    for path in paths:
      name, _ = os.path.basename(path).rsplit('_seed', 1)
      cells.setdefault(name, []).append(read_rows(path))
    self.assertLen(cells, 8)
    rows_by_cell = {
        r['config']['algorithm']
        + ('_gated' if r['config']['dynamic_pruning'] else '_dense'): r
        for r in table
    }
    for name, runs in cells.items():
      row = rows_by_cell[name]
      self.assertLen(runs, 3)
      self.assertAlmostEqual(row['final_accuracy'], np.mean(
          [float(rows[-1]['test_accuracy']) for rows in runs]))
      self.assertAlmostEqual(row['upload_mb'], np.mean(
          [sum(int(r['upload_bytes']) for r in rows) / 1e6 for rows in runs]))
      dense_name = name.split('_')[0] + '_dense'
      self.assertAlmostEqual(
          row['upload_vs_dense'],
          row['upload_mb'] / rows_by_cell[dense_name]['upload_mb'])

  def test_committed_upload_comparison_is_recomputed_from_its_csv_files(self):
    results = os.path.join(ROOT, 'results')
    runs = [reporting.load_run(p)
            for p in upload_report.run_dirs(results)]
    with open(os.path.join(results, 'upload_comparison.md')) as f:
      report = f.read()
    self.assertEqual(report, upload_report.report(runs))
    with open(os.path.join(ROOT, 'docs', 'results.md')) as f:
      self.assertIn(report, f.read())
    labels = {r['label'] for r in reporting.summarize(runs)}
    self.assertIn('fedavg gated keep 0.7 tau 0.5 8-bit', labels)
    self.assertIn('fedavg gated keep 0.7 tau 0.5 8-bit EF', labels)
    # Bits per parameter: 32 * upload / the run's own dense upload.
    for run in runs:
      self.assertAlmostEqual(
          run.figures()['bits_per_parameter'],
          32 * run.figures()['upload_mb'] / run.figures()['dense_upload_mb'])

  def test_paired_against_pairs_seeds_with_the_reference(self):
    root = self.create_tempdir().full_path
    reference = [write_run(os.path.join(root, f'ref{s}'), s, [0.5, 0.6],
                           [10, 10]) for s in (0, 1, 2)]
    variant = [write_run(os.path.join(root, f'var{s}'), s, [0.5, 0.6 + d],
                         [1, 1], upload_bits=1)
               for s, d in ((0, 0.01), (1, 0.03))]
    runs = [reporting.load_run(p) for p in reference + variant]
    rows = reporting.paired_against(runs, 'fedavg gated keep 0.7')
    self.assertLen(rows, 1)
    self.assertEqual(rows[0]['seeds'], 2)
    # Last 5 of two rounds: the mean of both; differences 0.005 and 0.015.
    self.assertAlmostEqual(rows[0]['difference'], 1.0)
    self.assertAlmostEqual(rows[0]['half_width'],
                           12.706 * np.std([0.5, 1.5], ddof=1) / np.sqrt(2),
                           places=2)
    self.assertIn('| 2 | +1.00 ± ', reporting.paired_markdown(rows, 'ref'))

  def test_committed_overfitting_and_gate_balance_reports_are_recomputed(
      self):
    for name, cells in (('fmnist_overfitting', 2), ('gate_balance', 3)):
      directory = os.path.join(ROOT, 'results', name)
      paths = committed_runs(directory)
      self.assertLen(paths, 3 * cells)
      table = reporting.summarize([reporting.load_run(p) for p in paths])
      self.assertLen(table, cells)
      with open(os.path.join(directory, 'report.md')) as f:
        report = f.read()
      self.assertEqual(report, reporting.markdown_table(table), name)
      if name == 'fmnist_overfitting':
        with open(os.path.join(ROOT, 'docs', 'results.md')) as f:
          self.assertIn(report, f.read())
    # The client gap: trained client models on their own data minus the
    # global test accuracy, last 5 evaluated rounds, mean over seeds.
    overfitting = os.path.join(ROOT, 'results', 'fmnist_overfitting')
    table = reporting.summarize(
        [reporting.load_run(p) for p in committed_runs(overfitting)])
    for row in table:
      cell = 'gated' if row['config']['dynamic_pruning'] else 'dense'
      gaps = []
      for seed in range(3):
        rows = read_rows(os.path.join(overfitting, f'fedavg_{cell}_seed{seed}'))
        gaps.append(np.mean([float(r['local_train_accuracy'])
                             - float(r['test_accuracy']) for r in rows[-5:]]))
      self.assertAlmostEqual(row['client_test_gap'], np.mean(gaps))

  def test_seeds_are_averaged_with_their_spread(self):
    root = self.create_tempdir().full_path
    write_run(os.path.join(root, 'a'), 0, [0.5, 0.7], [100, 100])
    write_run(os.path.join(root, 'b'), 1, [0.6, 0.9], [100, 300])
    write_run(os.path.join(root, 'd'), 0, [0.5, 0.8], [1000, 1000],
              dynamic_pruning=False)
    table = reporting.summarize([reporting.load_run(os.path.join(root, d))
                                 for d in 'abd'])
    gated = [r for r in table if r['config']['dynamic_pruning']][0]
    self.assertEqual(gated['seeds'], [0, 1])
    self.assertAlmostEqual(gated['final_accuracy'], 0.8)
    self.assertAlmostEqual(gated['final_accuracy_std'], np.std([0.7, 0.9]))
    self.assertAlmostEqual(gated['upload_mb'], 0.0003)
    self.assertAlmostEqual(gated['upload_vs_dense'], 0.0003 / 0.002)

  def test_upload_to_target_pairs_each_run_with_its_dense_seed(self):
    root = self.create_tempdir().full_path
    # Dense seed 0: last-5 mean 0.8, target 0.76, reached in round 3 (3000 B).
    write_run(os.path.join(root, 'd0'), 0, [0.5, 0.7, 0.8, 0.8, 0.8, 0.8],
              [1000] * 6, dynamic_pruning=False)
    # Dense seed 1: last-5 mean 0.6, target 0.57, reached in round 2.
    write_run(os.path.join(root, 'd1'), 1, [0.5, 0.6, 0.6, 0.6, 0.6, 0.6],
              [1000] * 6, dynamic_pruning=False)
    write_run(os.path.join(root, 'g0'), 0, [0.5, 0.77, 0.7, 0.7, 0.7, 0.7],
              [100, 200, 300, 300, 300, 300])
    write_run(os.path.join(root, 'g1'), 1, [0.5, 0.5, 0.5, 0.5, 0.5, 0.56],
              [100] * 6)
    runs = [reporting.load_run(os.path.join(root, d))
            for d in ('d0', 'd1', 'g0', 'g1')]
    self.assertEqual(runs[2].upload_to_target(0.76), (2, 300))
    self.assertIsNone(runs[3].upload_to_target(0.57))
    table = reporting.summarize(runs)
    gated = [r for r in table if r['config']['dynamic_pruning']][0]
    dense = [r for r in table if not r['config']['dynamic_pruning']][0]
    self.assertEqual(gated['target_reached'], 1)
    self.assertAlmostEqual(gated['upload_to_target_mb'], 300 / 1e6)
    self.assertAlmostEqual(gated['upload_to_target_vs_dense'], 300 / 3000)
    self.assertEqual(dense['target_reached'], 2)
    self.assertAlmostEqual(dense['upload_to_target_vs_dense'], 1.0)
    self.assertAlmostEqual(gated['last5_accuracy'], np.mean(
        [np.mean([0.77, 0.7, 0.7, 0.7, 0.7]), np.mean([0.5] * 4 + [0.56])]))
    self.assertIn('| 1/2 |', reporting.markdown_table(table))
    # A fixed target replaces the per-seed one; nobody reaching it is 'never'.
    fixed = reporting.summarize(runs, target_accuracy=0.99)
    self.assertIn('| never |', reporting.markdown_table(fixed))
    # Without a dense run there is no default target.
    alone = reporting.summarize(runs[2:])
    self.assertEqual(alone[0]['target_runs'], 0)
    self.assertIn('| n/a | nan | n/a |', reporting.markdown_table(alone))

  def test_plots_are_png_images(self):
    out = self.create_tempdir().full_path
    runs = [reporting.load_run(p) for p in committed_runs()]
    paths = reporting.plot_runs(runs, out)
    self.assertEqual(
        [os.path.basename(p) for p in paths],
        ['accuracy_vs_round.png', 'accuracy_vs_upload.png',
         'density_vs_round.png', 'flops_vs_round.png',
         'gate_jaccard_vs_round.png'])
    for path in paths:
      with open(path, 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
      self.assertGreater(os.path.getsize(path), 10_000)

  def test_one_seed_twice_is_an_error(self):
    root = self.create_tempdir().full_path
    for name in ('a', 'b'):
      write_run(os.path.join(root, name), 0, [0.5, 0.6], [10, 10])
    with self.assertRaisesRegex(ValueError, 'same configuration and seed 0'):
      reporting.summarize([reporting.load_run(os.path.join(root, n))
                           for n in ('a', 'b')])

  def test_labels_name_what_differs(self):
    root = self.create_tempdir().full_path
    for name, dataset in (('a', 'digits'), ('b', 'fashion_mnist')):
      write_run(os.path.join(root, name), 0, [0.5, 0.6], [10, 10])
      path = os.path.join(root, name, 'config.json')
      with open(path) as f:
        config = json.load(f)
      with open(path, 'w') as f:
        json.dump(dict(config, dataset=dataset), f)
    table = reporting.summarize([reporting.load_run(os.path.join(root, n))
                                 for n in ('a', 'b')])
    self.assertEqual(
        [r['label'] for r in table],
        ['fedavg gated keep 0.7 dataset=digits',
         'fedavg gated keep 0.7 dataset=fashion_mnist'])

  def test_upload_vs_dense_over_the_rounds_both_completed(self):
    root = self.create_tempdir().full_path
    write_run(os.path.join(root, 'gated'), 0, [0.5, 0.6], [10, 10])
    write_run(os.path.join(root, 'dense'), 0, [0.5, 0.6, 0.7, 0.8],
              [40, 40, 40, 40], dynamic_pruning=False)
    table = reporting.summarize([reporting.load_run(os.path.join(root, n))
                                 for n in ('gated', 'dense')])
    gated = [r for r in table if r['config']['dynamic_pruning']][0]
    self.assertAlmostEqual(gated['upload_vs_dense'], 0.25)

  def test_malformed_metrics(self):
    root = self.create_tempdir().full_path
    write_run(os.path.join(root, 'r'), 0, [0.5, 'high'], [10, 10])
    with self.assertRaisesRegex(ValueError,
                                "line 3: test_accuracy='high' is not a number"):
      reporting.load_run(os.path.join(root, 'r'))

  def test_not_a_run_directory(self):
    with self.assertRaisesRegex(ValueError, 'not a run directory'):
      reporting.load_run(self.create_tempdir().full_path)


if __name__ == '__main__':
  absltest.main()

"""End-to-end tests of `python -m experiments.grid` in a subprocess."""

import csv
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import pytest

from tests import testing

ROOT = testing.ROOT
QUICKSTART = testing.QUICKSTART
ARGS = (f'--flagfile={QUICKSTART}', '--total_rounds=2', '--local_epochs=1',
        '--algorithms=fedavg', '--pruning=on,off', '--seeds=0')
CELLS = ('fedavg_gated_seed0', 'fedavg_dense_seed0')

# End-to-end: subprocesses, real rounds (`uv run pytest -m 'not slow'` skips).
pytestmark = pytest.mark.slow


def grid_command(root):
  return [sys.executable, '-m', 'experiments.grid', *ARGS,
          f'--root_output_dir={root}']


def run_grid(root, *extra):
  return testing.run_module(
      'experiments.grid', *ARGS, f'--root_output_dir={root}', *extra)


def rows(root, cell):
  path = os.path.join(root, 'quickstart', cell, 'metrics.csv')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [{k: v for k, v in r.items() if k != 'round_seconds'}
            for r in csv.DictReader(f)]


class GridTest(absltest.TestCase):

  def test_sigkill_then_rerun_completes_the_grid_as_uninterrupted(self):
    out_dir = self.create_tempdir().full_path
    straight = os.path.join(out_dir, 'straight')
    result = run_grid(straight)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    with open(os.path.join(straight, 'quickstart', 'report.md')) as f:
      report = f.read()
    self.assertIn('| fedavg dense | 1 |', report)
    self.assertIn('| fedavg gated keep 0.7 | 1 |', report)
    self.assertTrue(os.path.exists(
        os.path.join(straight, 'quickstart', 'plots', 'accuracy_vs_round.png')))

    killed = os.path.join(out_dir, 'killed')
    process = subprocess.Popen(
        grid_command(killed), cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
      if rows(killed, CELLS[1]):
        break
      time.sleep(0.05)
    self.assertIsNone(process.poll(), 'the grid ended before it was killed')
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    self.assertLess(len(rows(killed, CELLS[1])), 2)

    rerun = run_grid(killed)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-2000:])
    self.assertIn(f'[1/2] {CELLS[0]}: finished, skipped', rerun.stdout)
    self.assertIn(f'[2/2] {CELLS[1]}: running', rerun.stdout)
    for cell in CELLS:
      self.assertLen(rows(killed, cell), 2)
      self.assertEqual(rows(killed, cell), rows(straight, cell), cell)

    again = run_grid(killed)
    self.assertEqual(again.returncode, 0)
    self.assertEqual(again.stdout.count('finished, skipped'), 2)

  def test_bad_grid_flags_are_one_line_errors(self):
    out_dir = self.create_tempdir().full_path
    result = run_grid(out_dir, '--pruning=maybe')
    self.assertEqual(result.returncode, 2)
    self.assertIn('error: --pruning takes on and/or off', result.stderr)
    self.assertEqual(os.listdir(out_dir), [])


if __name__ == '__main__':
  absltest.main()

"""Tests of a run directory's safety: what it refuses and what it cleans."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

from tff_fedprune.runtime import worker_process
from tff_fedprune.simulation import run_directory


def dead_pid():
  return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                            capture_output=True, text=True, check=True).stdout)


class RunDirectoryTest(absltest.TestCase):

  def test_a_symlinked_run_directory_is_refused_and_its_target_untouched(self):
    root = self.create_tempdir().full_path
    target = self.create_tempdir().full_path
    os.symlink(target, os.path.join(root, 'run'))
    with self.assertRaisesRegex(run_directory.RunDirectoryError,
                                'symbolic link'):
      run_directory.prepare(root, os.path.join(root, 'run'))
    self.assertEqual(os.listdir(target), [])

  def test_a_symlinked_lock_is_refused_and_its_target_untouched(self):
    run_dir = self.create_tempdir().full_path
    victim = self.create_tempfile(content='keep').full_path
    os.symlink(victim, os.path.join(run_dir, 'lock'))
    with self.assertRaisesRegex(run_directory.RunDirectoryError,
                                'symbolic link'):
      with run_directory.exclusive_writer(run_dir):
        pass
    with open(victim) as f:
      self.assertEqual(f.read(), 'keep')

  def test_stale_temporaries_are_removed(self):
    run_dir = self.create_tempdir().full_path
    kept = ['metrics.csv', 'config.json', 'model/model.keras',
            'checkpoints/program_state_1/x']
    stale = ['summary.json.tmp123', 'config.json.tmp9', 'metrics.csv_temp4242',
             'model/.tmp77-model.keras', 'model/preprocessing.json.tmp77',
             'checkpoints/program_state_2_temp1/x']
    for name in kept + stale:
      os.makedirs(os.path.dirname(os.path.join(run_dir, name)), exist_ok=True)
      with open(os.path.join(run_dir, name), 'w') as f:
        f.write('x')
    run_directory.remove_stale_temporaries(run_dir)
    left = sorted(os.path.relpath(os.path.join(b, n), run_dir)
                  for b, _, names in os.walk(run_dir) for n in names)
    self.assertEqual(left, sorted(kept))

  def test_dead_workers_socket_directories_are_removed(self):
    dead = tempfile.mkdtemp(prefix=f'tff_fedprune_worker_{dead_pid()}_')
    alive = tempfile.mkdtemp(prefix=f'tff_fedprune_worker_{os.getpid()}_')
    try:
      worker_process.remove_dead_socket_directories()
      self.assertFalse(os.path.exists(dead))
      self.assertTrue(os.path.exists(alive))
    finally:
      os.rmdir(alive)


if __name__ == '__main__':
  absltest.main()

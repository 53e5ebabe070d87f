"""Tests of `python -m experiments.cifar`: end to end in subprocesses; error
cases through the same parsing and `run` in this process."""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
from absl.testing import absltest
import pytest

from experiments import cifar
from tests import testing
from tff_fedprune import runtime

ROOT = testing.ROOT
QUICKSTART = testing.QUICKSTART

# End-to-end: subprocesses, real rounds (`uv run pytest -m 'not slow'` skips).
pytestmark = pytest.mark.slow


def run_cli(*args, timeout=600):
  return testing.run_module('experiments.cifar', *args, timeout=timeout)


def run_in_process(argv):
  """(exit code, stderr) of `experiments.cifar`'s parsing and run of argv."""
  values = flags.FlagValues()
  cifar.define_flags(values)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      cifar.parse_flags_or_exit(['cifar', *argv], values)
      returncode = cifar.run(cifar.config_from_flags(values))
    except SystemExit as e:
      returncode = e.code
  return returncode, stderr.getvalue()


class CliTest(absltest.TestCase):

  def test_quickstart_through_a_pipe_leaves_no_worker(self):
    before = testing.worker_pids()
    out_dir = self.create_tempdir().full_path
    command = (f'{sys.executable} -m experiments.cifar --flagfile={QUICKSTART}'
               f' --total_rounds=2 --root_output_dir={out_dir} 2>&1 | tail -n 3')
    # Without an owned worker, `| tail` would wait for the orphan forever.
    result = subprocess.run(['bash', '-c', command], cwd=ROOT, timeout=600,
                            capture_output=True, text=True)
    self.assertIn('outputs:', result.stdout)
    run_dir = os.path.join(out_dir, 'quickstart')
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
      self.assertLen(list(csv.DictReader(f)), 2)
    with open(os.path.join(run_dir, 'summary.json')) as f:
      self.assertEqual(json.load(f)['rounds_completed'], 2)
    leaked = testing.worker_pids() - before
    self.assertFalse([p for p in leaked if testing.is_alive(p)])

  def test_bad_flags_fail_in_one_line_and_write_nothing(self):
    out_dir = self.create_tempdir().full_path
    a_file = self.create_tempfile().full_path
    # The command line itself for one case that loads TensorFlow first (its
    # start-up lines must not precede the error); the others through the
    # same parsing and `run` in this process, without an interpreter and
    # TensorFlow start-up each.
    in_subprocess = '--data_dir=/no/such/dir'
    cases = [
        (['--clients_per_round=20', '--num_clients=10'], 'exceeds'),
        (['--dataset=cifar10', '--data_dir=/no/such/dir'],
         'no cifar10 data found at /no/such/dir'),
        (['--model=alexnet'], 'alexnet'),
        (['--total_rounds=many'], 'many'),
        (['--seed=-1'], '--seed must be in'),
        (['--upload_bits=7'], '--upload_bits must be one of'),
        (['--upload_rotation=hadamard'], 'rotates quantised values'),
        (['--upload_bits=1', '--algorithm=scaffold'],
         "scaffold's control variates are not quantised"),
        (['--error_feedback', '--algorithm=fednova'],
         '--error_feedback serves fedavg and fedprox'),
        (['--seed=99999999999999'], '--seed must be in'),
        (['--server_learning_rate=inf'], 'must be finite'),
        (['--experiment_name=..'], 'inside --root_output_dir'),
        ([f'--root_output_dir={a_file}/runs'], f'cannot create {a_file}'),
    ]
    for args, message in cases:
      argv = [f'--flagfile={QUICKSTART}', f'--root_output_dir={out_dir}',
              *args]
      if in_subprocess in args:
        result = run_cli(*argv)
        returncode, stderr = result.returncode, result.stderr
      else:
        returncode, stderr = run_in_process(argv)
      self.assertEqual(returncode, 2, args)
      # One line, with no TensorFlow start-up noise before it.
      self.assertEqual(stderr.splitlines()[:1], [
          l for l in stderr.splitlines() if l.startswith('error:')], stderr)
      self.assertIn(message, stderr)
      self.assertEqual(os.listdir(out_dir), [], args)

  def test_a_second_run_on_the_same_directory_is_refused(self):
    out_dir = self.create_tempdir().full_path
    args = [f'--flagfile={QUICKSTART}', '--total_rounds=5', '--local_epochs=1',
            f'--root_output_dir={out_dir}']
    first = subprocess.Popen(
        [sys.executable, '-m', 'experiments.cifar', *args], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    lock = os.path.join(out_dir, 'quickstart', 'lock')
    try:
      deadline = time.monotonic() + 300
      while time.monotonic() < deadline and not (
          os.path.exists(lock) and open(lock).read().strip()):
        time.sleep(0.2)
      second = run_cli(*args)
      self.assertEqual(second.returncode, 2, second.stderr)
      errors = [l for l in second.stderr.splitlines()
                if l.startswith('error:')]
      self.assertLen(errors, 1, second.stderr)
      self.assertIn(f'another run (pid {first.pid})', errors[0])
      self.assertEqual(first.wait(timeout=600), 0)
    finally:
      first.kill()
    with open(os.path.join(out_dir, 'quickstart', 'metrics.csv')) as f:
      self.assertEqual([r['round'] for r in csv.DictReader(f)],
                       ['1', '2', '3', '4', '5'])

  def test_sigkill_then_rerun_reproduces_an_uninterrupted_run(self):
    out_dir = self.create_tempdir().full_path
    args = [f'--flagfile={QUICKSTART}', '--total_rounds=4', '--local_epochs=1']

    def rows(root):
      with open(os.path.join(root, 'quickstart', 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k != 'round_seconds'}
                for r in csv.DictReader(f)]

    straight = os.path.join(out_dir, 'straight')
    self.assertEqual(run_cli(*args, f'--root_output_dir={straight}')
                     .returncode, 0)
    killed = os.path.join(out_dir, 'killed')
    process = subprocess.Popen(
        [sys.executable, '-m', 'experiments.cifar', *args,
         f'--root_output_dir={killed}'],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    metrics = os.path.join(killed, 'quickstart', 'metrics.csv')
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
      if os.path.exists(metrics) and len(rows(killed)) >= 2:
        break
      time.sleep(0.05)
    self.assertIsNone(process.poll(), 'the run ended before it was killed')
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    self.assertLess(len(rows(killed)), 4)
    saved = [int(d.rsplit('_', 1)[1]) for d in os.listdir(
        os.path.join(killed, 'quickstart', 'checkpoints'))
             if d.startswith('program_state_')
             and d.rsplit('_', 1)[1].isdigit()]
    self.assertNotEmpty(saved)
    rerun = run_cli(*args, f'--root_output_dir={killed}')
    self.assertEqual(rerun.returncode, 0)
    # The rerun resumed after the last checkpoint instead of starting over.
    self.assertIn(f'| {max(saved)}/4 [', rerun.stderr)
    self.assertEqual(rows(killed), rows(straight))

  def test_worker_dying_mid_run_is_named_and_the_run_resumes(self):
    out_dir = self.create_tempdir().full_path
    args = [f'--flagfile={QUICKSTART}', '--total_rounds=8',
            '--local_epochs=1', f'--root_output_dir={out_dir}']
    metrics = os.path.join(out_dir, 'quickstart', 'metrics.csv')
    with runtime.OwnedWorker() as alive, runtime.OwnedWorker() as doomed:
      process = subprocess.Popen(
          [sys.executable, '-m', 'experiments.cifar', *args,
           f'--workers={alive.address},{doomed.address}'],
          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          stdin=subprocess.DEVNULL, text=True)
      deadline = time.monotonic() + 300
      while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(metrics):
          with open(metrics) as f:
            if len(list(csv.DictReader(f))) >= 1:
              break
        time.sleep(0.05)
      os.kill(doomed.pid, signal.SIGKILL)
      _, stderr = process.communicate(timeout=120)
      self.assertEqual(process.returncode, 3, stderr)
      errors = [l for l in stderr.splitlines() if l.startswith('error:')]
      self.assertLen(errors, 1, stderr)
      self.assertIn(f'TFF worker at {doomed.address} stopped answering',
                    errors[0])
      with open(metrics) as f:
        done = len(list(csv.DictReader(f)))
      self.assertLess(done, 8)
      rerun = run_cli(*args, f'--workers={alive.address}')
      self.assertEqual(rerun.returncode, 0, rerun.stderr)
      with open(metrics) as f:
        self.assertEqual([r['round'] for r in csv.DictReader(f)],
                         [str(r) for r in range(1, 9)])

  def test_unknown_flag_in_flagfile(self):
    flagfile = self.create_tempfile(content='--no_such_flag=3\n').full_path
    returncode, stderr = run_in_process([f'--flagfile={flagfile}'])
    self.assertEqual(returncode, 2)
    self.assertIn('no_such_flag', stderr)


if __name__ == '__main__':
  absltest.main()

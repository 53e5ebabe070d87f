"""Every command-line program, given bad input, fails in one `error:` line.

One table of (program, arguments, set-up) cases run as real subprocesses in
the user's environment (no log-level variable), each in a scratch directory
that is also HOME: the exit code is 2 (or the program's documented code),
stderr is exactly one line starting with `error:`, and nothing on disk
changed. Read-only directories come from a read-only bind mount and a full
disk from RLIMIT_FSIZE: tests here run as root, so permissions prove
nothing.
"""

import concurrent.futures
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

from absl.testing import absltest
import pytest

import keras_models
from tests import data_sources_test
from tests import testing

ROOT = testing.ROOT
pytestmark = pytest.mark.slow


def tree(directory):
  """{relative path: (kind, size, content of links)} of everything below."""
  out = {}
  for base, dirs, names in os.walk(directory):
    if base == directory and '.keras' in dirs:
      dirs.remove('.keras')  # Keras' own settings, made by every import.
    for name in dirs + names:
      path = os.path.join(base, name)
      info = os.lstat(path)
      link = os.readlink(path) if os.path.islink(path) else None
      content = None
      if os.path.isfile(path) and not link and info.st_size < 4096:
        with open(path, 'rb') as f:
          content = f.read()
      out[os.path.relpath(path, directory)] = (info.st_mode, info.st_uid,
                                                info.st_size, link, content)
  return out


def run_program(module, args, home, preexec=None, wrap=()):
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'XDG_STATE_HOME')}
  env['HOME'] = home
  env['PYTHONPATH'] = ROOT
  return subprocess.run(
      [*wrap, sys.executable, '-m', module, *args], cwd=home,
      capture_output=True, timeout=600, stdin=subprocess.DEVNULL, env=env,
      preexec_fn=preexec)


def full_disk():
  """preexec_fn: files may grow to 512 bytes; writing past it fails."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))


class OneErrorLineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.shared = os.path.join(absltest.get_default_test_tmpdir(), 'cli_shared')
    shutil.rmtree(cls.shared, ignore_errors=True)
    os.makedirs(cls.shared)
    cls.certs = testing.make_certificates(os.path.join(cls.shared, 'certs'))
    cls.model_dir = os.path.join(cls.shared, 'model')
    os.makedirs(cls.model_dir)
    keras_models.build_model('cnn', (8, 8, 1), 10).save(
        os.path.join(cls.model_dir, 'model.keras'))
    with open(os.path.join(cls.model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'mean': [7.0], 'std': [0.0]}, f)

  def scratch(self):
    home = self.create_tempdir().full_path
    os.makedirs(os.path.join(home, 'runs', 'quickstart'), mode=0o700)
    return home

  def cases(self):
    """(name, module, args, set-up(home) or None, exit code)."""
    garbage = os.path.join(self.shared, 'garbage.pem')
    with open(garbage, 'w') as f:
      f.write('-----BEGIN CERTIFICATE-----\nnot base64\n')
    quick = [f'--flagfile={testing.QUICKSTART}', '--root_output_dir=runs']

    def write(relative, content, mode='w'):
      def setup(home):
        path = os.path.join(home, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, mode) as f:
          f.write(content)
      return setup

    def symlink(target, relative):
      def setup(home):
        os.makedirs(os.path.join(home, 'elsewhere'), exist_ok=True)
        shutil.rmtree(os.path.join(home, relative), ignore_errors=True)
        os.symlink(os.path.join(home, target), os.path.join(home, relative))
      return setup

    def bad_fashion_mnist(home):
      os.makedirs(home + '/fm')
      data_sources_test.write_fashion_mnist(home + '/fm', num_train=200)
      with open(home + '/fm/train-images-idx3-ubyte.gz', 'r+b') as f:
        f.seek(200)
        f.write(bytes(64))

    cert = self.certs
    tls = [f'--tls_cert={cert["worker"]}', f'--tls_key={cert["worker_key"]}',
           f'--tls_client_ca={cert["ca"]}']
    model = [f'--model_dir={self.model_dir}']
    return [
        ('cifar positional', 'experiments.cifar', [*quick, 'extra'], None, 2),
        ('cifar unknown flag', 'experiments.cifar', [*quick, '--nosuch'],
         None, 2),
        ('cifar huge integer', 'experiments.cifar',
         [*quick, '--batch_size=99999999999999999999'], None, 2),
        ('cifar missing flagfile', 'experiments.cifar',
         ['--flagfile=/no/such.cfg'], None, 2),
        ('cifar flagfile not UTF-8', 'experiments.cifar',
         ['--flagfile=bad.cfg'], write('bad.cfg', b'--seed=1\xff\n', 'wb'), 2),
        ('cifar flag not UTF-8', 'experiments.cifar',
         [*quick, b'--experiment_name=x\xff'], None, 2),
        ('cifar config.json malformed', 'experiments.cifar', quick,
         write('runs/quickstart/config.json', '{'), 2),
        ('cifar config.json not an object', 'experiments.cifar', quick,
         write('runs/quickstart/config.json', '[1]'), 2),
        ('cifar run directory a symlink', 'experiments.cifar', quick,
         symlink('elsewhere', 'runs/quickstart'), 2),
        ('cifar lock a symlink', 'experiments.cifar', quick,
         lambda h: (write('victim', 'keep')(h),
                    os.symlink(h + '/victim', h + '/runs/quickstart/lock')), 2),
        ('cifar root of another user', 'experiments.cifar', quick,
         lambda h: os.chown(h + '/runs', 12345, 12345), 2),
        ('cifar root writable by others', 'experiments.cifar', quick,
         lambda h: os.chmod(h + '/runs', 0o777), 2),
        ('cifar damaged gzip', 'experiments.cifar',
         [*quick, '--dataset=fashion_mnist', '--data_dir=fm'],
         bad_fashion_mnist, 2),
        ('cifar garbage PEM', 'experiments.cifar',
         [*quick, '--workers=localhost:1', f'--worker_ca_cert={garbage}',
          f'--worker_client_cert={garbage}', f'--worker_client_key={garbage}'],
         None, 2),
        ('cifar negative noise multiplier', 'experiments.cifar',
         [*quick, '--upload_support=server', '--dp_noise_multiplier=-1',
          '--dp_clip=1'], None, 2),
        ('cifar negative clip', 'experiments.cifar',
         [*quick, '--upload_support=server', '--dp_noise_multiplier=1',
          '--dp_clip=-1'], None, 2),
        ('cifar DP with scaffold', 'experiments.cifar',
         [*quick, '--upload_support=server', '--dp_noise_multiplier=1',
          '--dp_clip=1', '--algorithm=scaffold'], None, 2),
        ('cifar DP on client-chosen masks', 'experiments.cifar',
         [*quick, '--dp_noise_multiplier=1', '--dp_clip=1'], None, 2),
        ('cifar server support without gating', 'experiments.cifar',
         [*quick, '--nodynamic_pruning', '--upload_support=server'], None, 2),
        ('grid escapes the root', 'experiments.grid',
         [*quick, '--experiment_name=../x'], None, 2),
        ('grid absolute name', 'experiments.grid',
         [*quick, '--experiment_name=/tmp/x'], None, 2),
        ('grid unknown algorithm', 'experiments.grid',
         [*quick, '--algorithms=fedavg,nosuch'], None, 2),
        ('grid empty list', 'experiments.grid', [*quick, '--algorithms='],
         None, 2),
        ('grid bad seed', 'experiments.grid', [*quick, '--seeds=a'], None, 2),
        ('report no run', 'experiments.report', [], None, 2),
        ('report missing run', 'experiments.report', ['nowhere'], None, 2),
        ('report malformed csv', 'experiments.report', ['r'],
         lambda h: (write('r/config.json', '{}')(h),
                    write('r/metrics.csv', 'round,test_accuracy,upload_bytes\n'
                          '1,high,3\n')(h)), 2),
        ('report csv without columns', 'experiments.report', ['r'],
         lambda h: (write('r/config.json', '{}')(h),
                    write('r/metrics.csv', 'a,b\n1,2\n')(h)), 2),
        ('report config not JSON', 'experiments.report', ['r'],
         lambda h: (write('r/config.json', '{')(h),
                    write('r/metrics.csv', 'round\n1\n')(h)), 2),
        ('report bad target', 'experiments.report',
         ['--target_accuracy=2', 'r'], None, 2),
        ('export no model_dir', 'experiments.export_tflite',
         ['--output=m.tflite'], None, 2),
        ('export one file twice', 'experiments.export_tflite',
         [*model, '--output=m.tflite', '--dense_output=./m.tflite'], None, 2),
        ('export into a directory', 'experiments.export_tflite',
         [*model, '--output=m.tflite', '--dense_output=runs'], None, 2),
        ('export positional', 'experiments.export_tflite',
         [*model, '--output=m.tflite', 'extra'], None, 2),
        ('export std 0', 'experiments.export_tflite',
         [*model, '--output=m.tflite'], None, 1),
        ('certificates over a CA key', 'experiments.make_certificates',
         ['--out_dir=c'], write('c/ca.key', 'secret'), 2),
        ('certificates bad name', 'experiments.make_certificates',
         ['--out_dir=c', '--worker_names=FOO:x'], None, 2),
        ('certificates bad host', 'experiments.make_certificates',
         ['--out_dir=c', '--worker_hosts=a b'], None, 2),
        ('certificates days', 'experiments.make_certificates',
         ['--out_dir=c', '--days=0'], None, 2),
        ('certificates no out_dir', 'experiments.make_certificates', [], None,
         2),
        ('worker port', 'tff_fedprune.worker', ['--port=0', *tls], None, 2),
        ('worker huge port', 'tff_fedprune.worker',
         ['--port=99999999999999999999', *tls], None, 2),
        ('worker no TLS', 'tff_fedprune.worker', ['--port=1'], None, 2),
        ('worker garbage PEM', 'tff_fedprune.worker',
         ['--port=1', f'--tls_cert={garbage}', f'--tls_key={garbage}',
          f'--tls_client_ca={garbage}'], None, 2),
        ('worker positional', 'tff_fedprune.worker', [*tls, 'extra'], None,
         2),
    ]

  def check(self, result, expected_code, name):
    stderr = result.stderr.decode(errors='replace')
    self.assertEqual(result.returncode, expected_code, f'{name}: {stderr}')
    lines = stderr.splitlines()
    self.assertLen(lines, 1, f'{name}: {stderr}')
    self.assertTrue(lines[0].startswith('error: '), f'{name}: {stderr}')

  def test_every_entry_point_refuses_bad_input_in_one_line(self):
    cases = self.cases()
    homes = {}
    for name, _, _, setup, _ in cases:
      homes[name] = self.scratch()
      if setup:
        setup(homes[name])
    before = {name: tree(home) for name, home in homes.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      results = dict(zip(
          [c[0] for c in cases],
          pool.map(lambda c: run_program(c[1], c[2], homes[c[0]]), cases)))
    for name, _, _, _, code in cases:
      with self.subTest(name):
        self.check(results[name], code, name)
        self.assertEqual(tree(homes[name]), before[name], name)

  def test_a_read_only_run_directory(self):
    if not shutil.which('unshare'):
      self.skipTest('needs unshare(1)')
    home = self.scratch()
    run_dir = os.path.join(home, 'runs', 'quickstart')
    before = tree(home)
    result = run_program(
        'experiments.cifar',
        [f'--flagfile={testing.QUICKSTART}', '--root_output_dir=runs'], home,
        wrap=('unshare', '-m', 'sh', '-c',
              f'mount --bind -o ro {run_dir} {run_dir} && exec "$@"', 'sh'))
    self.check(result, 2, 'read-only')
    self.assertIn('Read-only file system', result.stderr.decode())
    self.assertEqual(tree(home), before)

  def test_a_full_disk(self):
    # config.json (about 1 KB) is the first file that does not fit.
    home = self.scratch()
    result = run_program(
        'experiments.cifar',
        [f'--flagfile={testing.QUICKSTART}', '--root_output_dir=runs',
         '--total_rounds=1'], home, preexec=full_disk)
    self.check(result, 2, 'full disk')
    self.assertIn('File too large', result.stderr.decode())


if __name__ == '__main__':
  absltest.main()

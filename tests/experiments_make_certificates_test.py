"""Tests of `experiments.make_certificates`: usages, no overwrite, no leftovers."""

import os
import subprocess
from unittest import mock

from absl.testing import absltest

from experiments import make_certificates


class MakeCertificatesTest(absltest.TestCase):

  def test_a_failing_openssl_leaves_nothing(self):
    out_dir = os.path.join(self.create_tempdir().full_path, 'certs')
    run, calls = subprocess.run, []

    def fail_fourth(*args, **kwargs):
      calls.append(args)
      if len(calls) == 4:
        raise subprocess.CalledProcessError(1, 'openssl', stderr=b'boom')
      return run(*args, **kwargs)

    with mock.patch.object(subprocess, 'run', fail_fourth):
      with self.assertRaises(subprocess.CalledProcessError):
        make_certificates.make(out_dir)
    self.assertEqual(os.listdir(out_dir), [])

  def test_one_certificate_per_worker_host(self):
    out_dir = self.create_tempdir().full_path
    paths = make_certificates.make(out_dir, worker_hosts=('hostA', '10.0.0.5'))
    self.assertEqual(sorted(paths), sorted([
        'ca', 'driver', 'driver_key', 'worker_hostA', 'worker_hostA_key',
        'worker_10.0.0.5', 'worker_10.0.0.5_key']))
    text = subprocess.run(
        ['openssl', 'x509', '-noout', '-ext', 'subjectAltName,extendedKeyUsage',
         '-in', paths['worker_10.0.0.5']],
        capture_output=True, text=True, check=True).stdout
    self.assertIn('IP Address:10.0.0.5', text)
    self.assertNotIn('hostA', text)
    self.assertIn('TLS Web Server Authentication', text)
    self.assertNotIn('Client', text)
    self.assertEqual(os.stat(paths['driver_key']).st_mode & 0o777, 0o600)

  def test_never_overwrites(self):
    out_dir = self.create_tempdir().full_path
    make_certificates.make(out_dir)
    with open(os.path.join(out_dir, 'ca.key'), 'rb') as f:
      key = f.read()
    with self.assertRaisesRegex(make_certificates.CertificateError,
                                'refusing to overwrite'):
      make_certificates.make(out_dir)
    with open(os.path.join(out_dir, 'ca.key'), 'rb') as f:
      self.assertEqual(f.read(), key)


if __name__ == '__main__':
  absltest.main()

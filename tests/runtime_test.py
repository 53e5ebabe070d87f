"""Tests that the owned TFF worker serves computations and never outlives us."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import grpc
import numpy as np
import pytest
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import runtime
from tff_fedprune.runtime import worker_process

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def federated_total(x):
  return tff.federated_sum(x)


class OwnedWorkerTest(absltest.TestCase):

  def test_serves_federated_computation_then_stops(self):
    with runtime.local_runtime() as worker:
      pid = worker.pid
      self.assertTrue(testing.is_alive(pid))

      self.assertEqual(federated_total([1.0, 2.0, 3.5]), 6.5)
    self.assertTrue(testing.wait_dead(pid))

  def test_dies_with_a_sigkilled_parent(self):
    script = textwrap.dedent("""
        import time
        from tff_fedprune import runtime
        worker = runtime.OwnedWorker().start()
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, '-c', script],
                              stdout=subprocess.PIPE, text=True)
    try:
      relay_pid = int(parent.stdout.readline())
      binaries = testing.children(relay_pid)
      self.assertLen(binaries, 1)
      for pid in (relay_pid, *binaries):
        self.assertTrue(testing.is_alive(pid))
      os.kill(parent.pid, signal.SIGKILL)
      parent.wait()
      for pid in (relay_pid, *binaries):
        self.assertTrue(testing.wait_dead(pid), f'{pid} outlived its parent')
    finally:
      parent.kill()
      parent.stdout.close()

  def test_local_worker_is_isolated_behind_an_owner_only_socket(self):
    before = testing.listening_tcp_sockets()
    with runtime.OwnedWorker() as worker:
      self.assertTrue(worker.isolated)
      self.assertTrue(worker.address.startswith('unix:'))
      path = worker.address[len('unix:'):]
      self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
      self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)
      pids = {worker.pid, *testing.children(worker.pid)}
      listeners = testing.listening_tcp_sockets()
      self.assertFalse(
          [l for l in listeners
           if any(f'pid={p},' in l[1] for p in pids)], listeners)
      self.assertEqual(set(listeners) - set(before), set())
      with tff.framework.get_context_stack().install(
          runtime.create_remote_context(worker.address)):
        self.assertEqual(federated_total([1.0, 2.0]), 3.0)
    self.assertFalse(os.path.exists(path))

  def test_without_user_namespaces_falls_back_with_one_warning(self):
    if not shutil.which('unshare'):
      self.skipTest('util-linux unshare is not installed')
    # A user namespace whose limit of nested user namespaces is 0: the
    # kernel refuses the worker's namespace as a hardened kernel would.
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow_federated as tff
        from tff_fedprune import runtime
        with runtime.local_runtime() as worker:
          @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
          def total(x):
            return tff.federated_sum(x)
          print(worker.address, worker.isolated, total([1.0, 2.0]))
    """)
    result = subprocess.run(
        ['unshare', '--user', '--map-root-user', 'sh', '-c',
         'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"',
         sys.executable, script],
        cwd=testing.ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode and 'max_user_namespaces' in result.stderr:
      self.skipTest(f'cannot limit user namespaces here: {result.stderr}')
    self.assertEqual(result.returncode, 0, result.stderr)
    address, isolated, total = result.stdout.split()
    port = address.rpartition(':')[2]
    self.assertEqual((address, isolated, total),
                     (f'localhost:{port}', 'False', '3.0'))
    warnings = [l for l in result.stderr.splitlines()
                if l.startswith('warning:')]
    self.assertLen(warnings, 1, result.stderr)
    self.assertIn(f'port {port}', warnings[0])
    self.assertIn('not isolated', warnings[0])

  def test_no_leaky_default_context_outside_the_runtime(self):
    @tff.tensorflow.computation(np.float32)
    def add_one(x):
      return x + 1.0

    before = testing.worker_pids()
    with self.assertRaisesRegex(RuntimeError, 'context'):
      add_one(1.0)
    self.assertEqual(testing.worker_pids() - before, set())

  def test_insecure_worker_module_serves_a_remote_context(self):
    port = worker_process._pick_free_port()
    worker = subprocess.Popen(
        [sys.executable, '-m', 'tff_fedprune.worker', f'--port={port}',
         '--insecure_plaintext_no_auth'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      runtime.wait_until_ready(f'localhost:{port}', timeout_s=60,
                               process=worker)
      with tff.framework.get_context_stack().install(
          runtime.create_remote_context(f'localhost:{port}')):

        self.assertEqual(federated_total([1.0, 2.0]), 3.0)
      # The module replaced itself with TFF's binary (signals reach it).
      self.assertEqual(os.readlink(f'/proc/{worker.pid}/exe'),
                       os.path.realpath(runtime.worker_binary_path()))
    finally:
      worker.terminate()
      worker.wait(timeout=15)

  def test_unreachable_address_is_a_clear_error(self):
    with self.assertRaisesRegex(runtime.WorkerError, 'localhost:1 did not'):
      runtime.wait_until_ready('localhost:1', timeout_s=1)

  def test_worker_module_needs_tls_or_the_insecure_flag(self):
    result = testing.run_module('tff_fedprune.worker', '--port=1',
                                timeout=120)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('--insecure_plaintext_no_auth', result.stderr)

  def test_stop_is_idempotent(self):
    worker = runtime.OwnedWorker().start()
    worker.stop()
    worker.stop()
    self.assertIsNone(worker.pid)



def read(path):
  with open(path, 'rb') as f:
    return f.read()


def legacy_driver_certificate(directory, certs):
  """(cert, key) signed by `certs`' CA without extended key usage, as
  experiments.make_certificates made them before it set one."""
  prefix = os.path.join(directory, 'legacy_driver')
  run = lambda *a: subprocess.run(['openssl', *a], check=True,
                                  capture_output=True)
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
      '-nodes', '-subj', '/CN=legacy', '-keyout', f'{prefix}.key', '-out',
      f'{prefix}.csr')
  run('x509', '-req', '-in', f'{prefix}.csr', '-CA', certs['ca'], '-CAkey',
      certs['ca'][:-len('.pem')] + '.key', '-CAcreateserial', '-days', '2',
      '-out', f'{prefix}.pem')
  return f'{prefix}.pem', f'{prefix}.key'


class MutualTlsWorkerTest(absltest.TestCase):
  """`python -m tff_fedprune.worker` behind mutual TLS, on loopback only."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._dir = tempfile.mkdtemp()
    cls.certs = testing.make_certificates(cls._dir)
    cls.other = testing.make_certificates(cls._dir, ca_name='other')
    cls.port = worker_process._pick_free_port()
    cls.worker = testing.start_tls_worker(cls.certs, cls.port)
    cls.address = f'localhost:{cls.port}'

  @classmethod
  def tearDownClass(cls):
    cls.worker.terminate()
    cls.worker.wait(timeout=15)
    cls.worker.stdout.close()
    shutil.rmtree(cls._dir)
    super().tearDownClass()

  def credentials(self, certs):
    return runtime.tls_credentials(certs['ca'], certs['driver'],
                                   certs['driver_key'])

  def test_serves_a_client_with_a_certificate_of_its_ca(self):
    with tff.framework.get_context_stack().install(
        runtime.create_remote_context(
            self.address, credentials=self.credentials(self.certs))):
      self.assertEqual(federated_total([1.0, 2.0]), 3.0)

  def test_refuses_plaintext(self):
    with self.assertRaises(runtime.WorkerError):
      runtime.wait_until_ready(self.address, timeout_s=3)

  def test_refuses_a_certificate_of_another_ca(self):
    # The driver trusts the worker's CA but its own certificate is signed by
    # another one, which the worker does not accept.
    foreign = runtime.tls_credentials(
        self.certs['ca'], self.other['driver'], self.other['driver_key'])
    with self.assertRaises(runtime.WorkerError):
      runtime.wait_until_ready(self.address, timeout_s=3,
                               credentials=foreign)

  def test_refuses_a_worker_certificate_from_a_driver(self):
    with self.assertRaisesRegex(runtime.WorkerError, 'lacks the clientAuth'):
      runtime.tls_credentials(self.certs['ca'], self.certs['worker'],
                              self.certs['worker_key'])
    # Presented anyway (gRPC's own credentials): the worker refuses it.
    posing = grpc.ssl_channel_credentials(
        read(self.certs['ca']), read(self.certs['worker_key']),
        read(self.certs['worker']))
    with self.assertRaises(runtime.WorkerError):
      runtime.wait_until_ready(self.address, timeout_s=3, credentials=posing)

  def test_refuses_a_certificate_without_extended_key_usage(self):
    legacy = legacy_driver_certificate(self._dir, self.certs)
    posing = grpc.ssl_channel_credentials(
        read(self.certs['ca']), read(legacy[1]), read(legacy[0]))
    with self.assertRaises(runtime.WorkerError):
      runtime.wait_until_ready(self.address, timeout_s=3, credentials=posing)

  def test_a_driver_refuses_a_driver_certificate_from_a_worker(self):
    port = worker_process._pick_free_port()
    posing = testing.start_tls_worker(
        dict(self.certs, worker=self.certs['driver'],
             worker_key=self.certs['driver_key']), port)
    try:
      context = runtime.tls_client_context(
          self.certs['ca'], self.certs['driver'], self.certs['driver_key'])
      with self.assertRaisesRegex(runtime.WorkerError,
                                  'does not accept|serverAuth'):
        runtime.check_worker_certificate(f'localhost:{port}', context, 5)
      runtime.check_worker_certificate(self.address, context, 5)
    finally:
      posing.terminate()
      posing.wait(timeout=15)
      posing.stdout.close()

  def test_only_the_tls_relay_listens_and_only_on_loopback(self):
    mine = [l for l in testing.listening_tcp_sockets()
            if l[0].endswith(f':{self.port}')]
    self.assertEqual([l[0] for l in mine], [f'127.0.0.1:{self.port}'])
    self.assertIn(f'pid={self.worker.pid},', mine[0][1])
    binaries = testing.children(self.worker.pid)
    self.assertLen(binaries, 1)
    self.assertFalse([l for l in testing.listening_tcp_sockets()
                      if f'pid={binaries[0]},' in l[1]])


if __name__ == '__main__':
  absltest.main()

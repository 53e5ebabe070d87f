"""Tests that the owned TFF worker serves computations and never outlives us."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest
import numpy as np
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import runtime
from tff_fedprune.runtime import worker_process


class OwnedWorkerTest(absltest.TestCase):

  def test_serves_federated_computation_then_stops(self):
    with runtime.local_runtime() as worker:
      pid = worker.pid
      self.assertTrue(testing.is_alive(pid))

      @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
      def total(x):
        return tff.federated_sum(x)

      self.assertEqual(total([1.0, 2.0, 3.5]), 6.5)
    self.assertTrue(testing.wait_dead(pid))

  def test_dies_with_a_sigkilled_parent(self):
    script = textwrap.dedent("""
        import sys, time
        from tff_fedprune import runtime
        worker = runtime.OwnedWorker().start()
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, '-c', script],
                              stdout=subprocess.PIPE, text=True)
    try:
      worker_pid = int(parent.stdout.readline())
      self.assertTrue(testing.is_alive(worker_pid))
      os.kill(parent.pid, signal.SIGKILL)
      parent.wait()
      self.assertTrue(testing.wait_dead(worker_pid),
                      'worker outlived its parent')
    finally:
      parent.kill()
      parent.stdout.close()

  def test_no_leaky_default_context_outside_the_runtime(self):
    @tff.tensorflow.computation(np.float32)
    def add_one(x):
      return x + 1.0

    before = testing.worker_pids()
    with self.assertRaisesRegex(RuntimeError, 'context'):
      add_one(1.0)
    self.assertEqual(testing.worker_pids() - before, set())

  def test_foreground_worker_module_serves_a_remote_context(self):
    port = worker_process._pick_free_port()
    worker = subprocess.Popen(
        [sys.executable, '-m', 'tff_fedprune.worker', f'--port={port}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      runtime.wait_until_ready(f'localhost:{port}', timeout_s=60,
                               process=worker)
      with tff.framework.get_context_stack().install(
          runtime.create_remote_context(f'localhost:{port}')):

        @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
        def total(x):
          return tff.federated_sum(x)

        self.assertEqual(total([1.0, 2.0]), 3.0)
      # The module replaced itself with TFF's binary (signals reach it).
      self.assertEqual(os.readlink(f'/proc/{worker.pid}/exe'),
                       os.path.realpath(runtime.worker_binary_path()))
    finally:
      worker.terminate()
      worker.wait(timeout=15)

  def test_unreachable_address_is_a_clear_error(self):
    with self.assertRaisesRegex(runtime.WorkerError, 'localhost:1 did not'):
      runtime.wait_until_ready('localhost:1', timeout_s=1)

  def test_stop_is_idempotent(self):
    worker = runtime.OwnedWorker().start()
    worker.stop()
    worker.stop()
    self.assertIsNone(worker.pid)


if __name__ == '__main__':
  absltest.main()

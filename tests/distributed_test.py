"""A federation split across two TFF workers on loopback."""

import collections
import contextlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import client_work
from tff_fedprune import learning_process
from tff_fedprune import runtime
from tff_fedprune.runtime import worker_process

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


class DistributedTest(parameterized.TestCase):

  @parameterized.parameters(('fedavg', False), ('scaffold', False),
                            ('fedavg', True))
  def test_two_workers_give_the_local_round_result(self, algorithm,
                                                    mutual_tls):
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    rng = np.random.default_rng(0)

    def client_state():
      # Non-zero control variates c_k, so the correction and its return
      # through the per-slot table are exercised.
      if algorithm != 'scaffold':
        return None
      return collections.OrderedDict(c_k=tuple(
          0.01 * rng.normal(size=w.shape).astype(np.float32)
          for w in weights.trainable))

    datasets = [
        client_work.client_data(d, 0.5, slot=i, client_state=client_state())
        for i, d in enumerate(testing.client_datasets(num_clients=4))]
    spec = testing.client_datasets()[0].element_spec

    # One process (traced once) runs in both contexts.
    process = learning_process.build_learning_process(
        fn, spec, client_learning_rate=0.1, client_momentum=0.9,
        algorithm=algorithm, num_clients=6, clients_per_round=4,
        initial_weights=weights)

    def one_round():
      output = process.next(process.initialize(), datasets)
      return (
          (process.get_model_weights(output.state), output.state.client_work),
          output.metrics,
      )

    with runtime.local_runtime():
      local_weights, local_metrics = one_round()
    with contextlib.ExitStack() as stack:
      if mutual_tls:
        # Workers as on other machines: python -m tff_fedprune.worker.
        certs = testing.make_certificates(stack.enter_context(
            tempfile.TemporaryDirectory()))
        credentials = runtime.tls_credentials(
            certs['ca'], certs['driver'], certs['driver_key'])
        addresses = []
        for _ in range(2):
          port = worker_process._pick_free_port()  # pylint: disable=protected-access
          worker = testing.start_tls_worker(certs, port)
          stack.callback(worker.wait)
          stack.callback(worker.stdout.close)
          stack.callback(worker.terminate)
          addresses.append(f'localhost:{port}')
      else:
        credentials = None
        addresses = [stack.enter_context(runtime.OwnedWorker()).address
                     for _ in range(2)]
      with tff.framework.get_context_stack().install(
          runtime.create_distributed_context(addresses, credentials)):
        remote_weights, remote_metrics = one_round()
    for x, y in zip(tf.nest.flatten(local_weights),
                    tf.nest.flatten(remote_weights)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    self.assertEqual(local_metrics['aggregator']['upload_bytes'],
                     remote_metrics['aggregator']['upload_bytes'])

  def test_bad_addresses(self):
    with self.assertRaisesRegex(ValueError, 'not host:port'):
      runtime.parse_addresses('localhost:80,nohost')
    self.assertEqual(runtime.parse_addresses('a:1, b:2'), ['a:1', 'b:2'])
    self.assertEqual(runtime.parse_addresses('unix:/tmp/w.sock,a:1'),
                     ['unix:/tmp/w.sock', 'a:1'])
    with self.assertRaisesRegex(ValueError, 'not unix:/abs/path'):
      runtime.parse_addresses('unix:w.sock')


if __name__ == '__main__':
  absltest.main()

"""Tests of SCAFFOLD: control variates against a local reference, state path."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import client_work
from tff_fedprune import learning_process
from tff_fedprune import local_training
from tff_fedprune.simulation import client_states

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


def build(fn, weights, momentum=0.0, num_clients=3, clients_per_round=2,
          lr=0.1):
  return learning_process.build_learning_process(
      fn, testing.client_datasets()[0].element_spec, client_learning_rate=lr,
      client_momentum=momentum, algorithm='scaffold', num_clients=num_clients,
      clients_per_round=clients_per_round, initial_weights=weights)


def table_for(process):
  data_type = process.next.type_signature.parameter[1].member
  return client_states.ClientStateTable(
      tff.types.type_to_tf_tensor_specs(data_type.client_state.element))


def run_round(process, state, table, datasets, ids):
  output = process.next(state, [
      client_work.client_data(d, 0.5, slot=slot, client_state=table.get(i))
      for slot, (d, i) in enumerate(zip(datasets, ids))])
  table.apply(ids, output.state.client_work[client_work.CLIENT_STATE_UPDATES])
  return output


class ScaffoldTest(testing.LocalRuntimeTestCase):


  @parameterized.parameters(0.0, 0.9)
  def test_two_rounds_match_local_reference(self, momentum):
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    lr, num_clients, ids = 0.1, 3, (0, 2)
    process = build(fn, weights, momentum, num_clients, lr=lr)
    table = table_for(process)
    datasets = testing.client_datasets(num_clients=2)
    c = [np.zeros_like(w) for w in weights.trainable]
    c_k = {i: [np.zeros_like(w) for w in weights.trainable] for i in ids}
    state, start = process.initialize(), weights
    for round_num in range(2):
      output = run_round(process, state, table, datasets, ids)
      deltas = {}
      for d, i in zip(datasets, ids):
        train = local_training.build_local_training(
            fn(), tff.learning.optimizers.build_sgdm(lr, momentum or None))
        correction = tuple(a - b for a, b in zip(c, c_k[i]))
        local = train(
            start, d, tf.data.Dataset.from_tensors(np.float32(0.5)),
            correction)
        delta, mask, steps = local.delta, local.mask, local.steps
        # Momentum steps j = 1..K move the weights by lr (1 - m^j) / (1 - m).
        a_k = sum((1 - momentum**j) / (1 - momentum)
                  for j in range(1, int(steps) + 1))
        deltas[i] = [m.numpy() * (x.numpy() / (a_k * lr) - cj)
                     for m, x, cj in zip(mask.trainable, delta.trainable, c)]
      c = [cj + (deltas[0][j] + deltas[2][j]) / num_clients
           for j, cj in enumerate(c)]
      for i in ids:
        c_k[i] = [a + b for a, b in zip(c_k[i], deltas[i])]
      server_c = output.state.client_work['c']
      for j in range(len(c)):
        np.testing.assert_allclose(server_c[j], c[j], atol=1e-4,
                                   err_msg=f'round {round_num + 1} c[{j}]')
        for i in ids:
          np.testing.assert_allclose(
              table.get(i)['c_k'][j], c_k[i][j], atol=1e-4,
              err_msg=f'round {round_num + 1} c_{i}[{j}]')
        np.testing.assert_array_equal(table.get(1)['c_k'][j], 0.0)
      self.assertTrue(any(np.any(x != 0) for x in c))
      self.assertGreater(
          output.metrics['client_work']['control_upload_bytes'], 0)
      state = output.state
      start = process.get_model_weights(state)

  def test_broadcast_does_not_grow_with_the_federation(self):
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    small, large = build(fn, weights, num_clients=3), build(
        fn, weights, num_clients=1000)
    self.assertEqual(small.next.type_signature, large.next.type_signature)
    size = lambda t: sum(
        int(np.prod(s.shape)) for s in tf.nest.flatten(
            tff.types.type_to_tf_tensor_specs(t)))
    client_work_state = small.initialize.type_signature.result.member[
        'client_work']
    model_size = sum(w.size for w in weights.trainable)
    # c, and the two-slot table of returned changes: O(model), not O(N).
    self.assertEqual(size(client_work_state), 3 * model_size)

  def test_table_round_trips_through_program_state(self):
    fn = testing.model_fn(gated=True)
    process = build(fn, testing.initial_weights(fn))
    table = table_for(process)
    run_round(process, process.initialize(), table,
              testing.client_datasets(num_clients=2), (2, 0))
    copy = table_for(process)
    copy.load_program_state(table.to_program_state())
    for i in range(3):
      tf.nest.map_structure(np.testing.assert_array_equal, table.get(i),
                            copy.get(i))


if __name__ == '__main__':
  absltest.main()

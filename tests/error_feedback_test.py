"""Tests of error feedback: residuals against a local reference, refusals."""

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import client_work
from tff_fedprune import encoding
from tff_fedprune import error_feedback
from tff_fedprune import learning_process
from tff_fedprune import local_training
from tff_fedprune import scaffold
from tff_fedprune.simulation import client_states

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow

LR, THRESHOLD, SEED = 0.1, 0.5, 7


def level_gap(kept, values):
  """Most a value can move between neighbouring levels of `values`."""
  if not kept.size:
    return 0.0
  if values.rounding == encoding.DETERMINISTIC:
    return 2 * np.abs(kept).max()
  return np.ptp(kept) / (2**values.bits - 1)


class ErrorFeedbackTest(testing.LocalRuntimeTestCase):

  def test_residual_is_what_the_upload_dropped(self):
    # Stochastic 8-bit rounding, and 1-bit scaled signs (deterministic).
    for values in (encoding.ValueFormat(8),
                   encoding.ValueFormat(1, encoding.DETERMINISTIC)):
      with self.subTest(values):
        self._check_residuals(values)

  def _check_residuals(self, values):
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    datasets = testing.client_datasets(num_clients=3)
    process = learning_process.build_learning_process(
        fn, datasets[0].element_spec, client_learning_rate=LR,
        salience_threshold=THRESHOLD, upload_values=values, error_feedback=True,
        clients_per_round=2, initial_weights=weights)
    data_type = process.next.type_signature.parameter[1].member
    table = client_states.ClientStateTable(
        tff.types.type_to_tf_tensor_specs(data_type.client_state.element))
    residual = {i: [np.zeros_like(w) for w in weights.trainable]
                for i in range(3)}
    state = process.initialize()
    steps = {}
    for round_num, ids in ((1, (0, 2)), (2, (0, 1))):
      start = process.get_model_weights(state)
      output = process.next(state, [
          client_work.client_data(
              datasets[i], 0.5, slot=slot, client_state=table.get(i),
              upload_seed=client_work.rounding_seed(SEED, round_num, i))
          for slot, i in enumerate(ids)])
      state = output.state
      table.apply(
          ids, state.client_work[client_work.CLIENT_STATE_UPDATES])
      for i in ids:
        train = local_training.build_local_training(
            fn(), tff.learning.optimizers.build_sgdm(LR),
            salience_threshold=THRESHOLD)
        local = train(
            start, datasets[i], tf.data.Dataset.from_tensors(np.float32(0.5)))
        delta, mask = local.delta, local.mask
        seeds = encoding.tensor_seeds(
            tf.constant(client_work.rounding_seed(SEED, round_num, i)),
            len(residual[i]))
        new = []
        for d, m, e, seed in zip(delta.trainable, mask.trainable,
                                 residual[i], seeds):
          corrected = d.numpy() + e
          codec = encoding.TensorCodec(corrected.shape, values)
          sent, _ = codec.decode(codec.encode(corrected * m, m, seed))
          new.append(corrected - sent.numpy())
          steps[(i, len(new) - 1)] = level_gap(corrected[m.numpy() > 0],
                                               values)
        residual[i] = new
      # Masking at tau 0.5 and rounding both leave something behind.
      self.assertTrue(any(np.abs(r).max() > 0 for r in residual[ids[0]]))
      # The reference trains eagerly: a value on a rounding boundary may round
      # the other way, to the next level.
      for i in range(3):
        for j, expected in enumerate(residual[i]):
          got = table.get(i)['residual'][j]
          np.testing.assert_allclose(
              got, expected, atol=1.01 * steps.get((i, j), 0.0) + 1e-5,
              err_msg=f'round {round_num} client {i} tensor {j}')
          self.assertLessEqual(
              np.mean(np.abs(got - expected) > 1e-5), 0.01)
    # The residual stays on the client: the upload counts the update only.
    self.assertNotIn('control_upload_bytes', output.metrics['client_work'])

  def test_refuses_algorithms_it_does_not_serve(self):
    with self.assertRaisesRegex(ValueError, 'serves fedavg and fedprox'):
      error_feedback.ErrorFeedback(scaffold.Scaffold(3, 0.1, 0.0))
    with self.assertRaisesRegex(ValueError, 'not fednova'):
      learning_process.build_learning_process(
          testing.model_fn(), testing.client_datasets()[0].element_spec,
          client_learning_rate=LR, algorithm='fednova', error_feedback=True,
          clients_per_round=2)


if __name__ == '__main__':
  absltest.main()

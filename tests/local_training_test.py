"""Tests of the FedDP local training: masked updates, salience masks."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import keras_models
from tff_fedprune import compact_training
from tff_fedprune import gated_conv
from tff_fedprune import local_training
from tff_fedprune import model_state
from tff_fedprune import salience


def batches(n=8, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def keep(ratio):
  return tf.data.Dataset.from_tensors(np.float32(ratio))


class LocalTrainingTest(parameterized.TestCase):

  def train(self, threshold=0.0, ratio=0.25, correction=False,
            gate_balance=0.0, **kwargs):
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model(
        'cnn', (8, 8, 1), 10,
        gate=gated_conv.GateSpec.from_flags(gate_balance=gate_balance))
    initial = tf.nest.map_structure(lambda v: v.numpy(),
                                    model_state.global_weights(model))
    optimizer = tff.learning.optimizers.build_sgdm(0.1, momentum=0.9)
    train = local_training.build_local_training(
        model, optimizer, salience_threshold=threshold, **kwargs)
    args = [initial, batches(), keep(ratio)]
    if correction:
      args.append(tuple(tf.random.normal(v.shape) for v in initial.trainable))
    local = train(*args)
    self.assertEqual(int(local.steps), 2)
    return model, local.delta, local.mask, int(local.num_examples)

  @parameterized.parameters(
      dict(weight_decay=5e-3), dict(prox_mu=0.5),
      dict(weight_decay=5e-3, prox_mu=0.5), dict(correction=True),
      dict(weight_decay=5e-3, gate_balance=1.0))
  def test_threshold_zero_masked_update_equals_true_update(self, **kwargs):
    _, delta, mask, n = self.train(**kwargs)
    self.assertEqual(n, 8)
    masked_out = 0
    for d, m in zip(tf.nest.flatten(delta), tf.nest.flatten(mask)):
      d, m = d.numpy(), m.numpy()
      np.testing.assert_array_equal(d * (1 - m), np.zeros_like(d))
      masked_out += int((m == 0).sum())
    self.assertGreater(masked_out, 0)  # Some channels were never kept.

  def test_gate_balance_loss_enters_the_objective(self):
    _, plain, _, _ = self.train(ratio=0.5)
    _, balanced, _, _ = self.train(ratio=0.5, gate_balance=1.0)
    names = [v.name for v in tf.nest.flatten(
        model_state.global_weights(keras_models.build_model(
            'cnn', (8, 8, 1), 10, gate=gated_conv.GateSpec())))]
    for name, a, b in zip(names, tf.nest.flatten(plain),
                          tf.nest.flatten(balanced)):
      if 'gate_bias' in name:
        self.assertFalse(np.allclose(a, b), name)

  def test_mask_is_channel_structured(self):
    model, _, mask, _ = self.train(weight_decay=5e-3)
    gated = gated_conv.gated_layers(model)
    weights = model_state.global_weights(model)
    masks = {v.name: m.numpy() for v, m in zip(
        tf.nest.flatten(weights), tf.nest.flatten(mask))}
    out1 = gated_conv.gated_layers(model)[0].kept_count.numpy() > 0
    out2 = gated[1].kept_count.numpy() > 0
    np.testing.assert_array_equal(masks['block1/gamma:0'], out1)
    np.testing.assert_array_equal(
        masks['block2/kernel:0'][1, 1], np.outer(out1, out2))
    self.assertTrue(np.all(masks['block2/gate_kernel:0'] == 1))
    out3 = gated[2].kept_count.numpy() > 0
    np.testing.assert_array_equal(  # The head's rows read block3's channels.
        masks['logits/kernel:0'], np.broadcast_to(out3[:, None], (64, 10)))
    self.assertTrue(np.all(masks['logits/bias:0'] == 1))

  def test_restricting_by_channel_vectors_equals_the_full_masks(self):
    model = keras_models.build_model(
        'cnn', (8, 8, 1), 10, gate=gated_conv.GateSpec())
    structure = salience.ChannelStructure(model)
    rng = np.random.default_rng(0)
    channels = [tf.constant((rng.random(l.filters) < 0.5).astype(np.float32))
                for l in gated_conv.gated_layers(model)]
    values = tuple(tf.constant(rng.normal(size=v.shape).astype(np.float32))
                   for v in model.trainable_variables)
    full = structure.masks(channels).trainable
    for got, m, v in zip(structure.restrict(channels, values), full, values):
      np.testing.assert_array_equal(got, m * v)

  def test_higher_threshold_uploads_less(self):
    _, _, low, _ = self.train(threshold=0.0, ratio=0.5)
    _, _, high, _ = self.train(threshold=0.5, ratio=0.5)
    total = lambda m: sum(float(np.sum(x)) for x in tf.nest.flatten(m))
    self.assertLess(total(high), total(low))

  def test_keep_ratio_comes_from_the_client(self):
    model, _, _, _ = self.train(ratio=0.5)
    first = gated_conv.gated_layers(model)[0]
    self.assertEqual(first.keep_ratio.numpy(), 0.5)
    self.assertLessEqual(first.kept_count.numpy().max(), 8)
    self.assertLessEqual(first.kept_count.numpy().sum(), 8 * 8)

  def test_dense_model_masks_are_all_ones(self):
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model('cnn', (8, 8, 1), 10)
    initial = tf.nest.map_structure(lambda v: v.numpy(),
                                    model_state.global_weights(model))
    train = local_training.build_local_training(
        model, tff.learning.optimizers.build_sgdm(0.1), weight_decay=1e-3)
    mask = train(initial, batches(), keep(0.3)).mask
    self.assertTrue(all(np.all(m.numpy() == 1) for m in tf.nest.flatten(mask)))


class SelfDistillationTest(parameterized.TestCase):
  """A narrow client distils the model's own full-width output."""

  def one_step(self, ratio, weight, mode='off'):
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model('cnn', (8, 8, 1), 10,
                                     gate=gated_conv.GateSpec())
    initial = tf.nest.map_structure(lambda v: v.numpy(),
                                    model_state.global_weights(model))
    train = local_training.build_local_training(
        model, tff.learning.optimizers.build_sgdm(0.1), compact_training=mode,
        self_distillation=weight)
    return model, initial, train(initial, batches(batch=8), keep(ratio))

  def test_a_step_follows_the_distilled_objective(self):
    model, initial, local = self.one_step(0.5, 2.0)
    x, y = next(iter(batches(batch=8)))
    tf.nest.map_structure(lambda v, t: v.assign(t),
                          model_state.global_weights(model), initial)
    model_state.set_keep_ratio(model, 1.0)
    target = tf.nn.softmax(model(x, training=True))
    model_state.set_keep_ratio(model, 0.5)
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      ce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
          y, logits)
      kl = tf.reduce_mean(tf.reduce_sum(target * (
          tf.math.log(target) - tf.nn.log_softmax(logits)), -1))
      objective = ce + 2.0 * kl
    grads = tape.gradient(objective, model_state.global_weights(
        model).trainable)
    for d, g in zip(local.delta.trainable, grads):
      np.testing.assert_allclose(d, 0.1 * tf.convert_to_tensor(g).numpy(),
                                 rtol=1e-4, atol=1e-7)

  @parameterized.parameters('off', 'step')
  def test_the_teacher_counts_its_flops_and_nothing_else(self, mode):
    model, _, plain = self.one_step(0.5, 0.0, mode)
    _, _, distilled = self.one_step(0.5, 1.0, mode)
    teacher_flops = 8 * compact_training.forward_flops(model, gates=True)
    self.assertAlmostEqual(
        float(distilled.cost.train_flops),
        float(plain.cost.train_flops) + teacher_flops, delta=1.0)
    # Its pass neither counts kept channels nor moves batch-norm moments.
    for a, b in zip(tf.nest.flatten(plain.mask),
                    tf.nest.flatten(distilled.mask)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.delta.non_trainable,
                    distilled.delta.non_trainable):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_full_width_clients_train_as_without_it(self):
    _, _, plain = self.one_step(1.0, 0.0)
    _, _, distilled = self.one_step(1.0, 1.0)
    self.assertEqual(float(plain.cost.train_flops),
                     float(distilled.cost.train_flops))
    for a, b in zip(tf.nest.flatten(plain.delta),
                    tf.nest.flatten(distilled.delta)):
      np.testing.assert_array_equal(a, b)

  def test_a_dense_model_has_nothing_to_distil(self):
    model = keras_models.build_model('cnn', (8, 8, 1), 10)
    with self.assertRaisesRegex(ValueError, 'needs a gated model'):
      local_training.build_local_training(
          model, tff.learning.optimizers.build_sgdm(0.1),
          self_distillation=1.0)


if __name__ == '__main__':
  absltest.main()

"""Tests of the gated convolution block."""

import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv
from tff_fedprune import gate_ops
from tff_fedprune import model_state


def built_layer(cin=4, cout=8, keep_ratio=0.5, seed=0, **kwargs):
  tf.keras.utils.set_random_seed(seed)
  flags = {k: kwargs.pop(k) for k in list(kwargs)
           if k in gated_conv.GateSpec.FLAG_NAMES.values()}
  layer = gated_conv.GatedConv2D(
      cout, gate=gated_conv.GateSpec.from_flags(keep_ratio=keep_ratio, **flags),
      **kwargs)
  layer.build((None, 6, 6, cin))
  # Spread the BN parameters so that every channel matters differently.
  layer.gamma.assign(tf.random.uniform([cout], 0.5, 1.5))
  layer.beta.assign(tf.random.uniform([cout], -0.5, 0.5))
  return layer


def reference_forward(layer, x):
  """The training forward pass in plain ops, differentiated by autodiff."""
  c = layer.conv(x)
  pi = layer.channel_gates(x, training=True)
  m4 = tf.cast(pi > 0, tf.float32)[:, None, None, :]
  count = tf.reduce_sum(m4, [0, 1, 2]) * 36.0
  mean = tf.reduce_sum(c * m4, [0, 1, 2]) / tf.maximum(count, 1.0)
  var = tf.reduce_sum(tf.square(c - mean) * m4, [0, 1, 2]) / tf.maximum(
      count, 1.0)
  xhat = (c - mean) * tf.math.rsqrt(var + layer.epsilon) * m4
  z = (layer.gamma * xhat + layer.beta) * pi[:, None, None, :]
  return tf.nn.relu(z) if layer.relu else z


def reference_full_bn(layer, x):
  """The authors' training forward: batch moments over every sample, gate."""
  c = layer.conv(x)
  mean, var = tf.nn.moments(c, [0, 1, 2])
  bn = layer.gamma * (c - mean) * tf.math.rsqrt(var + layer.epsilon) + \
      layer.beta
  z = bn * layer.channel_gates(x, training=True)[:, None, None, :]
  return tf.nn.relu(z) if layer.relu else z


def loss_of(y):
  weights = tf.reshape(tf.range(tf.size(y), dtype=tf.float32), y.shape)
  return tf.reduce_sum(tf.sin(weights) * y)


class GatedConv2DTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.x = tf.random.stateless_normal([5, 6, 6, 4], seed=[1, 2])

  @parameterized.product(relu=(True, False),
                          gate_input=gated_conv.GATE_INPUTS,
                          gated_bn=gated_conv.GATED_BNS,
                          gate_selection=gated_conv.GATE_SELECTIONS)
  def test_gradient_matches_autodiff_reference(self, relu, gate_input,
                                               gated_bn, gate_selection):
    # masked: the custom gradient; full: plain autodiff of fused BN.
    layer = built_layer(relu=relu, gate_input=gate_input, gated_bn=gated_bn,
                        gate_selection=gate_selection)
    forward = {'masked': reference_forward, 'full': reference_full_bn}
    variables = [layer.kernel, layer.gamma, layer.beta, layer.gate_kernel,
                 layer.gate_bias]
    x = tf.Variable(self.x)
    with tf.GradientTape(persistent=True) as tape:
      got = loss_of(layer(x, training=True))
      reference = loss_of(forward[gated_bn](layer, x))
    np.testing.assert_allclose(got, reference, rtol=1e-5)
    for v in variables + [x]:
      np.testing.assert_allclose(
          tape.gradient(got, v), tape.gradient(reference, v),
          rtol=1e-4, atol=1e-5, err_msg=v.name)

  def test_full_batch_norm_finite_differences_and_moving_statistics(self):
    layer = built_layer(keep_ratio=0.5, relu=False, gated_bn='full')
    x = self.x
    active = np.flatnonzero((layer.channel_gates(x).numpy() > 0).any(axis=0))
    with tf.GradientTape() as tape:
      loss = loss_of(layer(x, training=True))
    grad = tape.gradient(loss, layer.kernel)
    eps = 1e-2
    for j in active[:3]:
      index = (1, 1, 0, j)
      original = layer.kernel.numpy()
      values = []
      for step in (eps, -eps):
        moved = original.copy()
        moved[index] += step
        layer.kernel.assign(moved)
        values.append(loss_of(layer(x, training=True)).numpy())
      layer.kernel.assign(original)
      np.testing.assert_allclose(grad.numpy()[index],
                                 (values[0] - values[1]) / (2 * eps),
                                 rtol=2e-2, atol=2e-3)
    # Moving statistics from every sample; kept counts from the gates.
    fresh = built_layer(keep_ratio=0.5, gated_bn='full')
    fresh(x, training=True)
    c = fresh.conv(x)
    mean, var = tf.nn.moments(c, [0, 1, 2])
    n = 5 * 36
    np.testing.assert_allclose(fresh.moving_mean, 0.1 * mean, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(fresh.moving_variance,
                               0.9 + 0.1 * var * n / (n - 1), rtol=1e-4)
    np.testing.assert_array_equal(
        fresh.kept_count,
        (fresh.channel_gates(x).numpy() != 0).sum(axis=0))

  def test_full_batch_norm_reaches_pruned_channels_through_statistics(self):
    # Channel j kept by sample 0 and pruned by sample 1: with `full`, sample
    # 1 still moves sample 0's output of j (through j's batch statistics);
    # with `masked` it cannot.
    x = tf.Variable(tf.stack([self.x[0], -self.x[0]]))
    for gated_bn, reaches in (('full', True), ('masked', False)):
      layer = built_layer(keep_ratio=0.5, gated_bn=gated_bn,
                          gate_input='identity')
      pi = layer.channel_gates(x).numpy()
      j = np.flatnonzero((pi[0] != 0) & (pi[1] == 0))[0]
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True)[0, :, :, j])
      from_pruned = tape.gradient(loss, x).numpy()[1]
      self.assertEqual(bool(np.any(from_pruned != 0)), reaches, gated_bn)
    with self.assertRaisesRegex(ValueError, 'gated_bn'):
      gated_conv.GatedConv2D(
          4, gate=gated_conv.GateSpec.from_flags(gated_bn='batch'))

  def test_full_and_masked_agree_in_inference(self):
    masked = built_layer(keep_ratio=0.5)
    full = built_layer(keep_ratio=0.5, gated_bn='full')
    np.testing.assert_allclose(masked(self.x), full(self.x), rtol=1e-6)

  def test_identity_gate_input_reads_the_channel_means(self):
    layer = built_layer(gate_input='identity')
    z = tf.reduce_mean(self.x, axis=[1, 2])
    np.testing.assert_allclose(
        layer.saliency(self.x),
        tf.nn.relu(z @ layer.gate_kernel + layer.gate_bias), rtol=1e-6)
    sigmoid = built_layer()
    np.testing.assert_allclose(
        sigmoid.saliency(self.x),
        tf.nn.relu(tf.sigmoid(z) @ sigmoid.gate_kernel + sigmoid.gate_bias),
        rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'gate_input'):
      gated_conv.GatedConv2D(
          4, gate=gated_conv.GateSpec.from_flags(gate_input='tanh'))

  def test_pruned_channels_get_exactly_zero_gradient_from_each_sample(self):
    layer = built_layer(keep_ratio=0.5)
    pi = layer.channel_gates(self.x)
    pruned = (pi.numpy() == 0)
    self.assertTrue(pruned.any())
    c = tf.Variable(layer.conv(self.x))
    with tf.GradientTape() as tape:
      y, *_ = gate_ops.gated_batch_norm(c, pi, layer.gamma, layer.beta,
                                      layer.epsilon, relu=True)
      loss = loss_of(y)
    dc = tape.gradient(loss, c).numpy()
    # dL/dc[n, :, :, j] is what sample n sends to channel j's kernel slice.
    for n, j in zip(*np.nonzero(pruned)):
      self.assertTrue(np.all(dc[n, :, :, j] == 0.0), (n, j))
    active = ~pruned
    self.assertTrue(np.all(np.abs(dc).sum((1, 2))[active] > 0))

  def test_channels_pruned_for_the_whole_batch_do_not_learn(self):
    layer = built_layer(keep_ratio=0.25)
    x = tf.Variable(self.x[:2])
    with tf.GradientTape() as tape:
      loss = loss_of(layer(x, training=True))
    dk, dg, db = tape.gradient(loss, [layer.kernel, layer.gamma, layer.beta])
    never = ~(layer.channel_gates(x).numpy() > 0).any(axis=0)
    self.assertTrue(never.any())
    self.assertTrue(np.all(dk.numpy()[..., never] == 0.0))
    self.assertTrue(np.all(dg.numpy()[never] == 0.0))
    self.assertTrue(np.all(db.numpy()[never] == 0.0))
    self.assertTrue(np.all(np.abs(dg.numpy()[~never]) > 0))

  def test_next_layer_rows_of_zero_input_channels_get_no_gradient(self):
    first = built_layer(keep_ratio=0.25)
    second = gated_conv.GatedConv2D(3, gate=None)
    x = self.x[:1]
    with tf.GradientTape() as tape:
      loss = loss_of(second(first(x, training=True), training=True))
    dk = tape.gradient(loss, second.kernel).numpy()
    zero = first.channel_gates(x).numpy()[0] == 0
    self.assertTrue(np.all(dk[:, :, zero, :] == 0.0))

  def test_finite_differences_on_active_channels(self):
    # Without the ReLU the block is smooth in its parameters, so central
    # differences are accurate; the ReLU path is checked against autodiff.
    layer = built_layer(keep_ratio=0.5, relu=False)
    x = self.x
    active = np.flatnonzero((layer.channel_gates(x).numpy() > 0).any(axis=0))
    with tf.GradientTape() as tape:
      loss = loss_of(layer(x, training=True))
    grads = tape.gradient(loss, [layer.gamma, layer.kernel])
    eps = 1e-2
    for j in active[:3]:
      for var, grad, index in ((layer.gamma, grads[0], (j,)),
                               (layer.kernel, grads[1], (1, 1, 0, j))):
        original = var.numpy()
        plus, minus = original.copy(), original.copy()
        plus[index] += eps
        minus[index] -= eps
        var.assign(plus)
        f_plus = loss_of(layer(x, training=True)).numpy()
        var.assign(minus)
        f_minus = loss_of(layer(x, training=True)).numpy()
        var.assign(original)
        numeric = (f_plus - f_minus) / (2 * eps)
        np.testing.assert_allclose(grad.numpy()[index], numeric, rtol=2e-2,
                                   atol=2e-3, err_msg=f'{var.name}{index}')

  @parameterized.parameters((0.5, 4), (0.7, 6), (0.1, 1), (1.0, 8), (0.3, 2))
  def test_top_k_keeps_exactly_k_per_sample(self, ratio, k):
    layer = built_layer(keep_ratio=ratio)
    s = layer.saliency(self.x)
    kept = layer.top_k(s).numpy()
    np.testing.assert_array_equal(kept.sum(axis=1), np.full(5, k))
    gates = layer.channel_gates(self.x).numpy()
    np.testing.assert_array_equal(gates != 0, (kept > 0) & (s.numpy() > 0))
    # The kept channels are the k largest scores of each sample.
    for row, mask in zip(s.numpy(), kept):
      self.assertGreaterEqual(row[mask > 0].min(), row[mask == 0].max(
          initial=-np.inf))

  def test_ties_keep_exactly_k_lowest_indices(self):
    scores = tf.constant([[1.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    mask = gate_ops.top_k_mask(scores, 3).numpy()
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0]])

  def test_keep_ratio_one_is_conv_bn_relu_scaled_by_saliency(self):
    layer = built_layer(keep_ratio=1.0)
    layer.gate_kernel.assign(tf.abs(layer.gate_kernel))  # Every s > 0.
    s = tf.nn.relu(tf.sigmoid(tf.reduce_mean(self.x, [1, 2])) @
                   layer.gate_kernel + layer.gate_bias)
    self.assertTrue(np.all(s.numpy() > 0))
    c = layer.conv(self.x)
    mean, var = tf.nn.moments(c, [0, 1, 2])
    bn = layer.gamma * (c - mean) * tf.math.rsqrt(var + layer.epsilon) + \
        layer.beta
    expected = tf.nn.relu(bn * s[:, None, None, :])
    np.testing.assert_allclose(layer(self.x, training=True), expected,
                               rtol=1e-4, atol=1e-5)

  def test_ratio_changes_at_run_time_without_retracing(self):
    layer = built_layer(keep_ratio=0.5)
    traces = []

    @tf.function
    def kept(x):
      traces.append(1)
      return tf.reduce_sum(tf.cast(layer.top_k(layer.saliency(x)), tf.int32),
                           1)

    counts = {}
    for ratio in (0.5, 0.7, 1.0):
      layer.keep_ratio.assign(ratio)
      counts[ratio] = int(kept(self.x)[0])
    self.assertEqual(counts, {0.5: 4, 0.7: 6, 1.0: 8})
    self.assertLen(traces, 1)

  def test_counters_count_kept_channels(self):
    layer = built_layer(keep_ratio=0.5)
    layer(self.x, training=True)
    layer(self.x[:2], training=True)
    kept = (layer.channel_gates(self.x).numpy() > 0)
    expected = kept.sum(0) + kept[:2].sum(0)
    np.testing.assert_array_equal(layer.kept_count.numpy(), expected)
    self.assertEqual(layer.samples_seen.numpy(), 7)
    layer(self.x, training=False)
    self.assertEqual(layer.samples_seen.numpy(), 7)

  def test_moving_statistics_only_move_for_kept_channels(self):
    layer = built_layer(keep_ratio=0.25)
    x = self.x[:1]
    layer(x, training=True)
    kept = layer.channel_gates(x).numpy()[0] > 0
    moved = layer.moving_mean.numpy() != 0
    np.testing.assert_array_equal(moved, kept)

  def test_rejects_bad_keep_ratio(self):
    for ratio in (0.0, -0.1, 1.5):
      with self.assertRaisesRegex(ValueError, 'keep_ratio'):
        gated_conv.GatedConv2D(
            4, gate=gated_conv.GateSpec.from_flags(keep_ratio=ratio))


class ModelStateTest(absltest.TestCase):

  def model(self, gated=True):
    inputs = tf.keras.Input((8, 8, 2))
    gate = gated_conv.GateSpec(keep_ratio=0.5) if gated else None
    x = gated_conv.GatedConv2D(4, name='a', gate=gate)(inputs)
    x = gated_conv.GatedConv2D(6, name='b', gate=gate)(x)
    return tf.keras.Model(inputs, x)

  def test_global_weights_exclude_local_state(self):
    model = self.model()
    weights = model_state.global_weights(model)
    names = [v.name for v in weights.trainable + weights.non_trainable]
    self.assertNotIn('a/keep_ratio:0', names)
    self.assertNotIn('b/kept_count:0', names)
    self.assertIn('a/moving_mean:0', names)
    self.assertIn('b/gate_kernel:0', names)
    self.assertLen(model_state.local_variables(model), 6)

  def test_dense_variant_shares_parameter_names(self):
    dense = {w.name for w in self.model(gated=False).weights}
    gated = {w.name for w in self.model(gated=True).weights}
    self.assertTrue(dense < gated)
    self.assertEqual(
        gated - dense,
        {f'{l}/{v}:0' for l in 'ab' for v in (
            'gate_kernel', 'gate_bias', 'keep_ratio', 'kept_count',
            'samples_seen')})

  def test_set_keep_ratio_and_reset_counts(self):
    model = self.model()
    model_state.set_keep_ratio(model, 1.0)
    x = tf.random.normal([3, 8, 8, 2])
    model(x, training=True)
    for layer in gated_conv.gated_layers(model):
      self.assertEqual(layer.samples_seen.numpy(), 3)
    model_state.reset_channel_counts(model)
    for layer in gated_conv.gated_layers(model):
      self.assertEqual(layer.samples_seen.numpy(), 0)
      self.assertEqual(layer.kept_count.numpy().sum(), 0)


class SerializationTest(parameterized.TestCase):

  @parameterized.parameters('keras', 'savedmodel')
  def test_round_trip_is_bit_exact(self, fmt):
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((8, 8, 3))
    x = gated_conv.GatedConv2D(
        8, name='g',
        gate=gated_conv.GateSpec.from_flags(keep_ratio=0.7))(inputs)
    x = gated_conv.GatedConv2D(
        8, relu=False, strides=2, name='h',
        gate=gated_conv.GateSpec.from_flags(keep_ratio=0.7))(x)
    model = tf.keras.Model(inputs, x)
    data = tf.random.normal([4, 8, 8, 3])
    model(data, training=True)  # Move the statistics off their defaults.
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, 'm.keras' if fmt == 'keras' else 'sm')
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    for a, b in zip(model.weights, loaded.weights):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model(data), loaded(data))
    if fmt == 'keras':
      self.assertEqual(loaded.get_layer('h').get_config()['keep_ratio'], 0.7)
      model_state.set_keep_ratio(loaded, 0.3)
      self.assertFalse(np.array_equal(model(data), loaded(data)))

  def test_gate_input_is_saved_and_old_configs_mean_sigmoid(self):
    layer = gated_conv.GatedConv2D(
        4, gate=gated_conv.GateSpec.from_flags(gate_input='identity'))
    config = layer.get_config()
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.input, 'identity')
    del config['gate_input']  # As written before the option existed.
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.input, 'sigmoid')

  @parameterized.parameters('centered', 'standardized')
  def test_relative_selection_ranks_deviation_from_the_channel_moments(
      self, selection):
    layer = built_layer(cout=8, keep_ratio=0.5, gate_input='identity',
                        gate_selection=selection)
    x = tf.random.stateless_normal([5, 6, 6, 4], seed=[1, 2])
    s = layer.saliency(x).numpy()
    mean, var = s.mean(0), s.var(0)

    def expected_mask(mean, var):
      score = s - mean
      if selection == 'standardized':
        score = score / np.sqrt(var + layer.epsilon)
      score = np.where(s > 0, score, -np.inf)
      top = np.argsort(-score, axis=1, kind='stable')[:, :4]
      mask = np.zeros_like(s)
      np.put_along_axis(mask, top, 1.0, axis=1)
      return mask

    # Training moves the moments towards the batch's, then ranks by them:
    # two calls from (0, 1) at momentum 0.9.
    layer(x, training=True)
    pi = layer.channel_gates(x, training=True).numpy()
    moving_mean = mean * (1 - 0.9**2)
    moving_var = 0.9**2 + var * (1 - 0.9**2)
    np.testing.assert_array_equal(
        pi != 0, (expected_mask(moving_mean, moving_var) * s) != 0)
    np.testing.assert_allclose(pi[pi != 0], s[pi != 0])
    np.testing.assert_allclose(layer.saliency_mean, moving_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.saliency_variance, moving_var, rtol=1e-5)
    pi = layer.channel_gates(x).numpy()  # Inference: moving moments.
    np.testing.assert_array_equal(
        pi != 0, (expected_mask(moving_mean, moving_var) * s) != 0)
    # Batch-level changes: channels differ between samples, unlike ranking s.
    self.assertGreater(len({tuple(row) for row in (pi != 0)}), 1)
    config = layer.get_config()
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.selection, selection)
    del config['gate_selection']
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.selection, 'saliency')
    with self.assertRaisesRegex(ValueError, 'gate_selection'):
      gated_conv.GatedConv2D(
          4, gate=gated_conv.GateSpec.from_flags(gate_selection='random'))

  def test_usage_balance_is_one_when_balanced_and_larger_when_static(self):
    static_s = tf.constant([[2.0, 2.0, 1.0, 1.0]] * 4)
    static_pi = static_s * tf.constant([[1.0, 1.0, 0.0, 0.0]] * 4)
    # Kept shares (.5, .5, 0, 0), saliency shares (1/3, 1/3, 1/6, 1/6).
    self.assertAlmostEqual(
        float(gate_ops.usage_balance(static_s, static_pi)), 4 / 3, places=5)
    dynamic_s = tf.constant([[2.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]] * 2)
    dynamic_pi = dynamic_s * tf.cast(dynamic_s > 1.5, tf.float32)
    self.assertAlmostEqual(
        float(gate_ops.usage_balance(dynamic_s, dynamic_pi)), 1.0, places=5)
    with tf.GradientTape() as tape:
      tape.watch(static_s)
      loss = gate_ops.usage_balance(static_s, static_pi)
    grad = tape.gradient(loss, static_s).numpy()
    self.assertTrue((grad[:, :2] > 0).all())  # Kept always: pushed down.
    self.assertTrue((grad[:, 2:] < 0).all())  # Never kept: pulled up.

  def test_gate_balance_adds_the_weighted_loss_in_training_only(self):
    x = tf.random.stateless_normal([5, 6, 6, 4], seed=[1, 2])
    layer = built_layer(cout=8, keep_ratio=0.5, gate_balance=0.3)
    layer(x, training=True)
    s = layer.saliency(x)
    expected = 0.3 * gate_ops.usage_balance(s, layer.channel_gates(x))
    self.assertLen(layer.losses, 1)
    self.assertAlmostEqual(float(layer.losses[0]), float(expected), places=5)
    layer(x, training=False)
    self.assertEmpty(layer.losses)
    plain = built_layer(cout=8, keep_ratio=0.5)
    plain(x, training=True)
    self.assertEmpty(plain.losses)
    config = layer.get_config()
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.balance, 0.3)
    del config['gate_balance']
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.balance, 0.0)
    with self.assertRaisesRegex(ValueError, 'gate_balance'):
      gated_conv.GatedConv2D(
          4, gate=gated_conv.GateSpec.from_flags(gate_balance=-1.0))

  def test_gated_bn_is_saved_and_old_configs_mean_masked(self):
    config = gated_conv.GatedConv2D(
        4, gate=gated_conv.GateSpec.from_flags(gated_bn='full')).get_config()
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.batch_stats, 'full')
    del config['gated_bn']
    self.assertEqual(
        gated_conv.GatedConv2D.from_config(config).gate.batch_stats, 'masked')


if __name__ == '__main__':
  absltest.main()


class FixedChannelsTest(absltest.TestCase):

  def test_fixed_set_replaces_top_k_for_every_input_and_is_saved(self):
    layer = built_layer(keep_ratio=0.25)
    x = tf.random.normal([5, 6, 6, 4], seed=1)
    layer.fix_channels([6, 1, 1])
    pi = layer.channel_gates(x).numpy()
    s = layer.saliency(x).numpy()
    np.testing.assert_array_equal(pi[:, [0, 2, 3, 4, 5, 7]], 0)
    np.testing.assert_allclose(pi[:, [1, 6]], s[:, [1, 6]])
    config = layer.get_config()
    self.assertEqual(config['fixed_channels'], [1, 6])
    restored = gated_conv.GatedConv2D.from_config(config)
    np.testing.assert_array_equal(restored.fixed_channels, [1, 6])
    layer.fix_channels(gated_conv.ALL)
    np.testing.assert_allclose(layer.channel_gates(x), s)
    layer.fix_channels(None)
    self.assertEqual(int(np.sum(layer.channel_gates(x).numpy()[0] != 0)),
                     int(np.sum(s[0] != 0) and 2))
    self.assertNotIn('fixed_channels', layer.get_config())
    with self.assertRaisesRegex(ValueError, 'non-empty subset'):
      layer.fix_channels([8])

  def test_gate_spec_checks_its_fields_by_flag_name(self):
    spec = gated_conv.GateSpec.from_flags(keep_ratio=0.5, gated_bn='full')
    self.assertEqual((spec.keep_ratio, spec.batch_stats), (0.5, 'full'))
    self.assertEqual(gated_conv.GateSpec.from_flags(**spec.flags()), spec)
    for flags, name in ((dict(gate_input='tanh'), 'gate_input'),
                        (dict(gate_balance=-1.0), 'gate_balance'),
                        (dict(keep_ratio=0.0), 'keep_ratio')):
      with self.assertRaisesRegex(ValueError, name):
        gated_conv.GateSpec.from_flags(**flags)
    with self.assertRaisesRegex(TypeError, 'unknown gate options'):
      gated_conv.GateSpec.from_flags(gated=True)

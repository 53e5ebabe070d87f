"""Tests of the TFLite export: parity with Keras, builtin ops, quantization."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import tflite
from tff_fedprune.export import tiers
from tff_fedprune.simulation import evaluation
from tff_fedprune.simulation import flops

# Smaller inputs than the datasets' keep conversion and checks fast.
SHAPES = {'cnn': (12, 12, 1), 'resnet20': (16, 16, 3), 'resnet32': (8, 8, 3),
          'resnet56': (8, 8, 3), 'vgg11': (16, 16, 3)}
MEAN, STD = 100.0, 50.0


def trained_looking_model(name, gated=True, **kwargs):
  """A zoo model with non-trivial BN statistics, scales and gate biases."""
  tf.keras.utils.set_random_seed(0)
  gate = gated_conv.GateSpec.from_flags(**kwargs) if gated else None
  model = keras_models.build_model(name, SHAPES[name], 10, gate=gate)
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if isinstance(layer, gated_conv.GatedConv2D):
      c = layer.filters
      layer.moving_mean.assign(rng.normal(0, 0.2, c))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
      layer.gamma.assign(rng.uniform(0.5, 1.5, c))
      layer.beta.assign(rng.normal(0, 0.2, c))
      if layer.gated:
        layer.gate_bias.assign(rng.normal(0, 0.5, c))
      if layer.gated and layer.gate.selection != 'saliency':
        layer.saliency_mean.assign(rng.uniform(0.0, 1.0, c))
        layer.saliency_variance.assign(rng.uniform(0.1, 1.0, c))
  return model


def raw_images(name, count, seed=1):
  shape = (count,) + SHAPES[name]
  return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


def keras_logits(model, images):
  return model((images - MEAN) / STD, training=False).numpy()


class ParityTest(parameterized.TestCase):

  @parameterized.parameters(*itertools.product(
      ['cnn', 'resnet20'], [0.3, 0.7, 1.0]))
  def test_gated_export_equals_keras(self, name, keep_ratio):
    self.check_gated_export_equals_keras(name, keep_ratio)

  # The deeper models' conversions take most of this suite's time.
  @parameterized.parameters(*itertools.product(
      ['resnet32', 'resnet56', 'vgg11'], [0.3, 0.7, 1.0]))
  @pytest.mark.slow
  def test_deep_gated_export_equals_keras(self, name, keep_ratio):
    self.check_gated_export_equals_keras(name, keep_ratio)

  def check_gated_export_equals_keras(self, name, keep_ratio):
    model = trained_looking_model(name)
    model_state.set_keep_ratio(model, keep_ratio)
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD]))
    images = raw_images(name, 16)
    got = tflite.run(content, images)
    np.testing.assert_allclose(got, keras_logits(model, images), atol=1e-4)
    ops = tflite.op_names(content)
    self.assertIn('TOPK_V2', ops)
    self.assertIn('GATHER', ops)
    self.assertFalse([o for o in ops if o.startswith('Flex') or o == 'CUSTOM'])


  @parameterized.parameters(
      ('cnn', 0.5, dict(gate_input='identity')),
      ('resnet20', 0.7, dict(gate_input='identity')),
      ('resnet20', 0.7, dict(gate_stem=False)),
      ('cnn', 0.7, dict(gated_bn='full')),
      ('vgg11', 0.5, dict(gate_stem=False)),
      ('cnn', 0.7, dict(gate_selection='centered')),
      ('resnet20', 0.5, dict(gate_selection='standardized')))
  def test_authors_variants_export_equal_keras(self, name, keep_ratio,
                                               variant):
    model = trained_looking_model(name, **variant)
    model_state.set_keep_ratio(model, keep_ratio)
    content = tflite.convert(tflite.inference_function(model, [MEAN], [STD]))
    images = raw_images(name, 16)
    np.testing.assert_allclose(tflite.run(content, images),
                               keras_logits(model, images), atol=1e-4)


class ExportTest(absltest.TestCase):

  def test_explicit_keep_ratio_overrides_the_models(self):
    model = trained_looking_model('resnet20')
    images = raw_images('resnet20', 8)
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD], keep_ratio=0.5))
    model_state.set_keep_ratio(model, 0.5)
    np.testing.assert_allclose(tflite.run(content, images),
                               keras_logits(model, images), atol=1e-4)

  def test_gated_layers_compute_only_k_channels(self):
    model = trained_looking_model('cnn')
    module = tflite.inference_function(model, [MEAN], [STD], keep_ratio=0.5)
    conv_filters = [op.inputs[1].shape.as_list()
                    for op in module.serve.graph.get_operations()
                    if op.type == 'Conv2D']
    # 16, 32, 64 filters keep 8, 16, 32; inputs after the first are compact.
    self.assertEqual(conv_filters, [[3, 3, 1, 8], [3, 3, 8, 16],
                                    [3, 3, 16, 32]])

  def test_dense_export_and_ungated_models_use_constant_full_kernels(self):
    gated = trained_looking_model('resnet20')
    dense = trained_looking_model('resnet20', gated=False)
    dense.set_weights([w for w, v in zip(gated.get_weights(), gated.weights)
                       if any(v.name == d.name for d in dense.weights)])
    images = raw_images('resnet20', 8)
    for model, as_dense in ((gated, True), (dense, False)):
      content = tflite.convert(tflite.inference_function(
          model, [MEAN], [STD], dense=as_dense))
      ops = tflite.op_names(content)
      self.assertNotIn('TOPK_V2', ops)
      self.assertNotIn('GATHER', ops)
      np.testing.assert_allclose(tflite.run(content, images),
                                 keras_logits(dense, images), atol=1e-4)
    # The reference the export command checks the dense file against.
    np.testing.assert_allclose(
        keras_logits(tflite.ungated_copy(gated), images),
        keras_logits(dense, images), atol=1e-5)

  def test_quantized_exports_run_and_shrink(self):
    model = trained_looking_model('cnn')
    images = raw_images('cnn', 8)
    module = tflite.inference_function(model, [MEAN], [STD])
    float32 = tflite.convert(module)
    expected = keras_logits(model, images)
    for quantize in ('float16', 'dynamic_int8'):
      content = tflite.convert(module, quantize)
      self.assertLess(len(content), len(float32))
      got = tflite.run(content, images)
      self.assertEqual(got.shape, expected.shape)
      self.assertTrue(np.all(np.isfinite(got)))
      self.assertLess(np.abs(got - expected).max(), 0.5 * np.abs(expected).max())
    with self.assertRaisesRegex(ValueError, 'quantize must be one of'):
      tflite.convert(module, 'int4')

  def test_bad_keep_ratio(self):
    with self.assertRaisesRegex(ValueError, 'keep_ratio'):
      tflite.inference_function(
          trained_looking_model('cnn'), [MEAN], [STD], keep_ratio=0.0)


def calibration(name, count=32, seed=3):
  images = (raw_images(name, count, seed) - MEAN) / STD
  return tf.data.Dataset.from_tensor_slices(images).batch(16)


class StaticExportTest(parameterized.TestCase):

  @parameterized.parameters(*itertools.product(
      ['cnn', 'resnet20', 'vgg11'], [0.5, 0.7]))
  def test_static_export_equals_keras_with_fixed_channels(self, name,
                                                          keep_ratio):
    model = trained_looking_model(name)
    model_state.set_keep_ratio(model, keep_ratio)
    channels = channel_maps.static_channels(model, calibration(name))
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD], channels=channels))
    images = raw_images(name, 8)
    expected = tflite.keras_logits(model, images, [MEAN], [STD], channels)
    for runtime in tflite.RUNTIMES:
      np.testing.assert_allclose(
          tflite.run(content, images, runtime=runtime), expected, atol=1e-4)
    ops = tflite.op_names(content)
    self.assertFalse(ops & {'TOPK_V2', 'GATHER', 'GATHER_ND', 'SCATTER_ND'},
                     ops)
    self.assertFalse([o for o in ops if o.startswith('Flex') or o == 'CUSTOM'])

  @parameterized.parameters('inner', 'shared')
  def test_residual_modes_equal_keras_with_fixed_channels(self, residual):
    model = trained_looking_model('resnet20')
    model_state.set_keep_ratio(model, 0.5)
    channels = channel_maps.static_channels(model, calibration('resnet20'),
                                      residual=residual)
    writers = [n for n in channels if n == 'stem' or n.endswith('_conv2')]
    if residual == 'inner':
      self.assertTrue(all(channels[n] is channel_maps.ALL_CHANNELS
                          for n in writers))
      self.assertFalse([n for n in channels if n.endswith('_add')])
    else:
      # One set per stage, shared by its additions and the layers writing
      # to them.
      for stage, width in (('stage1', 16), ('stage2', 32), ('stage3', 64)):
        members = [c for n, c in channels.items() if n.startswith(stage) and (
            n.endswith('_conv2') or n.endswith('_add'))]
        self.assertLen(members, 6)
        for kept in members:
          np.testing.assert_array_equal(kept, members[0])
        self.assertLen(members[0], width // 2)
      np.testing.assert_array_equal(channels['stem'],
                                    channels['stage1_block1_add'])
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD], channels=channels))
    images = raw_images('resnet20', 8)
    np.testing.assert_allclose(
        tflite.run(content, images),
        tflite.keras_logits(model, images, [MEAN], [STD], channels),
        atol=1e-4)
    self.assertFalse(tflite.op_names(content) & {'TOPK_V2', 'GATHER'})

  def test_static_channels_are_the_most_often_kept(self):
    model = trained_looking_model('cnn')
    model_state.set_keep_ratio(model, 0.5)
    frequency = flops.measure_gates(model, calibration('cnn')).frequency
    channels = channel_maps.static_channels(model, calibration('cnn'))
    for layer, share in zip(gated_conv.gated_layers(model), frequency):
      kept = channels[layer.name]
      self.assertLen(kept, layer.filters // 2)
      dropped = np.setdiff1d(np.arange(layer.filters), kept)
      self.assertGreaterEqual(share[kept].min(), share[dropped].max())
    # A gate that prefers the same channels for every input: the static
    # model is the dynamic one.
    for layer in gated_conv.gated_layers(model):
      layer.gate_kernel.assign(tf.zeros_like(layer.gate_kernel))
      layer.gate_bias.assign(np.linspace(0.1, 1.0, layer.filters)[::-1])
    channels = channel_maps.static_channels(model, calibration('cnn'))
    self.assertEqual({n: c.tolist() for n, c in channels.items()},
                     {'block1': list(range(8)), 'block2': list(range(16)),
                      'block3': list(range(32))})
    images = raw_images('cnn', 4)
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD], channels=channels))
    np.testing.assert_allclose(tflite.run(content, images),
                               keras_logits(model, images), atol=1e-4)

  def test_channel_multiple_rounds_k(self):
    model = trained_looking_model('cnn')
    channels = channel_maps.static_channels(model, calibration('cnn'),
                                      keep_ratio=0.7, channel_multiple=8)
    # 0.7 of 16, 32, 64 is 11, 22, 45: nearest multiples of 8.
    self.assertEqual([len(c) for c in channels.values()], [8, 24, 48])
    self.assertEqual(channel_maps.rounded_k(0.1, 16, 8), 8)
    self.assertEqual(channel_maps.rounded_k(1.0, 20, 8), 20)
    with self.assertRaisesRegex(ValueError, 'channel_multiple'):
      channel_maps.static_channels(model, calibration('cnn'),
                                   channel_multiple=0)

  def test_bad_static_input(self):
    model = trained_looking_model('cnn')
    with self.assertRaisesRegex(ValueError, 'no gated layers'):
      channel_maps.static_channels(trained_looking_model('cnn', gated=False),
                             calibration('cnn'))
    with self.assertRaisesRegex(ValueError, 'no calibration images'):
      channel_maps.static_channels(model, calibration('cnn').take(0))
    with self.assertRaisesRegex(ValueError, 'keep_ratio'):
      channel_maps.static_channels(model, calibration('cnn'), keep_ratio=1.5)
    with self.assertRaisesRegex(ValueError, 'neither a gated layer'):
      tflite.inference_function(model, [MEAN], [STD], channels={'gap': None})
    with self.assertRaisesRegex(ValueError, 'residual must be one of'):
      channel_maps.static_channels(model, calibration('cnn'), residual='half')
    with self.assertRaisesRegex(ValueError, 'needs a channel set'):
      tflite.inference_function(
          trained_looking_model('resnet20'), [MEAN], [STD],
          channels={'stage1_block1_add': channel_maps.ALL_CHANNELS})
    with self.assertRaisesRegex(ValueError, 'non-empty subset'):
      tflite.inference_function(model, [MEAN], [STD],
                                channels={'block1': [16]})

  def test_reference_model_is_a_copy_with_fixed_channels(self):
    model = trained_looking_model('resnet20')
    images = raw_images('resnet20', 4)
    before = keras_logits(model, images)
    for fixed in ({'stage2_block1_conv1': [0, 1]},
                  {'stage3_block3_add': [0, 1]}):
      reference = channel_maps.reference_model(model, fixed)
      self.assertGreater(
          np.abs(keras_logits(reference, images) - before).max(), 1e-3)
      np.testing.assert_array_equal(keras_logits(model, images), before)
    layer = reference.get_layer('stage3_block3_add')
    self.assertIsInstance(layer, channel_maps.MaskedAdd)
    self.assertEqual(layer.kept, [0, 1])


class GatePolicyTest(absltest.TestCase):

  def test_small_layers_export_at_full_width(self):
    model = trained_looking_model('resnet20')
    model_state.set_keep_ratio(model, 0.5)
    sizes = {l.name: flops.layer_flops(l)
             for l in gated_conv.gated_layers(model)}
    threshold = sorted(set(sizes.values()))[1]
    policy = channel_maps.gate_policy(model, threshold)
    self.assertEqual(set(policy),
                     {n for n, f in sizes.items() if f < threshold})
    self.assertNotEmpty(policy)
    self.assertLess(len(policy), len(sizes))
    self.assertEqual(channel_maps.gate_policy(model, 0.0), {})
    content = tflite.convert(
        tflite.inference_function(model, [MEAN], [STD], channels=policy))
    # Parity: the Keras model with those layers at keep 1.0.
    for name in policy:
      model.get_layer(name).keep_ratio.assign(1.0)
    images = raw_images('resnet20', 8)
    np.testing.assert_allclose(tflite.run(content, images),
                               keras_logits(model, images), atol=1e-4)
    self.assertIn('TOPK_V2', tflite.op_names(content))


class LiteRtTest(absltest.TestCase):

  def test_dynamic_export_runs_on_litert_as_on_tensorflow(self):
    model = trained_looking_model('resnet20')
    model_state.set_keep_ratio(model, 0.7)
    content = tflite.convert(tflite.inference_function(model, [MEAN], [STD]))
    images = raw_images('resnet20', 4)
    expected = keras_logits(model, images)
    for xnnpack in (True, False):
      np.testing.assert_allclose(
          tflite.run(content, images, runtime='litert', xnnpack=xnnpack),
          expected, atol=1e-4)
    with self.assertRaisesRegex(ValueError, 'runtime must be one of'):
      tflite.interpreter(content, runtime='tflite_micro')


class TierExportTest(parameterized.TestCase):

  @parameterized.parameters('heterofl', 'feddp')
  def test_a_tier_export_is_static_and_scores_as_its_keras_model(self, policy):
    tf.keras.utils.set_random_seed(3)
    model = keras_models.build_model('cnn', SHAPES['cnn'], 10,
                                     gate=gated_conv.GateSpec(policy=policy))
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(64,) + SHAPES['cnn']).astype(np.float32)
    images = raw_images('cnn', 40)
    labels = keras_logits(model, images).argmax(-1)  # The full model's.
    trained = [w.numpy() for w in model.non_trainable_weights]
    result = tiers.export_tier(model, '0.5', 0.5, calibration, images, labels,
                               [MEAN], [STD], invokes=5)
    for before, after in zip(trained, model.non_trainable_weights):
      if 'moving' in after.name:  # Statistics restored.
        np.testing.assert_array_equal(after.numpy(), before)
    # What the device runs: the sub-model, its statistics recomputed on the
    # calibration images (for FedDP: its most-kept channels).
    channels = tiers._channels(model, 0.5, calibration)  # pylint: disable=protected-access
    reference = channel_maps.reference_model(model, channels or {})
    evaluation.calibrate_batch_norm(reference, calibration)
    expected = keras_logits(reference, images).argmax(-1)
    self.assertEqual(result.export_accuracy, np.mean(expected == labels))
    self.assertLess(result.export_accuracy, 1.0)  # Half the channels.
    self.assertGreater(result.latency_ms, 0)
    content = tflite.convert(tflite.inference_function(
        model, [MEAN], [STD], channels=channels))
    self.assertNoCommonElements(tflite.op_names(content),
                                {'TOPK_V2', 'GATHER', 'SCATTER_ND'})


if __name__ == '__main__':
  absltest.main()

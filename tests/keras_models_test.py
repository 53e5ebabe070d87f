"""Shapes and parameter counts of the model zoo."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import keras_models
from tff_fedprune import gated_conv
from tff_fedprune import model_state


def resnet_trainable(depth, classes=10):
  """Parameter count of a CIFAR ResNet with option-A shortcuts, by hand."""
  n = (depth - 2) // 6
  conv = lambda cin, cout: 9 * cin * cout + 2 * cout  # Kernel + BN scale/shift.
  total = conv(3, 16)
  cin = 16
  for f in (16, 32, 64):
    for _ in range(n):
      total += conv(cin, f) + conv(f, f)
      cin = f
  return total + 64 * classes + classes


def gate_params(model):
  return sum(int(np.prod(l.gate_kernel.shape)) + l.filters
             for l in gated_conv.gated_layers(model))


class ModelZooTest(parameterized.TestCase):

  @parameterized.parameters(
      ('cnn', (28, 28, 1), 10), ('cnn', (8, 8, 1), 10),
      ('resnet20', (32, 32, 3), 10), ('resnet32', (32, 32, 3), 10),
      ('resnet56', (32, 32, 3), 100), ('vgg11', (32, 32, 3), 10),
      ('vgg11', (28, 28, 1), 10))
  def test_shapes_and_gated_variant(self, name, shape, classes):
    dense = keras_models.build_model(name, shape, classes)
    gated = keras_models.build_model(
        name, shape, classes,
        gate=gated_conv.GateSpec.from_flags(keep_ratio=0.5))
    x = tf.random.normal((2,) + shape)
    for model in (dense, gated):
      self.assertEqual(model(x, training=False).shape, (2, classes))
    self.assertEqual(gated_conv.gated_layers(dense), [])
    self.assertNotEmpty(gated_conv.gated_layers(gated))
    dense_w = model_state.global_weights(dense)
    gated_w = model_state.global_weights(gated)
    count = lambda ws: sum(int(np.prod(v.shape)) for v in ws)
    self.assertEqual(count(gated_w.trainable),
                     count(dense_w.trainable) + gate_params(gated))
    self.assertEqual(count(gated_w.non_trainable),
                     count(dense_w.non_trainable))
    dense_names = {v.name for v in dense.weights}
    self.assertTrue(dense_names <= {v.name for v in gated.weights})

  @parameterized.parameters(('cnn', (8, 8, 1)), ('resnet20', (16, 16, 3)),
                            ('vgg11', (16, 16, 3)))
  def test_dense_stem_leaves_only_the_first_convolution_ungated(self, name,
                                                                 shape):
    with_stem = keras_models.build_model(
        name, shape, 10, gate=gated_conv.GateSpec())
    without = keras_models.build_model(
        name, shape, 10, gate=gated_conv.GateSpec.from_flags(gate_stem=False))
    convs = [l for l in without.layers
             if isinstance(l, gated_conv.GatedConv2D)]
    self.assertFalse(convs[0].gated)
    self.assertTrue(all(l.gated for l in convs[1:]))
    self.assertEqual([l.name for l in gated_conv.gated_layers(without)],
                     [l.name for l in gated_conv.gated_layers(with_stem)][1:])

  @parameterized.parameters(('cnn', (8, 8, 1)), ('resnet20', (16, 16, 3)),
                            ('vgg11', (16, 16, 3)))
  def test_variants_reach_every_convolution(self, name, shape):
    model = keras_models.build_model(
        name, shape, 10,
        gate=gated_conv.GateSpec(input='identity', batch_stats='full'))
    convs = [l for l in model.layers if isinstance(l, gated_conv.GatedConv2D)]
    self.assertEqual({(l.gate.input, l.gate.batch_stats) for l in convs},
                     {('identity', 'full')})

  @parameterized.parameters(20, 32, 56)
  def test_resnet_parameter_counts(self, depth):
    model = keras_models.build_model(f'resnet{depth}', (32, 32, 3), 10)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    self.assertEqual(trainable, resnet_trainable(depth))

  def test_resnet32_has_the_papers_size(self):
    dense = keras_models.build_model('resnet32', (32, 32, 3), 10)
    gated = keras_models.build_model(
        'resnet32', (32, 32, 3), 10, gate=gated_conv.GateSpec())
    self.assertEqual(dense.count_params(), 466_426)  # ~0.46M, as the paper.
    self.assertEqual(sum(int(np.prod(v.shape)) for v in
                         model_state.global_weights(gated).trainable), 516_538)

  def test_cnn_and_vgg_counts(self):
    cnn = keras_models.build_model('cnn', (28, 28, 1), 10)
    self.assertEqual(cnn.count_params(),
                     (9 * 16 + 4 * 16) + (9 * 16 * 32 + 4 * 32)
                     + (9 * 32 * 64 + 4 * 64) + 64 * 10 + 10)
    vgg = keras_models.build_model('vgg11', (32, 32, 3), 10)
    self.assertEqual(vgg.count_params(), 9_759_178)

  def test_resnet_loads_from_keras_file_in_safe_mode(self):
    model = keras_models.build_resnet(
        20, gate=gated_conv.GateSpec.from_flags(keep_ratio=0.5))
    path = self.create_tempfile(file_path='resnet.keras').full_path
    model.save(path)
    loaded = tf.keras.models.load_model(path, safe_mode=True)
    x = tf.random.normal((2, 32, 32, 3))
    np.testing.assert_array_equal(loaded(x, training=False),
                                  model(x, training=False))

  def test_unknown_model_and_bad_depth(self):
    with self.assertRaisesRegex(ValueError, 'unknown model'):
      keras_models.build_model('alexnet', (32, 32, 3), 10)
    with self.assertRaisesRegex(ValueError, '6n \\+ 2'):
      keras_models.build_resnet(33)


if __name__ == '__main__':
  absltest.main()

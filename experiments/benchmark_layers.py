"""Benchmark of the gated layers: training step time and inference FLOPs.

  python -m experiments.benchmark_layers [--steps=30] [--batch_size=64]

Prints, measured in this run on this machine: the training step time of
ResNet-32 (32x32x3, batch 64) dense vs gated at keep ratios 0.5/0.7/1.0 with
their ratio, and the dynamic inference FLOPs ratio of gated ResNet-32 and
VGG-11 at keep 0.5 and 0.7 (and of the CNN on real Fashion-MNIST test images
when Debian's dataset-fashion-mnist is installed). Gates are untrained (He
initialised, as at the start of training), inputs standard normal unless
stated.
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import flops  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer('steps', 30, 'Timed training steps per model.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Training batch size.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'Alternating timing rounds; the median is reported.'
)


def _train_step_fn(model):
  optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  return step


def _time_steps(step, x, y, steps):
  step(x, y).numpy()  # Trace and warm up.
  step(x, y).numpy()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step(x, y)
  loss.numpy()
  return (time.perf_counter() - start) / steps


def benchmark_training(batch_size, steps, repeats):
  x = tf.random.normal([batch_size, 32, 32, 3])
  y = tf.random.uniform([batch_size], 0, 10, tf.int32)
  variants = {'dense': None}
  for ratio in (0.5, 0.7, 1.0):
    variants[f'gated keep {ratio}'] = gated_conv.GateSpec(keep_ratio=ratio)
  steps_fns = {}
  for name, gate in variants.items():
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model('resnet32', (32, 32, 3), 10, gate)
    steps_fns[name] = _train_step_fn(model)
  times = {name: [] for name in variants}
  for _ in range(repeats):  # Alternate to share any drift in machine load.
    for name, step in steps_fns.items():
      times[name].append(_time_steps(step, x, y, steps))
  medians = {name: float(np.median(t)) for name, t in times.items()}
  print(f'ResNet-32 training step, batch {batch_size}, 32x32x3, '
        f'median of {repeats} x {steps} steps:')
  for name, seconds in medians.items():
    print(f'  {name:16s} {seconds * 1e3:8.1f} ms  '
          f'{seconds / medians["dense"]:.3f}x dense')
  return medians


def benchmark_flops():
  images = tf.data.Dataset.from_tensor_slices(
      tf.random.normal([512, 32, 32, 3], seed=1)).batch(128)
  print('Dynamic inference FLOPs / dense FLOPs (random inputs, 512 samples):')
  for name in ('resnet32', 'vgg11'):
    dense = keras_models.build_model(name, (32, 32, 3), 10)
    line = f'  {name:9s} dense {flops.dense_flops(dense) / 1e6:7.1f} MFLOPs'
    for ratio in (0.5, 0.7):
      tf.keras.utils.set_random_seed(0)
      model = keras_models.build_model(
          name, (32, 32, 3), 10,
          gate=gated_conv.GateSpec.from_flags(keep_ratio=ratio))
      line += f'   keep {ratio}: {flops.dynamic_flops_ratio(model, images):.3f}'
    print(line)
  try:
    source = data.load_source('fashion_mnist')
  except data.DataSourceError as e:
    print(f'  cnn on Fashion-MNIST skipped: {e}')
    return
  test = data.federate(source, 1, 'iid').test_dataset(500)
  line = '  cnn on Fashion-MNIST test set (10000 real images):'
  for ratio in (0.5, 0.7):
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model(
        'cnn', (28, 28, 1), 10,
        gate=gated_conv.GateSpec.from_flags(keep_ratio=ratio))
    line += f'   keep {ratio}: {flops.dynamic_flops_ratio(model, test):.3f}'
  print(line)


def main(argv):
  del argv
  print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores')
  benchmark_training(_BATCH.value, _STEPS.value, _REPEATS.value)
  benchmark_flops()


if __name__ == '__main__':
  app.run(main)

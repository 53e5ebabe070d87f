"""Benchmark of the gated layers: training step time, memory, inference FLOPs.

  python -m experiments.benchmark_layers [--steps=10] [--batch_size=64] \
      [--models=cnn,resnet32,vgg11] [--nomemory]

Prints, measured in this run on this machine: the Keras training step time
(tf.function, no XLA) of each of --models on 28x28x1 images (a Fashion-MNIST
batch when Debian's dataset-fashion-mnist is installed), dense and gated at
keep 0.7 and 0.5, as the layers are called (--compact_training=off) and
through the compact path (step), alternating between the variants, with
their ratio to dense and the peak memory of a step (RSS of a fresh process
over its first three steps above its RSS after tracing); then the dynamic inference
FLOPs ratio of gated ResNet-32 and VGG-11 at keep 0.5 and 0.7 (and of the
CNN on real Fashion-MNIST test images when installed). Gates are untrained
(He initialised, as at the start of training), inputs standard normal
unless stated.
"""

import multiprocessing
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import compact_training  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import flops  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed training steps per model.')
_MODELS = flags.DEFINE_list('models', ['cnn', 'resnet32', 'vgg11'],
                            'Models whose training step is timed.')
_MEMORY = flags.DEFINE_bool(
    'memory', True, 'Also measure each variant\'s step peak memory (a child'
    ' process each).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Training batch size.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'Alternating timing rounds; the median is reported.'
)


def _train_step_fn(model, compact):
  """A training step of `model`, through the compact path if `compact`."""
  optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  forward = compact_training.CompactModel(model) if compact else None

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      logits = forward(x, True).logits if forward else model(x, training=True)
      loss = loss_fn(y, logits)
    grads = [tf.convert_to_tensor(g)
             for g in tape.gradient(loss, model.trainable_variables)]
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


# (name, keep ratio or None for dense, compact) of each variant.
VARIANTS = (('dense', None, False),) + tuple(
    (f'keep {ratio} {"step" if compact else "off"}', ratio, compact)
    for ratio in (0.7, 0.5) for compact in (False, True))
SHAPE = (28, 28, 1)


def _batch(batch_size):
  """A Fashion-MNIST training batch if installed (gates see real images)."""
  try:
    source = data.load_source('fashion_mnist')
    fed = data.federate(source, 1, 'iid')
    x, y = next(iter(fed.client_train_dataset(0, batch_size)))
    return x, y, 'Fashion-MNIST'
  except data.DataSourceError:
    return (tf.random.normal([batch_size, *SHAPE]),
            tf.random.uniform([batch_size], 0, 10, tf.int32), 'random normal')


def _model(name, ratio):
  tf.keras.utils.set_random_seed(0)
  gate = None if ratio is None else gated_conv.GateSpec(keep_ratio=ratio)
  return keras_models.build_model(name, SHAPE, 10, gate)


def _step_memory(name, ratio, compact, batch_size, queue):
  """Child process: RSS after tracing and the peak over its first 3 steps.

  The kernel's peak-RSS mark is reset first (`/proc/self/clear_refs`), so
  the peak is the steps', not the data loading's.
  """
  x, y, _ = _batch(batch_size)
  step = _train_step_fn(_model(name, ratio), compact)
  step.get_concrete_function(x, y)  # Traced, not yet run.
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  before = _status_bytes('VmRSS')
  for _ in range(3):
    step(x, y).numpy()
  queue.put((before, _status_bytes('VmHWM')))


def _status_bytes(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def peak_step_memory(name, ratio, compact, batch_size):
  """Peak RSS of a training step above the traced model's (a fresh child)."""
  context = multiprocessing.get_context('spawn')
  queue = context.Queue()
  child = context.Process(target=_step_memory,
                          args=(name, ratio, compact, batch_size, queue))
  child.start()
  before, peak = queue.get()
  child.join()
  return peak - before


def benchmark_training(name, batch_size, steps, repeats, memory):
  x, y, images = _batch(batch_size)
  steps_fns = {variant: _train_step_fn(_model(name, ratio), compact)
               for variant, ratio, compact in VARIANTS}
  times = {variant: [] for variant in steps_fns}
  for _ in range(repeats):  # Alternate to share any drift in machine load.
    for variant, step in steps_fns.items():
      times[variant].append(_time_steps(step, x, y, steps))
  medians = {v: float(np.median(t)) for v, t in times.items()}
  print(f'{name} training step, batch {batch_size}, {images} 28x28x1, '
        f'median of {repeats} x {steps} steps (untrained gates):')
  for variant, ratio, compact in VARIANTS:
    seconds = medians[variant]
    line = (f'  {variant:16s} {seconds * 1e3:8.1f} ms  '
            f'{seconds / medians["dense"]:.3f}x dense')
    if memory:
      line += (f'   step peak memory'
               f' {peak_step_memory(name, ratio, compact, batch_size) / 2**20:7.1f}'
               ' MiB')
    print(line, flush=True)
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
  for name in _MODELS.value:
    benchmark_training(name, _BATCH.value, _STEPS.value, _REPEATS.value,
                       _MEMORY.value)
  benchmark_flops()


if __name__ == '__main__':
  app.run(main)

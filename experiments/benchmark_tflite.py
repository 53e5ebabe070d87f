"""TFLite latency of dense vs gated models, batch 1, in one run.

  python -m experiments.benchmark_tflite [--models=resnet32,cnn] \\
      [--keep_ratios=0.5,0.7,1.0] [--threads=1,4] [--invokes=200]

For each model (ResNet-32 at CIFAR shape, the CNN at Fashion-MNIST shape) the
dense model and the gated model at each keep ratio are exported with
tff_fedprune.export.tflite from the same weights, then timed in the TFLite
interpreter: median of --invokes invokes after --warmup, per thread count,
with XNNPACK (the interpreter's default delegate) and without. Also printed:
flatbuffer size and FLOPs per image (for the gated model what the export
computes: k channels per gated layer, plus the gates). Weights are random: the cost of a gated layer depends
on k, not on which channels are kept.
"""

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import flops  # pylint: disable=g-import-not-at-top
from tff_fedprune.export import tflite  # pylint: disable=g-import-not-at-top

_MODELS = flags.DEFINE_list('models', ['resnet32', 'cnn'], 'Models to time.')
_KEEP_RATIOS = flags.DEFINE_list('keep_ratios', ['0.5', '0.7', '1.0'],
                                 'Keep ratios of the gated exports.')
_THREADS = flags.DEFINE_list('threads', ['1', '4'], 'Interpreter threads.')
_INVOKES = flags.DEFINE_integer('invokes', 200, 'Timed invokes per setting.')
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Untimed invokes first.')
_SHAPES = {'resnet32': (32, 32, 3), 'resnet20': (32, 32, 3),
           'resnet56': (32, 32, 3), 'vgg11': (32, 32, 3), 'cnn': (28, 28, 1)}


def median_ms(model_content, image, threads, xnnpack):
  runner = tflite.interpreter(
      model_content, num_threads=threads, xnnpack=xnnpack
  ).get_signature_runner(tflite.SIGNATURE)
  for _ in range(_WARMUP.value):
    runner(images=image)
  times = []
  for _ in range(_INVOKES.value):
    start = time.perf_counter()
    runner(images=image)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv):
  del argv
  tf.get_logger().setLevel('ERROR')
  threads = [int(t) for t in _THREADS.value]
  print(f'TFLite {tf.__version__}, batch 1, median of {_INVOKES.value}'
        f' invokes; {os.cpu_count()} CPU cores')
  header = ('| model | variant | size KB | MFLOPs | '
            + ' | '.join(f'{t} thr XNNPACK ms | {t} thr builtin ms'
                         for t in threads)
            + ' | speed-up vs dense (1 thr, XNNPACK) |')
  print(header)
  print('|' + ' --- |' * (header.count('|') - 1))
  for name in _MODELS.value:
    shape = _SHAPES[name]
    tf.keras.utils.set_random_seed(0)
    gated = keras_models.build_model(name, shape, 10, gated=True)
    image = np.random.default_rng(0).uniform(0, 255, (1,) + shape)
    image = image.astype(np.float32)
    mean, std = np.full(shape[-1], 127.5), np.full(shape[-1], 64.0)
    variants = [('dense', None)] + [
        (f'gated keep {r}', float(r)) for r in _KEEP_RATIOS.value
    ]
    dense_ms = None
    for label, rho in variants:
      content = tflite.convert(tflite.inference_function(
          gated, mean, std, keep_ratio=rho, dense=rho is None))
      mflops = (flops.dense_flops(gated) if rho is None
                else flops.top_k_flops(gated, rho))
      cells = []
      for t in threads:
        for xnnpack in (True, False):
          cells.append(median_ms(content, image, t, xnnpack))
      if dense_ms is None:
        dense_ms = cells[0]
      print(f'| {name} | {label} | {len(content) / 1024:.0f} |'
            f' {mflops / 1e6:.2f} | '
            + ' | '.join(f'{c:.3f}' for c in cells)
            + f' | {dense_ms / cells[0]:.2f}x |', flush=True)
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

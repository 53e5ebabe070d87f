"""Phone-runtime latency of dense, dynamic and static exports, in one run.

  python -m experiments.benchmark_tflite [--models=resnet32,vgg11,cnn] \\
      [--keep_ratios=0.5,0.7] [--channel_multiples=1,8] [--invokes=100]

For each model (ResNet-32 and VGG-11 at CIFAR shape, the CNN at
Fashion-MNIST shape) the exports of tff_fedprune.export.tflite are built from
the same random weights and timed at batch 1 on one thread, median of
--invokes invokes after --warmup (input set once, `invoke` alone timed):

* dense: every channel, constant weights;
* dynamic: each gated layer keeps its top k per input (TOPK_V2, GATHER);
* dynamic, --gate_min_flops policy: layers below it keep every channel;
* static: a fixed channel set per gated layer (what `--mode=static` of
  experiments.export_tflite writes), k rounded to each --channel_multiples;
  for ResNets with each `--residual` form: full (every gated layer pruned,
  the residual stream full width), inner (only each block's first
  convolution pruned) and shared (the residual stream narrowed to one set
  per stage).

Runtimes, side by side: LiteRT (`ai-edge-litert`, what Android apps ship)
with its default XNNPACK delegate, the headline; LiteRT without it; and TF's
own `tf.lite.Interpreter` with XNNPACK. Also printed: flatbuffer size and
FLOPs per image as the export computes them (kept channels plus the gates).
Weights are random: the cost of a layer depends on how many channels it
computes, not on which.

With --per_layer, each stride-1 gated layer shape of the models is also
timed alone in every formulation of "compute only the top-k output
channels" tried for XNNPACK: gathered filters (what the dynamic export
does; a CONV_2D with runtime filters, which XNNPACK does not take), an
im2col BATCH_MATMUL and a per-tap BATCH_MATMUL (runtime right-hand sides,
which it does take), against the dense convolution and the dense
convolution scaled by the saliency (`--gate_min_flops`'s full-width form).
"""

import itertools
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import tflite  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import flops  # pylint: disable=g-import-not-at-top

_MODELS = flags.DEFINE_list('models', ['resnet32', 'vgg11', 'cnn'],
                            'Models to time.')
_KEEP_RATIOS = flags.DEFINE_list('keep_ratios', ['0.5', '0.7'],
                                 'Keep ratios of the gated exports.')
_CHANNEL_MULTIPLES = flags.DEFINE_list(
    'channel_multiples', ['1', '8'],
    'Static exports round each layer\'s k to these multiples.')
_GATE_MIN_FLOPS = flags.DEFINE_float(
    'gate_min_flops', tflite.DEFAULT_GATE_MIN_FLOPS,
    'Policy of the second dynamic variant (see experiments.export_tflite).')
_PER_LAYER = flags.DEFINE_bool(
    'per_layer', True, 'Also time each layer shape of the models at the'
    ' first keep ratio in every formulation of a dynamic top-k.')
_THREADS = flags.DEFINE_integer('threads', 1, 'Interpreter threads.')
_INVOKES = flags.DEFINE_integer('invokes', 100, 'Timed invokes per setting.')
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Untimed invokes first.')
_SHAPES = {'resnet32': (32, 32, 3), 'resnet20': (32, 32, 3),
           'resnet56': (32, 32, 3), 'vgg11': (32, 32, 3), 'cnn': (28, 28, 1)}
# (label, runtime, XNNPACK); the first is the headline.
_RUNTIMES = (('LiteRT XNNPACK', 'litert', True),
             ('LiteRT builtin', 'litert', False),
             ('TF 2.14 XNNPACK', 'tensorflow', True))


def median_ms(model_content, image, runtime, xnnpack):
  return tflite.median_latency_ms(
      model_content, image, runtime=runtime, xnnpack=xnnpack,
      num_threads=_THREADS.value, warmup=_WARMUP.value,
      invokes=_INVOKES.value)


def variants(model):
  """(label, inference_function kwargs, kept channels per layer or None)."""
  gated = gated_conv.gated_layers(model)
  # Which channels a static layer keeps does not change its cost.
  calibration = tf.data.Dataset.from_tensor_slices(np.random.default_rng(1)
      .normal(size=(8,) + model.input_shape[1:]).astype(np.float32)).batch(8)
  residuals = (channel_maps.RESIDUALS if model.name.startswith('resnet')
               else ('full',))
  yield 'dense', dict(dense=True), None
  for rho in map(float, _KEEP_RATIOS.value):
    top_k = {l.name: int(gated_conv.num_kept(rho, l.filters)) for l in gated}
    yield f'dynamic {rho}', dict(keep_ratio=rho), top_k
    policy = channel_maps.gate_policy(model, _GATE_MIN_FLOPS.value)
    if policy:
      yield (f'dynamic {rho}, policy', dict(keep_ratio=rho, channels=policy),
             dict(top_k, **{n: model.get_layer(n).filters for n in policy}))
    for multiple, residual in itertools.product(
        map(int, _CHANNEL_MULTIPLES.value), residuals):
      channels = channel_maps.static_channels(model, calibration, rho, multiple,
                                        residual)
      label = f'static {rho}' + (f', {residual} residual'
                                 if len(residuals) > 1 else '')
      label += f', k multiple of {multiple}' if multiple > 1 else ''
      yield label, dict(channels=channels), {
          n: model.get_layer(n).filters if c is channel_maps.ALL_CHANNELS
          else len(c) for n, c in channels.items()}


def layer_formulations(h, cin, cout, k_in, k_out, rng):
  """Single-layer graphs: ways to compute a 3x3 convolution's top-k outputs.

  The full-width forms read all `cin` input channels; the top-k forms `k_in`
  of them (compact, as after a gated layer). Returns (name, function, input
  channels).
  """
  kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
  gate = rng.normal(size=(cin, cout)).astype(np.float32)
  rows = kernel[:, :, :k_in]
  ohwi = np.ascontiguousarray(rows.transpose(3, 0, 1, 2))
  taps = np.ascontiguousarray(ohwi.reshape(cout, 9, k_in))

  def saliency_top_k(x):
    pooled = tf.reduce_mean(x, [1, 2])
    s = tf.nn.relu(tf.matmul(pooled, gate[:x.shape[-1]]))
    return s, tf.math.top_k(s[0], k_out)

  def dense(x):
    return tf.nn.relu(tf.nn.conv2d(x, kernel, 1, 'SAME'))

  def saliency_scaled(x):
    s, _ = saliency_top_k(x)
    y = tf.nn.conv2d(x, kernel, 1, 'SAME')
    return tf.nn.relu(y * tf.reshape(s, [1, 1, 1, cout]))

  def gathered_filters(x):
    _, (s, kept) = saliency_top_k(x)
    w = tf.gather(ohwi, kept) * tf.reshape(s, [k_out, 1, 1, 1])
    return tf.nn.relu(tf.nn.conv2d(x, tf.transpose(w, [1, 2, 3, 0]), 1,
                                   'SAME'))

  def im2col_matmul(x):
    _, (s, kept) = saliency_top_k(x)
    w = tf.reshape(tf.gather(ohwi, kept) * tf.reshape(s, [k_out, 1, 1, 1]),
                   [k_out, 9 * k_in])
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    columns = tf.concat([padded[:, i:i + h, j:j + h, :]
                         for i in range(3) for j in range(3)], -1)
    y = tf.linalg.matmul(tf.reshape(columns, [1, h * h, 9 * k_in]),
                         tf.transpose(w)[tf.newaxis])
    return tf.nn.relu(tf.reshape(y, [1, h, h, k_out]))

  def tap_matmul(x):
    _, (s, kept) = saliency_top_k(x)
    w = tf.gather(taps, kept) * tf.reshape(s, [k_out, 1, 1])
    w = tf.reshape(tf.transpose(w, [2, 1, 0]), [1, k_in, 9 * k_out])
    y = tf.linalg.matmul(tf.reshape(x, [1, h * h, k_in]), w)
    y = tf.pad(tf.reshape(y, [1, h, h, 9 * k_out]),
               [[0, 0], [1, 1], [1, 1], [0, 0]])
    out = 0.0
    for t in range(9):
      i, j = divmod(t, 3)
      out += y[:, i:i + h, j:j + h, t * k_out:(t + 1) * k_out]
    return tf.nn.relu(out)

  return [('dense', dense, cin), ('saliency-scaled', saliency_scaled, cin),
          ('gathered filters', gathered_filters, k_in),
          ('im2col matmul', im2col_matmul, k_in),
          ('tap matmul', tap_matmul, k_in)]


def _logits(function):
  return lambda images: {'logits': function(images)}


def per_layer(keep_ratio):
  """Each zoo layer shape at keep_ratio: every formulation, LiteRT XNNPACK."""
  rng = np.random.default_rng(0)
  shapes = []
  for name in _MODELS.value:
    model = keras_models.build_model(
        name, _SHAPES[name], 10, gate=gated_conv.GateSpec())
    for layer in gated_conv.gated_layers(model):
      shape = (layer.output_shape[1], layer.input_shape[-1], layer.filters,
               gated_conv.feeding_gate(layer) is not None)
      if layer.strides == 1 and shape not in shapes:
        shapes.append(shape)
  header = None
  for h, cin, cout, compact in shapes:
    k_in = int(gated_conv.num_kept(keep_ratio, cin)) if compact else cin
    k_out = int(gated_conv.num_kept(keep_ratio, cout))
    cells = []
    for label, function, width in layer_formulations(h, cin, cout, k_in,
                                                     k_out, rng):
      module = tf.Module()
      module.serve = tf.function(
          _logits(function),
          input_signature=[tf.TensorSpec([1, h, h, width], tf.float32,
                                         'images')]).get_concrete_function()
      image = rng.normal(size=(1, h, h, width)).astype(np.float32)
      cells.append((label, median_ms(tflite.convert(module), image, 'litert',
                                     True)))
    if header is None:
      header = ('| layer (HxW, C_in -> C_out) | MFLOPs | '
                + ' | '.join(f'{l} ms' for l, _ in cells)
                + ' | best top-k / dense |')
      print(f'\nPer layer at keep {keep_ratio}, LiteRT XNNPACK, 1 thread'
            ' ("dense": every channel, constant filter):')
      print(header)
      print('|' + ' --- |' * (header.count('|') - 1))
    best = min(ms for l, ms in cells[2:])
    print(f'| {h}x{h}, {k_in}/{cin} -> {cout} |'
          f' {2 * h * h * 9 * cin * cout / 1e6:.1f} | '
          + ' | '.join(f'{ms:.3f}' for _, ms in cells)
          + f' | {best / cells[0][1]:.2f} |', flush=True)


def main(argv):
  del argv
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.ERROR)
  import ai_edge_litert  # pylint: disable=g-import-not-at-top,unused-import
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  print(f'LiteRT {metadata.version("ai-edge-litert")}, TF {tf.__version__};'
        f' batch 1, {_THREADS.value} thread(s), median of {_INVOKES.value}'
        f' invokes; {os.cpu_count()} CPU cores')
  header = ('| model | export | size KB | MFLOPs | '
            + ' | '.join(f'{label} ms' for label, _, _ in _RUNTIMES)
            + ' | speed-up vs dense (LiteRT XNNPACK) |')
  print(header)
  print('|' + ' --- |' * (header.count('|') - 1))
  for name in _MODELS.value:
    shape = _SHAPES[name]
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model(
        name, shape, 10, gate=gated_conv.GateSpec())
    image = np.random.default_rng(0).uniform(0, 255, (1,) + shape)
    image = image.astype(np.float32)
    mean, std = np.full(shape[-1], 127.5), np.full(shape[-1], 64.0)
    dense_ms = None
    for label, kwargs, kept in variants(model):
      content = tflite.convert(
          tflite.inference_function(model, mean, std, **kwargs))
      mflops = (flops.dense_flops(model) if kept is None
                else flops.kept_flops(model, kept)) / 1e6
      cells = [median_ms(content, image, runtime, xnnpack)
               for _, runtime, xnnpack in _RUNTIMES]
      dense_ms = dense_ms or cells[0]
      print(f'| {name} | {label} | {len(content) / 1024:.0f} |'
            f' {mflops:.2f} | ' + ' | '.join(f'{c:.3f}' for c in cells)
            + f' | {dense_ms / cells[0]:.2f}x |', flush=True)
  if _PER_LAYER.value:
    per_layer(float(_KEEP_RATIOS.value[0]))
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

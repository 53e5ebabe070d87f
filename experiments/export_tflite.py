"""Exports a trained model to TFLite for phones, and verifies the export.

  python -m experiments.export_tflite --model_dir=RUN_DIR/model \\
      --output=model.tflite [--mode=static|dynamic] [--keep_ratio=0.7] \\
      [--quantize=none|float16|dynamic_int8]

Writes --output and --dense_output (default: OUTPUT_dense.tflite), the same
weights without gates. Both take raw pixels of shape (1, H, W, C) as input
`images` and return `logits` through the `serving_default` signature
(tff_fedprune.export.tflite):

* `--mode=static` (default, the phone path): a device-specialised model.
  Each gated layer keeps the k channels its gates select most often on the
  device's own data (the run's client `--calibration_client`, or
  `--calibration_images` of the dataset's training set; never the test
  images it is scored on): constant, smaller convolutions without top-k,
  gather or scatter, which XNNPACK runs. The federation trains one dynamic
  model; each device gets the sub-model its data uses.
* `--mode=dynamic`: every gated layer computes only its top-k channels for
  each input, as the model trained (`--gate_min_flops` exports smaller
  layers at full width, still scaled by their saliency); slower than dense
  on LiteRT (docs/export.md).

Before writing, the export is checked against the Keras model (for
`static`, `channels.reference_model`: each top-k replaced by the fixed
set) on random inputs and on real test images of the model's dataset: float32
exports must agree to 1e-4 on every logit of the random inputs and on top-1
for 99.5% of the real images (else nothing is written and the exit code is
1; a non-finite logit difference fails every export); quantized exports
report their accuracy change. `static` also reports the accuracy of the
dynamic model on the same images. Both files are written or neither
(`files.write_together`); bad flags, or --output and --dense_output naming
one file or a directory, are one `error:` line and exit 2.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.
from tff_fedprune import files  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
# TFF (imported with the model zoo) must be imported before absl runs main,
# or Keras cannot deserialise functional models afterwards.
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top,unused-import
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import model_state  # pylint: disable=g-import-not-at-top
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import tflite  # pylint: disable=g-import-not-at-top

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'A run\'s model/ directory (model.keras and'
    ' preprocessing.json).', required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'The gated .tflite file.',
                              required=True)
_DENSE_OUTPUT = flags.DEFINE_string(
    'dense_output', None, 'The dense .tflite file of the same weights'
    ' (default: next to --output with a _dense suffix).')
_KEEP_RATIO = flags.DEFINE_float(
    'keep_ratio', None, 'Keep ratio of every gated layer (default: the'
    ' model\'s own).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none',
                              ['none', 'float16', 'dynamic_int8'],
                              'Post-training quantization of both files.')
_MODE = flags.DEFINE_enum('mode', 'static', ['static', 'dynamic'],
                          'A fixed channel set per layer calibrated on the'
                          ' device\'s data, or per-input top-k channels.')
_CALIBRATION_CLIENT = flags.DEFINE_integer(
    'calibration_client', None, 'static: calibrate on this client\'s'
    ' training split of the run (partition read from the run\'s'
    ' config.json, next to --model_dir).')
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    'calibration_images', 2000, 'static: calibrate on this many images of'
    ' the dataset\'s training set (when no --calibration_client).')
_CHANNEL_MULTIPLE = flags.DEFINE_integer(
    'channel_multiple', 1, 'static: round each layer\'s k to the nearest'
    ' multiple (XNNPACK computes channels in tiles of 8 or 16).')
_RESIDUAL = flags.DEFINE_enum(
    'residual', 'full', list(channel_maps.RESIDUALS),
    'static, residual networks:'
    ' prune every gated layer (full-width residual stream), only the'
    ' layers inside blocks (inner), or also narrow the residual stream to'
    ' one channel set per stage (shared: fastest, costs accuracy).')
_GATE_MIN_FLOPS = flags.DEFINE_float(
    'gate_min_flops', tflite.DEFAULT_GATE_MIN_FLOPS, 'dynamic: gated layers'
    ' whose dense convolution costs fewer FLOPs per image are exported with'
    ' every channel (scaled by their saliency, no top-k).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Where the dataset\'s test images are (default: the'
    ' dataset\'s standard location).')
_NUM_REAL = flags.DEFINE_integer('num_real', 1000,
                                 'Real test images to verify on.')
_NUM_RANDOM = flags.DEFINE_integer('num_random', 100,
                                   'Random inputs to verify on.')

MAX_ABS_DIFF = 1e-4
MIN_TOP1_AGREEMENT = 0.995


class ExportError(ValueError):
  """The model cannot be exported or its export does not match it."""


def load(model_dir):
  """(Keras model, preprocessing dict) of a run's model directory."""
  paths = [os.path.join(model_dir, n)
           for n in ('model.keras', 'preprocessing.json')]
  for path in paths:
    if not os.path.exists(path):
      raise ExportError(f'{path} not found: --model_dir must be the model/'
                        ' directory of a finished run')
  try:
    with open(paths[1], encoding='utf-8') as f:
      preprocessing = json.load(f)
    model = tf.keras.models.load_model(paths[0])
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(
        f'cannot read the model in {model_dir} ({type(e).__name__}: {e})'
        .splitlines()[0]
    ) from e
  check_preprocessing(preprocessing, model, paths[1])
  return model, preprocessing


def check_preprocessing(preprocessing, model, path) -> None:
  """Raises ExportError unless mean and std normalise the model's input."""
  channels = model.input_shape[-1]
  try:
    mean = np.asarray(preprocessing['mean'], np.float64)
    std = np.asarray(preprocessing['std'], np.float64)
    preprocessing['dataset']  # pylint: disable=pointless-statement
  except (KeyError, TypeError, ValueError) as e:
    raise ExportError(f'{path} lacks dataset, mean or std ({e})') from None
  for name, value in (('mean', mean), ('std', std)):
    if value.size not in (1, channels) or not np.all(np.isfinite(value)):
      raise ExportError(f'{path}: {name} must be 1 or {channels} finite'
                        f' numbers, got {value.tolist()}')
  if not np.all(std > 0):
    raise ExportError(f'{path}: std must be > 0, got {std.tolist()}')


def calibration_images(model_dir, source, preprocessing, client, count,
                       expected_shape):
  """Normalised training images of the device: a client's split or a sample."""
  train = source.train.images
  if client is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)),
                        'config.json')
    try:
      with open(path) as f:
        run = json.load(f)
      federated = data.federate(
          source, run['num_clients'], run['partition'], run['seed'],
          dirichlet_alpha=run.get('dirichlet_alpha', 0.5),
          classes_per_client=run.get('classes_per_client', 2))
    except (OSError, KeyError, ValueError) as e:
      raise ExportError(f'--calibration_client needs the run\'s config.json'
                        f' next to --model_dir: {path} ({e})') from e
    if not 0 <= client < federated.num_clients:
      raise ExportError(f'--calibration_client must be in [0,'
                        f' {federated.num_clients}), got {client}')
    images = train[federated.client_train[client]]
  else:
    if count < 1:
      raise ExportError(f'--calibration_images must be >= 1, got {count}')
    order = np.random.default_rng(0).permutation(len(train))[:count]
    images = train[np.sort(order)]
  if images.shape[1:] != tuple(expected_shape):
    raise ExportError(
        f'calibration images of shape {images.shape[1:]} do not fit the'
        f' model\'s input {tuple(expected_shape)}')
  return ((images.astype(np.float32) - np.asarray(preprocessing['mean']))
          / np.asarray(preprocessing['std'])).astype(np.float32)


def export(model, preprocessing, keep_ratio, quantize, data_dir, num_real,
           num_random, mode='static', calibration=None, channel_multiple=1,
           gate_min_flops=tflite.DEFAULT_GATE_MIN_FLOPS, model_dir=None,
           residual='full'):
  """(gated bytes, dense bytes, list of report lines); raises ExportError.

  `calibration` (static mode): (client or None, image count).
  """
  if keep_ratio is not None:
    if not 0 < keep_ratio <= 1:
      raise ExportError(f'--keep_ratio must be in (0, 1], got {keep_ratio}')
    model_state.set_keep_ratio(model, keep_ratio)
  gated = gated_conv.gated_layers(model)
  if mode == 'static' and not gated:
    raise ExportError('--mode=static needs a gated model; this one has no'
                      ' gated layers')
  if channel_multiple < 1:
    raise ExportError(
        f'--channel_multiple must be >= 1, got {channel_multiple}')
  mean = np.asarray(preprocessing['mean'], np.float32)
  std = np.asarray(preprocessing['std'], np.float32)
  source, images = _test_images(model, preprocessing, data_dir, num_real,
                                num_random, mode)
  if mode == 'static':
    channels, lines = _static_channels(
        model, model_dir, source, preprocessing, calibration,
        channel_multiple, residual)
  else:
    channels = channel_maps.gate_policy(model, gate_min_flops)
    lines = ['exported at full width (--gate_min_flops): '
             + ', '.join(channels)] if channels else []
  contents = [_convert(model, mean, std, channels, quantize, dense)
              for dense in (False, True)]
  if gated:
    ratios = sorted({round(float(l.keep_ratio.numpy()), 4) for l in gated})
    lines.append(f'{mode} export: keep ratio {ratios}, {len(contents[0])}'
                 f' bytes; dense export: {len(contents[1])} bytes')
  else:
    lines.append('the model has no gated layers')
  references = [(mode, model, contents[0], channels)] if gated else []
  references.append(('dense', tflite.ungated_copy(model), contents[1], None))
  for name, reference, content, fixed in references:
    check, on_real = _verify(name, reference, content, images, mean, std,
                             fixed, quantize)
    lines += check
    if name == 'static':
      real, labels = images['real']
      dynamic = tflite.keras_logits(model, real, mean, std).argmax(-1)
      lines.append(
          f'accuracy on {len(real)} real test images: static (TFLite)'
          f' {on_real["tflite_accuracy"]:.2%}, dynamic model (Keras)'
          f' {np.mean(dynamic == labels):.2%}')
  return contents[0], contents[1], lines


def _test_images(model, preprocessing, data_dir, num_real, num_random, mode):
  """(source, {'random': (images, None), 'real': (images, labels)})."""
  try:
    source = data.load_source(preprocessing['dataset'], data_dir)
  except data.DataSourceError as e:
    raise ExportError(
        f'real images are needed to {"calibrate and " * (mode == "static")}'
        f'verify: {e}') from e
  if source.test.images.shape[1:] != tuple(model.input_shape[1:]):
    raise ExportError(
        f'{preprocessing["dataset"]} test images of shape'
        f' {source.test.images.shape[1:]} do not fit the model\'s input'
        f' {tuple(model.input_shape[1:])}')
  mean = np.asarray(preprocessing['mean'], np.float32)
  std = np.asarray(preprocessing['std'], np.float32)
  rng = np.random.default_rng(0)
  shape = (num_random,) + tuple(model.input_shape[1:])
  random = (mean + std * rng.uniform(-2, 2, shape)).astype(np.float32)
  real = source.test.images[:num_real].astype(np.float32)
  return source, {'random': (random, None),
                  'real': (real, source.test.labels[:num_real])}


def _static_channels(model, model_dir, source, preprocessing, calibration,
                     channel_multiple, residual):
  """(channel map calibrated on the device's data, report lines)."""
  images = calibration_images(model_dir, source, preprocessing,
                              *(calibration or (None, 2000)),
                              expected_shape=model.input_shape[1:])
  channels = channel_maps.static_channels(
      model, tf.data.Dataset.from_tensor_slices(images).batch(256),
      channel_multiple=channel_multiple, residual=residual)
  line = f'static channels from {len(images)} training images: ' + ', '.join(
      f'{n} ' + ('all' if c is channel_maps.ALL_CHANNELS else
                 f'{len(c)}/{model.get_layer(n).output_shape[-1]}')
      for n, c in channels.items())
  return channels, [line]


def _convert(model, mean, std, channels, quantize, dense) -> bytes:
  """The gated (or dense) TFLite file; ExportError if it needs Flex ops."""
  content = tflite.convert(
      tflite.inference_function(model, mean, std, dense=dense,
                                channels=channels), quantize)
  flex = sorted(n for n in tflite.op_names(content)
                if n.startswith('Flex') or n == 'CUSTOM')
  if flex:
    raise ExportError(f'non-builtin ops in the export: {flex}')
  return content


def _verify(name, reference, content, images, mean, std, fixed, quantize):
  """(report lines, real-image comparison) against its Keras reference.

  Raises ExportError if the export does not match.
  """
  random, _ = images['random']
  real, labels = images['real']
  on_random = tflite.compare(reference, content, random, mean, std,
                             channels=fixed)
  on_real = tflite.compare(reference, content, real, mean, std, labels,
                           channels=fixed)
  change = 100 * (on_real['tflite_accuracy'] - on_real['keras_accuracy'])
  check = [
      f'{name}: random inputs ({on_random["images"]}): max |logit diff|'
      f' {on_random["max_abs_diff"]:.2e}, top-1 agreement'
      f' {on_random["top1_agreement"]:.2%}',
      f'{name}: real test images ({on_real["images"]}): max |logit diff|'
      f' {on_real["max_abs_diff"]:.2e}, top-1 agreement'
      f' {on_real["top1_agreement"]:.2%}, accuracy Keras'
      f' {on_real["keras_accuracy"]:.2%} vs TFLite'
      f' {on_real["tflite_accuracy"]:.2%} ({change:+.2f} points)',
  ]
  finite = all(math.isfinite(r[k]) for r in (on_random, on_real)
               for k in ('max_abs_diff', 'top1_agreement'))
  if not finite or quantize == 'none' and not (
      on_random['max_abs_diff'] <= MAX_ABS_DIFF
      and on_real['top1_agreement'] >= MIN_TOP1_AGREEMENT):
    raise ExportError(
        f'the {name} export does not match its Keras model: '
        + '; '.join(check))
  return check, on_real


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_logs()
  dense_output = _DENSE_OUTPUT.value or (
      os.path.splitext(_OUTPUT.value)[0] + '_dense.tflite')
  try:
    files.check_distinct_files([_OUTPUT.value, dense_output])
  except files.UnsafePathError as e:
    raise app.UsageError(f'--output and --dense_output: {e}') from None
  try:
    model, preprocessing = load(_MODEL_DIR.value)
    gated, dense, lines = export(
        model, preprocessing, _KEEP_RATIO.value, _QUANTIZE.value,
        _DATA_DIR.value, _NUM_REAL.value, _NUM_RANDOM.value,
        mode=_MODE.value,
        calibration=(_CALIBRATION_CLIENT.value, _CALIBRATION_IMAGES.value),
        channel_multiple=_CHANNEL_MULTIPLE.value,
        gate_min_flops=_GATE_MIN_FLOPS.value, model_dir=_MODEL_DIR.value,
        residual=_RESIDUAL.value)
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    for path in (_OUTPUT.value, dense_output):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_together(((_OUTPUT.value, gated), (dense_output, dense)))
  except OSError as e:
    print(f'error: cannot write {cli.os_error_message(e)}', file=sys.stderr)
    return 1
  for line in lines:
    print(line)
  print(f'wrote {_OUTPUT.value} and {dense_output}')
  return 0


if __name__ == '__main__':
  cli.run(main)

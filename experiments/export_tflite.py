"""Exports a trained model to TFLite for phones, and verifies the export.

  python -m experiments.export_tflite --model_dir=RUN_DIR/model \\
      --output=model.tflite [--keep_ratio=0.7] \\
      [--quantize=none|float16|dynamic_int8]

Writes --output, in which every gated layer computes only its top-k channels
(tff_fedprune.export.tflite), and --dense_output (default: OUTPUT_dense.tflite),
the same weights without gates. Both take raw pixels of shape (1, H, W, C) as
input `images` and return `logits` through the `serving_default` signature.

Before writing, the export is checked against the Keras model on random
inputs and on real test images of the model's dataset: float32 exports must
agree to 1e-4 on every logit of the random inputs and on top-1 for 99.5% of
the real images (else nothing is written and the exit code is 1); quantized
exports report their accuracy change.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
# TFF (imported with the model zoo) must be imported before absl runs main,
# or Keras cannot deserialise functional models afterwards.
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top,unused-import
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import model_state  # pylint: disable=g-import-not-at-top
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
    with open(paths[1]) as f:
      preprocessing = json.load(f)
    model = tf.keras.models.load_model(paths[0])
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(
        f'cannot read the model in {model_dir} ({type(e).__name__}: {e})'
        .splitlines()[0]
    ) from e
  return model, preprocessing


def export(model, preprocessing, keep_ratio, quantize, data_dir, num_real,
           num_random):
  """(gated bytes, dense bytes, list of report lines); raises ExportError."""
  if keep_ratio is not None:
    if not 0 < keep_ratio <= 1:
      raise ExportError(f'--keep_ratio must be in (0, 1], got {keep_ratio}')
    model_state.set_keep_ratio(model, keep_ratio)
  mean = np.asarray(preprocessing['mean'], np.float32)
  std = np.asarray(preprocessing['std'], np.float32)
  try:
    source = data.load_source(preprocessing['dataset'], data_dir)
  except data.DataSourceError as e:
    raise ExportError(f'real test images are needed to verify: {e}') from e
  real = source.test.images[:num_real].astype(np.float32)
  labels = source.test.labels[:num_real]
  rng = np.random.default_rng(0)
  shape = (num_random,) + tuple(model.input_shape[1:])
  random = (mean + std * rng.uniform(-2, 2, shape)).astype(np.float32)

  lines = []
  contents = []
  for dense in (False, True):
    content = tflite.convert(
        tflite.inference_function(model, mean, std, dense=dense),
        quantize)
    flex = sorted(n for n in tflite.op_names(content)
                  if n.startswith('Flex') or n == 'CUSTOM')
    if flex:
      raise ExportError(f'non-builtin ops in the export: {flex}')
    contents.append(content)
  gated = gated_conv.gated_layers(model)
  if gated:
    ratios = sorted({round(float(l.keep_ratio.numpy()), 4) for l in gated})
    lines.append(f'gated export: keep ratio {ratios}, {len(contents[0])}'
                 f' bytes; dense export: {len(contents[1])} bytes')
  else:
    lines.append('the model has no gated layers')
  references = [('gated', model, contents[0])] if gated else []
  references.append(('dense', tflite.ungated_copy(model), contents[1]))
  for name, reference, content in references:
    on_random = tflite.compare(reference, content, random, mean, std)
    on_real = tflite.compare(reference, content, real, mean, std, labels)
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
    lines += check
    if quantize == 'none' and (
        on_random['max_abs_diff'] > MAX_ABS_DIFF
        or on_real['top1_agreement'] < MIN_TOP1_AGREEMENT):
      raise ExportError(
          f'the {name} export does not match its Keras model: '
          + '; '.join(check))
  return contents[0], contents[1], lines


def write_both(files) -> None:
  """Writes every (path, content) or none: temporary files, then renames."""
  temporaries = []
  try:
    for path, content in files:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      tmp = f'{path}.tmp{os.getpid()}'
      temporaries.append(tmp)
      with open(tmp, 'wb') as f:
        f.write(content)
    for (path, _), tmp in zip(files, temporaries):
      os.replace(tmp, path)
  finally:
    for tmp in temporaries:
      if os.path.exists(tmp):
        os.remove(tmp)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tf.get_logger().setLevel('ERROR')
  logging.set_verbosity(logging.ERROR)
  dense_output = _DENSE_OUTPUT.value or (
      os.path.splitext(_OUTPUT.value)[0] + '_dense.tflite')
  try:
    model, preprocessing = load(_MODEL_DIR.value)
    gated, dense, lines = export(
        model, preprocessing, _KEEP_RATIO.value, _QUANTIZE.value,
        _DATA_DIR.value, _NUM_REAL.value, _NUM_RANDOM.value)
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    write_both(((_OUTPUT.value, gated), (dense_output, dense)))
  except OSError as e:
    print(f'error: cannot write {e.filename}: {e.strerror}', file=sys.stderr)
    return 1
  for line in lines:
    print(line)
  print(f'wrote {_OUTPUT.value} and {dense_output}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

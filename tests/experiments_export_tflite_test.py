"""End-to-end tests of `python -m experiments.export_tflite`."""

import json
import os

from absl.testing import absltest
import pytest
import numpy as np
import tensorflow as tf

import keras_models
from tests import testing
from tff_fedprune import data
from tff_fedprune import model_state
from tff_fedprune.export import tflite


# End-to-end: subprocesses, real rounds (`uv run pytest -m 'not slow'` skips).
pytestmark = pytest.mark.slow


def export_cli(*args):
  return testing.run_module('experiments.export_tflite', *args)


class ExportCliTest(absltest.TestCase):

  def test_exports_a_run_model_and_verifies_on_real_digits(self):
    model_dir = self.create_tempdir().full_path
    source = data.load_source('digits')
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model('cnn', source.image_shape, 10, gated=True,
                                     keep_ratio=0.7)
    model.save(os.path.join(model_dir, 'model.keras'))
    mean, std = [7.0], [6.0]
    with open(os.path.join(model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'image_shape': source.image_shape,
                 'mean': mean, 'std': std}, f)
    output = os.path.join(self.create_tempdir().full_path, 'out', 'm.tflite')
    result = export_cli(f'--model_dir={model_dir}', f'--output={output}',
                        '--keep_ratio=0.5')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('keep ratio [0.5]', result.stdout)
    self.assertIn('real test images (359)', result.stdout)
    self.assertIn('top-1 agreement 100.00%', result.stdout)
    # The dense file is checked against the same weights without gates.
    self.assertIn('dense: real test images (359)', result.stdout)
    dense_output = output.replace('m.tflite', 'm_dense.tflite')
    images = source.test.images[:20].astype(np.float32)
    with open(output, 'rb') as f:
      gated = tflite.run(f.read(), images)
    with open(dense_output, 'rb') as f:
      self.assertNotIn('TOPK_V2', tflite.op_names(f.read()))
    model_state.set_keep_ratio(model, 0.5)
    expected = model((images - 7.0) / 6.0, training=False).numpy()
    np.testing.assert_allclose(gated, expected, atol=1e-4)

    quantized = output.replace('m.tflite', 'q.tflite')
    result = export_cli(f'--model_dir={model_dir}', f'--output={quantized}',
                        '--quantize=dynamic_int8')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('points)', result.stdout)
    self.assertLess(os.path.getsize(quantized), os.path.getsize(output))

  def test_missing_model_is_one_error_line_and_writes_nothing(self):
    out_dir = self.create_tempdir().full_path
    result = export_cli(f'--model_dir={out_dir}',
                        f'--output={out_dir}/m.tflite')
    self.assertEqual(result.returncode, 1)
    errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1)
    self.assertIn('model.keras not found', errors[0])
    self.assertEqual(os.listdir(out_dir), [])

  def test_truncated_model_is_one_error_line_and_writes_nothing(self):
    model_dir = self.create_tempdir().full_path
    keras_models.build_model('cnn', (8, 8, 1), 10).save(
        os.path.join(model_dir, 'model.keras'))
    with open(os.path.join(model_dir, 'model.keras'), 'r+b') as f:
      f.truncate(1000)
    with open(os.path.join(model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'mean': [7.0], 'std': [6.0]}, f)
    out_dir = self.create_tempdir().full_path
    result = export_cli(f'--model_dir={model_dir}',
                        f'--output={out_dir}/m.tflite')
    self.assertEqual(result.returncode, 1)
    errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1, result.stderr)
    self.assertIn(f'cannot read the model in {model_dir}', errors[0])
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(os.listdir(out_dir), [])


if __name__ == '__main__':
  absltest.main()

"""Tests of `python -m experiments.export_tflite`: end to end in subprocesses;
error cases through the same `main` in this process."""

import contextlib
import io
import json
import os

from absl.testing import absltest
from absl.testing import flagsaver
import pytest
import numpy as np
import tensorflow as tf

import keras_models
from experiments import export_tflite
from tests import testing
from tff_fedprune import data
from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import tflite


# End-to-end: subprocesses, real rounds (`uv run pytest -m 'not slow'` skips).
pytestmark = pytest.mark.slow


def export_cli(*args):
  return testing.run_module('experiments.export_tflite', *args)


def export_in_process(**flag_values):
  """(exit code, stdout, stderr) of `export_tflite.main` with these flags.

  The same `main` as the command line, without an interpreter and
  TensorFlow start-up per call.
  """
  stdout, stderr = io.StringIO(), io.StringIO()
  with flagsaver.flagsaver(**flag_values), contextlib.redirect_stdout(
      stdout), contextlib.redirect_stderr(stderr):
    returncode = export_tflite.main(['export_tflite'])
  return returncode, stdout.getvalue(), stderr.getvalue()


class ExportCliTest(absltest.TestCase):

  def test_exports_a_run_model_and_verifies_on_real_digits(self):
    model_dir = self.create_tempdir().full_path
    source = data.load_source('digits')
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model(
        'cnn', source.image_shape, 10,
        gate=gated_conv.GateSpec.from_flags(keep_ratio=0.7))
    model.save(os.path.join(model_dir, 'model.keras'))
    mean, std = [7.0], [6.0]
    with open(os.path.join(model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'image_shape': source.image_shape,
                 'mean': mean, 'std': std}, f)
    output = os.path.join(self.create_tempdir().full_path, 'out', 'm.tflite')
    result = export_cli(f'--model_dir={model_dir}', f'--output={output}',
                        '--mode=dynamic', '--keep_ratio=0.5')
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
                        '--mode=dynamic', '--quantize=dynamic_int8')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('points)', result.stdout)
    self.assertLess(os.path.getsize(quantized), os.path.getsize(output))

  def test_static_export_of_a_run_model_calibrated_on_a_client(self):
    run_dir = self.create_tempdir().full_path
    model_dir = os.path.join(run_dir, 'model')
    os.makedirs(model_dir)
    source = data.load_source('digits')
    tf.keras.utils.set_random_seed(0)
    model = keras_models.build_model(
        'cnn', source.image_shape, 10,
        gate=gated_conv.GateSpec(keep_ratio=0.5, input='identity'))
    model.save(os.path.join(model_dir, 'model.keras'))
    with open(os.path.join(model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'image_shape': source.image_shape,
                 'mean': [7.0], 'std': [6.0]}, f)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump({'num_clients': 4, 'partition': 'iid', 'seed': 0}, f)
    output = os.path.join(self.create_tempdir().full_path, 'static.tflite')
    result = export_cli(f'--model_dir={model_dir}', f'--output={output}',
                        '--mode=static', '--calibration_client=2')
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    federated = data.federate(source, 4, 'iid', 0)
    self.assertIn(
        f'static channels from {len(federated.client_train[2])} training'
        ' images: block1 8/16, block2 16/32, block3 32/64', result.stdout)
    self.assertIn('static: real test images (359)', result.stdout)
    self.assertIn('accuracy on 359 real test images: static (TFLite)',
                  result.stdout)
    with open(output, 'rb') as f:
      content = f.read()
    self.assertFalse(tflite.op_names(content) & {'TOPK_V2', 'GATHER'})
    # The channels the client's images keep most often, as the library
    # picks them.
    images = ((source.train.images[federated.client_train[2]] - 7.0) / 6.0)
    channels = channel_maps.static_channels(
        model, tf.data.Dataset.from_tensor_slices(
            images.astype(np.float32)).batch(256))
    test = source.test.images[:10].astype(np.float32)
    np.testing.assert_allclose(
        tflite.run(content, test),
        tflite.keras_logits(model, test, [7.0], [6.0], channels), atol=1e-4)

  def test_bad_static_input_is_one_error_line_and_writes_nothing(self):
    model_dir = self.create_tempdir().full_path
    keras_models.build_model('cnn', (8, 8, 1), 10).save(
        os.path.join(model_dir, 'model.keras'))
    with open(os.path.join(model_dir, 'preprocessing.json'), 'w') as f:
      json.dump({'dataset': 'digits', 'mean': [7.0], 'std': [6.0]}, f)
    out_dir = self.create_tempdir().full_path
    returncode, _, stderr = export_in_process(
        model_dir=model_dir, mode='static', output=f'{out_dir}/m.tflite')
    self.assertEqual(returncode, 1)
    errors = [l for l in stderr.splitlines() if l.startswith('error:')]
    self.assertEqual(errors, ['error: --mode=static needs a gated model; this'
                              ' one has no gated layers'])
    self.assertEqual(os.listdir(out_dir), [])

  def test_static_export_checks_its_input(self):
    source = data.load_source('digits')
    model = keras_models.build_model(
        'cnn', source.image_shape, 10, gate=gated_conv.GateSpec())
    preprocessing = {'dataset': 'digits', 'mean': [7.0], 'std': [6.0]}
    model_dir = os.path.join(self.create_tempdir().full_path, 'model')
    for kwargs, message in (
        (dict(keep_ratio=1.5), r'--keep_ratio must be in \(0, 1\]'),
        (dict(calibration=(0, 10)), '--calibration_client needs the run'),
        (dict(calibration=(None, 0)), '--calibration_images must be >= 1'),
        (dict(channel_multiple=0), '--channel_multiple must be >= 1'),
        (dict(data_dir='/nonexistent'),
         'real images are needed to calibrate and verify'),
    ):
      args = dict(keep_ratio=None, quantize='none', data_dir=None,
                  num_real=10, num_random=2, mode='static',
                  model_dir=model_dir)
      args.update(kwargs)
      dataset = 'fashion_mnist' if 'data_dir' in kwargs else 'digits'
      with self.subTest(message), self.assertRaisesRegex(
          export_tflite.ExportError, message):
        export_tflite.export(model, dict(preprocessing, dataset=dataset),
                             **args)

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
    returncode, _, stderr = export_in_process(
        model_dir=model_dir, output=f'{out_dir}/m.tflite')
    self.assertEqual(returncode, 1)
    errors = [l for l in stderr.splitlines() if l.startswith('error:')]
    self.assertLen(errors, 1, stderr)
    self.assertIn(f'cannot read the model in {model_dir}', errors[0])
    self.assertEqual(os.listdir(out_dir), [])


if __name__ == '__main__':
  absltest.main()

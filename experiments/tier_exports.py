"""Exports a finished run's model for each of its device tiers and scores it.

  python -m experiments.tier_exports --run_dir=RUN_DIR [--data_dir=DIR]

For every tier of the run's --device_tiers, the static TFLite sub-model a
device of that tier runs (`tff_fedprune.export.tiers`), its accuracy on the
whole test set (LiteRT, one image per invoke) next to the Keras model's at
the tier's keep ratio, and its median LiteRT latency against the dense
export of the same weights. Writes RUN_DIR/tier_exports.json.
"""

import dataclasses
import json
import math
import os
import sys

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.
# TFF (imported with the model zoo) must be imported before absl runs main,
# or Keras cannot deserialise functional models afterwards.
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top,unused-import

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'A finished run directory.',
                               required=True)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, "The dataset's directory (default: the run's).")
_INVOKES = flags.DEFINE_integer('invokes', 200, 'Timed invokes per export.')

OUTPUT = 'tier_exports.json'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from tff_fedprune import files  # pylint: disable=g-import-not-at-top
  from tff_fedprune.export import tiers as tier_exports  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import data_source  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import loop  # pylint: disable=g-import-not-at-top

  run_dir = _RUN_DIR.value
  try:
    with open(os.path.join(run_dir, 'config.json'), encoding='utf-8') as f:
      saved = config_lib.with_defaults(json.load(f))
    config = config_lib.ExperimentConfig(**saved)
    if _DATA_DIR.value:
      config = dataclasses.replace(config, data_dir=_DATA_DIR.value)
    tiers = config.tiers()
    if not tiers:
      raise ValueError(f'{run_dir} was run without --device_tiers')
    model = tf.keras.models.load_model(
        os.path.join(run_dir, 'model', 'model.keras'), compile=False)
  except (OSError, ValueError, TypeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  fed_data = data_source.load_data(config)
  calibration = fed_data.calibration_images(loop.CALIBRATION_IMAGES,
                                            config.seed)
  test = fed_data.source.test
  results = []
  for tier in tiers:
    result = tier_exports.export_tier(
        model, tier.label, tier.keep_ratio, calibration, test.images,
        test.labels, fed_data.mean, fed_data.std, invokes=_INVOKES.value)
    row = {k: None if isinstance(v, float) and math.isnan(v) else v
           for k, v in dataclasses.asdict(result).items()}  # Strict JSON.
    print(json.dumps(row), flush=True)
    results.append(row)
  files.write_atomically(os.path.join(run_dir, OUTPUT),
                         json.dumps(results, indent=1).encode())
  return 0


if __name__ == '__main__':
  cli.run(main)

"""Federated training with dynamic pruning: the command-line entry point.

  python -m experiments.cifar --flagfile=experiments/configs/quickstart.cfg

Writes metrics.csv, summary.json, tensorboard/, checkpoints/ and model/ under
<root_output_dir>/<experiment_name>/; rerunning the same command resumes after
the last completed round (docs/design.md, section 5).
"""

import dataclasses
import os
import sys
from typing import Optional

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.


def define_flags(flag_values=flags.FLAGS):
  """Defines one flag per `ExperimentConfig` field in `flag_values`.

  Help text and choices come from the fields; `--model` takes the names of
  `keras_models.MODELS`.
  """
  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import fields  # pylint: disable=g-import-not-at-top

  defaults = config_lib.ExperimentConfig()
  define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
            float: flags.DEFINE_float, Optional[float]: flags.DEFINE_float}
  for field in dataclasses.fields(defaults):
    default = getattr(defaults, field.name)
    help_text = fields.help_text(field)
    options = fields.choices(field) or (
        keras_models.MODELS if field.name == 'model' else ()
    )
    if options:
      flags.DEFINE_enum(field.name, default, options, help_text,
                        flag_values=flag_values)
    else:
      define.get(field.type, flags.DEFINE_string)(
          field.name, default, help_text, flag_values=flag_values)
  return defaults


def config_from_flags(flag_values=flags.FLAGS):
  """The `ExperimentConfig` given by the parsed flags."""
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.ExperimentConfig(
      **{f.name: flag_values[f.name].value
         for f in dataclasses.fields(config_lib.ExperimentConfig)}
  )


parse_flags_or_exit = cli.parse_flags_or_exit


def quiet_logs():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,unused-import

  cli.quiet_logs()


def run(config) -> int:
  """Runs or resumes `config`; returns the process exit code.

  Unusable configurations or data, an unsafe run directory or one another
  run is writing, or a file that cannot be written (a full disk, a
  read-only directory) print one `error:` line (exit 2). A worker that dies
  mid-round or a round that makes the model non-finite ends the process
  (exit 3).
  """
  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_fedprune import data  # pylint: disable=g-import-not-at-top
  from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import loop  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import program  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import run_directory  # pylint: disable=g-import-not-at-top

  try:
    summary = loop.run_experiment(config, keras_models.BUILDERS)
  except (config_lib.ConfigError, data.DataSourceError,
          data.PartitionError, run_directory.RunDirectoryError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'error: cannot write {cli.os_error_message(e)}', file=sys.stderr)
    return 2
  except program.NonFiniteModelError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except runtime.WorkerError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.stderr.flush()
    # The round abandoned on the dead worker holds TFF threads that would
    # keep the interpreter from exiting.
    os._exit(3)
  final = summary['final']
  print(
      f'round {final["round"]}: test accuracy {final["test_accuracy"]:.4f},'
      f' uploaded {summary["total_upload_bytes"] / 1e6:.2f} MB'
  )
  print(f'outputs: {config.run_dir}')
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_logs()
  return run(config_from_flags())


if __name__ == '__main__':
  define_flags()
  cli.run(main)

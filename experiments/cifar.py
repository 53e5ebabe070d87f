"""Federated training with dynamic pruning: the command-line entry point.

  python -m experiments.cifar --flagfile=experiments/configs/quickstart.cfg

Writes metrics.csv, summary.json, tensorboard/, checkpoints/ and model/ under
<root_output_dir>/<experiment_name>/; rerunning the same command resumes after
the last completed round. See DESIGN.md section 3.
"""

import dataclasses
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top


def define_flags(flag_values=flags.FLAGS):
  """Defines one flag per `ExperimentConfig` field in `flag_values`."""
  from tff_fedprune import training_loop  # pylint: disable=g-import-not-at-top

  defaults = training_loop.ExperimentConfig()
  help_text = {
      'experiment_name': 'Run directory name under --root_output_dir.',
      'root_output_dir': 'Where run directories are written.',
      'dataset': 'digits, fashion_mnist, cifar10, cifar100 or synthetic.',
      'data_dir': 'Directory (or archive) holding the dataset files.',
      'model': 'cnn, resnet20, resnet32, resnet56 or vgg11.',
      'algorithm': 'fedavg, fedprox, fednova or scaffold.',
      'dynamic_pruning': 'Gate every conv layer (FedDP) instead of dense.',
      'keep_ratio': 'Share of output channels each gated layer keeps.',
      'client_keep_ratios': 'Comma-separated keep ratios, client id modulo'
                            ' the list (heterogeneous devices); overrides'
                            ' --keep_ratio.',
      'salience_threshold': 'A channel is uploaded iff kept in more than'
                            ' this share of the client\'s samples.',
      'prox_mu': 'FedProx proximal coefficient.',
      'workers': 'host:port,... of TFF workers (python -m'
                 ' tff_fedprune.worker) to run the clients on; default: a'
                 ' local worker owned by this process.',
      'client_failure_rate': 'Share of each round\'s sampled clients that'
                             ' drop out (simulated device loss).',
      'num_clients': 'Number of clients the training set is split into.',
      'clients_per_round': 'Clients sampled each round.',
      'partition': 'iid, dirichlet or shards.',
      'dirichlet_alpha': 'Concentration of the Dirichlet label skew.',
      'classes_per_client': 'Classes per client for --partition=shards.',
      'server_optimizer': 'sgd, sgdm, adam, yogi or adagrad.',
      'server_learning_rate': 'Server optimizer learning rate.',
      'client_learning_rate': 'Client SGD learning rate.',
      'client_momentum': 'Client SGD momentum.',
      'weight_decay': 'Client L2 weight decay.',
      'local_epochs': 'Local epochs per round.',
      'batch_size': 'Client batch size.',
      'total_rounds': 'Number of federated rounds.',
      'eval_every': 'Evaluate the global model every N rounds (and the last).',
      'seed': 'Seed of partition, sampling, initial weights and shuffling.',
  }
  define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
            float: flags.DEFINE_float}
  for field in dataclasses.fields(defaults):
    define_flag = define.get(field.type, flags.DEFINE_string)
    define_flag(field.name, getattr(defaults, field.name),
                help_text[field.name], flag_values=flag_values)
  return defaults


def config_from_flags(flag_values=flags.FLAGS):
  """The `ExperimentConfig` given by the parsed flags."""
  from tff_fedprune import training_loop  # pylint: disable=g-import-not-at-top

  return training_loop.ExperimentConfig(
      **{f.name: flag_values[f.name].value
         for f in dataclasses.fields(training_loop.ExperimentConfig)}
  )


def quiet_logs():
  logging.set_verbosity(logging.ERROR)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel('ERROR')


def run(config) -> int:
  """Runs or resumes `config`; returns the process exit code.

  Unusable configurations or data print one `error:` line (exit 2). A worker
  that dies mid-round ends the process at once (exit 3).
  """
  from tff_fedprune import data  # pylint: disable=g-import-not-at-top
  from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
  from tff_fedprune import training_loop  # pylint: disable=g-import-not-at-top

  try:
    summary = training_loop.run_experiment(config)
  except (training_loop.ConfigError, data.DataSourceError,
          data.PartitionError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
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
  app.run(lambda argv: sys.exit(main(argv)))

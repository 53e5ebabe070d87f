"""Round times: FedDP with pruning off vs TFF's FedAvg, gated vs dense.

  python -m experiments.benchmark_process [--rounds=8] [--dataset=digits] \
      [--grid_rounds=10] [--grid_flagfile=experiments/configs/fmnist_grid.cfg]

First, the process with pruning off against
`tff.learning.algorithms.build_weighted_fed_avg`: both train the same dense
CNN from the same initial weights on the same client datasets. Then, unless
`--grid_rounds=0`, a gated and a dense run of the flagfile's configuration
(the Fashion-MNIST grid's by default: FedAvg, keep 0.7, tau 0.5): whole
rounds as `round_seconds` counts them (client data, local training,
encoding, aggregation, server update and evaluation: `program.RoundRunner`).
Each comparison runs through one owned TFF worker and alternates rounds between
its two variants so that machine drift affects both alike, after one
untimed round each (the first call traces). Prints the median round times,
the median CPU seconds of the worker per round and their ratios, measured in
this run.
"""

import collections
import dataclasses
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import client_work  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import model_state  # pylint: disable=g-import-not-at-top
from tff_fedprune import learning_process  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import data_source  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import loop  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import program  # pylint: disable=g-import-not-at-top
from experiments import cifar  # pylint: disable=g-import-not-at-top

_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Timed rounds per process.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'Data source.')
_CLIENTS = flags.DEFINE_integer('num_clients', 10, 'Clients per round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
_GRID_ROUNDS = flags.DEFINE_integer(
    'grid_rounds', 10, 'Timed rounds of each of gated and dense (0: skip).')
_GRID_FLAGFILE = flags.DEFINE_string(
    'grid_flagfile', 'experiments/configs/fmnist_grid.cfg',
    'experiments.cifar flagfile of the gated vs dense comparison.')


def process_tree_cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of `pid` and its descendants (Linux /proc)."""
  children, ticks = collections.defaultdict(list), {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    children[int(fields[1])].append(int(entry))
    ticks[int(entry)] = int(fields[11]) + int(fields[12])
  total, pending = 0, [pid]
  while pending:
    p = pending.pop()
    total += ticks.get(p, 0)
    pending += children[p]
  return total / os.sysconf('SC_CLK_TCK')


def alternate(variants, rounds, worker_pid=None):
  """Medians of each `variants[name](i)`, i = 0..rounds: wall, worker CPU.

  Call 0 of each is untimed; the others alternate between the variants.
  Returns `{name: (wall seconds, CPU seconds)}`, the CPU seconds being the
  worker process tree's (`worker_pid`; nan without one): with the clients
  of a round running concurrently on every core, they are what a round
  costs, and steady where wall time drifts with the machine's load.
  """
  cpu = (lambda: process_tree_cpu_seconds(worker_pid)) if worker_pid else (
      lambda: float('nan'))
  for run_round in variants.values():
    run_round(0)
  times = {name: [] for name in variants}
  for i in range(1, rounds + 1):
    for name, run_round in variants.items():
      start, start_cpu = time.perf_counter(), cpu()
      run_round(i)
      times[name].append(
          (time.perf_counter() - start, cpu() - start_cpu)
      )
  return {
      name: tuple(float(np.median(column)) for column in zip(*t))
      for name, t in times.items()
  }


def report(medians, baseline):
  """Prints each variant's medians and their ratios to `baseline`'s."""
  wall_0, cpu_0 = medians[baseline]
  for name, (wall, cpu) in medians.items():
    print(f'  {name:28s} {wall:7.3f} s/round ({wall / wall_0:.3f}x)'
          f'   worker CPU {cpu:7.2f} s/round ({cpu / cpu_0:.3f}x)')


def grid_config():
  """The `ExperimentConfig` of --grid_flagfile."""
  values = flags.FlagValues()
  cifar.define_flags(values)
  values(['benchmark', f'--flagfile={_GRID_FLAGFILE.value}'])
  return cifar.config_from_flags(values)


def benchmark_gated_rounds(rounds):
  """Gated vs dense rounds of --grid_flagfile's configuration."""
  config = grid_config()
  fed_data = data_source.load_data(config)
  build = keras_models.BUILDERS[config.model]
  with runtime.local_runtime() as worker:
    runs = {}
    for name, gated in (('dense', False), ('gated', True)):
      variant = dataclasses.replace(config, dynamic_pruning=gated,
                                    total_rounds=rounds + 1)
      parts = loop.build_parts(variant, build, fed_data)
      run_round = program.RoundRunner(
          parts.process, parts.data_source, parts.evaluation, parts.traffic)
      runs[name] = [run_round, parts.process.initialize()]

    def runner(name):
      def run_round(i):
        round_runner, state = runs[name]
        runs[name][1] = round_runner(state, i + 1).state
      return run_round

    medians = alternate({name: runner(name) for name in runs}, rounds,
                        worker.pid)
  print(f'{config.dataset}, {config.model}, {config.num_clients} clients'
        f' ({config.partition}), {config.algorithm}, gated keep'
        f' {config.keep_ratio} tau {config.salience_threshold}; median of'
        f' {rounds} whole rounds (training, encoding, aggregation,'
        ' evaluation) after one untimed round:')
  report(medians, 'dense')


def main(argv):
  del argv
  cifar.quiet_logs()
  source = data.load_source(_DATASET.value)
  fed = data.federate(source, _CLIENTS.value, 'iid', seed=0)
  model_fn = lambda: keras_models.build_model(
      'cnn', source.image_shape, source.num_classes)
  tf.keras.utils.set_random_seed(0)
  weights = tf.nest.map_structure(lambda v: v.numpy(),
                                  model_state.global_weights(model_fn()))
  datasets = [fed.client_train_dataset(c, _BATCH.value)
              for c in range(fed.num_clients)]
  with runtime.local_runtime() as worker:
    ours = learning_process.build_learning_process(
        model_fn, fed.element_spec, client_learning_rate=0.05,
        server_optimizer='sgd', server_learning_rate=1.0,
        initial_weights=weights)
    stock = tff.learning.algorithms.build_weighted_fed_avg(
        lambda: tff.learning.models.from_keras_model(
            model_fn(), input_spec=fed.element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=True)),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.05),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
    runs = {
        'feddp (pruning off)': (
            ours, ours.initialize(),
            [client_work.client_data(d, 1.0) for d in datasets]),
        'tff build_weighted_fed_avg': (
            stock, stock.set_model_weights(stock.initialize(), weights),
            datasets),
    }

    def runner(name):
      def run_round(unused_i):
        process, state, client_data = runs[name]
        runs[name] = (process, process.next(state, client_data).state,
                      client_data)
      return run_round

    medians = alternate({name: runner(name) for name in runs}, _ROUNDS.value,
                        worker.pid)
  print(f'{_DATASET.value}, {fed.num_clients} clients, dense CNN, median of '
        f'{_ROUNDS.value} rounds after one warm-up round:')
  report(medians, 'tff build_weighted_fed_avg')
  if _GRID_ROUNDS.value:
    benchmark_gated_rounds(_GRID_ROUNDS.value)


if __name__ == '__main__':
  app.run(main)

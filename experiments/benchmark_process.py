"""Round times: FedDP with pruning off vs TFF's FedAvg; dense vs gated.

  python -m experiments.benchmark_process [--rounds=8] [--dataset=digits] \
      [--grid_rounds=5] [--models=cnn,resnet32,vgg11] [--skip_stock] \
      [--grid_flagfile=experiments/configs/fmnist_grid.cfg]

First (unless --skip_stock), the process with pruning off against
`tff.learning.algorithms.build_weighted_fed_avg`: both train the same dense
CNN from the same initial weights on the same client datasets. Then, for each
of --models, training rounds without evaluation (client data, local
training, encoding, aggregation, server update) of the flagfile's
configuration (the Fashion-MNIST grid's by default; ResNet-32 and VGG-11 on 2
of 100 IID clients a round, `model_config`): dense, and gated at keep 0.7
and 0.5 with each --compact_training mode. Each comparison runs through one
owned TFF worker and alternates rounds between its variants so that machine
drift affects all alike, after one untimed round each (the first call
traces). Prints the median round times, the median CPU seconds of the worker
per round, their ratios to dense, and the training FLOPs over a dense
client's, measured in this run.
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
from tff_fedprune import compact_training  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import model_state  # pylint: disable=g-import-not-at-top
from tff_fedprune import learning_process  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import data_source  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import loop  # pylint: disable=g-import-not-at-top
from experiments import cifar  # pylint: disable=g-import-not-at-top

_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Timed rounds per process.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'Data source.')
_CLIENTS = flags.DEFINE_integer('num_clients', 10, 'Clients per round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
_GRID_ROUNDS = flags.DEFINE_integer(
    'grid_rounds', 5, 'Timed rounds of each variant of --models (0: skip).')
_MODELS = flags.DEFINE_list(
    'models', ['cnn', 'resnet32', 'vgg11'],
    'Models of the dense vs gated comparison (keras_models names).')
_SKIP_STOCK = flags.DEFINE_bool(
    'skip_stock', False, 'Skip the comparison with TFF\'s FedAvg.')
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


def report(medians, baseline, train_flops=None):
  """Prints each variant's medians and their ratios to `baseline`'s."""
  wall_0, cpu_0 = medians[baseline]
  for name, (wall, cpu) in medians.items():
    line = (f'  {name:28s} {wall:7.3f} s/round ({wall / wall_0:.3f}x)'
            f'   worker CPU {cpu:7.2f} s/round ({cpu / cpu_0:.3f}x)')
    if train_flops:
      line += f'   train FLOPs {train_flops[name]:.3f}x'
    print(line)


def grid_config():
  """The `ExperimentConfig` of --grid_flagfile."""
  values = flags.FlagValues()
  cifar.define_flags(values)
  values(['benchmark', f'--flagfile={_GRID_FLAGFILE.value}'])
  return cifar.config_from_flags(values)


# (name, keep ratio or None for dense, --compact_training) of each variant.
VARIANTS = (('dense', None, 'off'),) + tuple(
    (f'keep {ratio} {mode}', ratio, mode)
    for ratio in (0.7, 0.5) for mode in compact_training.MODES)


def model_config(model):
  """The grid's configuration for `model`; the deep models on fewer data.

  The CNN is the grid setting itself; ResNet-32 and VGG-11 take 2 of 100
  IID clients a round (about 9 batches of 64 each), so that a round is
  seconds, not minutes, on this CPU.
  """
  config = dataclasses.replace(grid_config(), model=model)
  if model == 'cnn':
    return config
  return dataclasses.replace(config, num_clients=100, clients_per_round=2,
                             partition='iid')


def benchmark_compact_rounds(model, rounds):
  """Training rounds (no evaluation) of dense and gated variants."""
  base = model_config(model)
  fed_data = data_source.load_data(base)
  build = keras_models.BUILDERS[base.model]
  runs, flops = {}, collections.defaultdict(list)
  with runtime.local_runtime() as worker:
    for name, ratio, mode in VARIANTS:
      config = dataclasses.replace(
          base, dynamic_pruning=ratio is not None, keep_ratio=ratio or 1.0,
          compact_training=mode, total_rounds=rounds + 1)
      parts = loop.build_parts(config, build, fed_data)
      runs[name] = [parts, parts.process.initialize()]

    def runner(name):
      def run_round(i):
        parts, state = runs[name]
        clients = parts.data_source.sample(i + 1)
        output = parts.process.next(
            state, parts.data_source.inputs(i + 1, clients.completing))
        runs[name][1] = output.state
        work = output.metrics['client_work']
        flops[name].append(float(work['train_flops'])
                           / float(work['dense_train_flops']))
      return run_round

    medians = alternate({name: runner(name) for name, _, _ in VARIANTS},
                        rounds, worker.pid)
  print(f'{base.dataset}, {model}, {base.clients_per_round} of'
        f' {base.num_clients} clients ({base.partition}), batch'
        f' {base.batch_size}, {base.local_epochs} local epoch; median of'
        f' {rounds} training rounds (no evaluation) after one untimed round;'
        ' train FLOPs / dense over all rounds:')
  report(medians, 'dense', {k: float(np.mean(v)) for k, v in flops.items()})


def benchmark_stock_fedavg():
  """FedDP with pruning off against TFF's FedAvg on the same clients."""
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


def main(argv):
  del argv
  cifar.quiet_logs()
  print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores')
  if not _SKIP_STOCK.value:
    benchmark_stock_fedavg()
  for model in _MODELS.value if _GRID_ROUNDS.value else ():
    benchmark_compact_rounds(model, _GRID_ROUNDS.value)


if __name__ == '__main__':
  app.run(main)

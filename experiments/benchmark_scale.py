"""Round time of FedDP against clients per round, and per-client state at scale.

  python -m experiments.benchmark_scale [--rounds=3] [--sizes=10,20,50,100]
  python -m experiments.benchmark_scale --federation=1000 \
      [--algorithms=fedavg,scaffold]

Default: digits split into 100 clients (iid, about 14 training images each),
gated CNN at keep 0.7, the owned local TFF worker. For each number of clients
per round it times `--rounds` rounds after one warm-up round and prints the
median, measured in this run, to show how a round's cost grows.

With `--federation=N`: the quickstart flagfile with N clients (iid, 10 per
round, 1 local epoch, `--rounds` rounds), once per algorithm in one run, as
`python -m experiments.cifar` subprocesses. It prints each algorithm's median
round time (metrics.csv) and its peak resident memory, the sum over the
Python process and its TFF worker sampled every 0.1 s: SCAFFOLD keeps a
control variate per client, which must not make rounds or memory grow with N.
"""

import csv
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import client_work  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import learning_process  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per size.')
_SIZES = flags.DEFINE_list('sizes', ['10', '20', '50', '100'],
                           'Clients per round to time.')
_FEDERATION = flags.DEFINE_integer(
    'federation', 0, 'Compare --algorithms on a federation of this many'
    ' clients (0: time clients per round instead).')
_ALGORITHMS = flags.DEFINE_list(
    'algorithms', ['fedavg', 'scaffold'], 'Algorithms for --federation.')
_NUM_CLIENTS = 100
_QUICKSTART = os.path.join('experiments', 'configs', 'quickstart.cfg')


def _tree_rss_bytes(pid: int) -> int:
  """Resident memory of `pid` and all its descendants."""
  total, pending = 0, [pid]
  while pending:
    p = pending.pop()
    try:
      with open(f'/proc/{p}/statm') as f:
        total += int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
      with open(f'/proc/{p}/task/{p}/children') as f:
        pending += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
      continue
  return total


def compare_federation(num_clients: int) -> None:
  print(f'quickstart flags, {num_clients} clients (iid), 10 per round,'
        f' 1 local epoch, {_ROUNDS.value} rounds; one run:')
  for algorithm in _ALGORITHMS.value:
    with tempfile.TemporaryDirectory() as root:
      process = subprocess.Popen(
          [sys.executable, '-m', 'experiments.cifar',
           f'--flagfile={_QUICKSTART}', f'--num_clients={num_clients}',
           '--partition=iid', '--clients_per_round=10', '--local_epochs=1',
           f'--total_rounds={_ROUNDS.value}', f'--algorithm={algorithm}',
           f'--root_output_dir={root}', '--experiment_name=run'],
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      peak = 0
      while process.poll() is None:
        peak = max(peak, _tree_rss_bytes(process.pid))
        time.sleep(0.1)
      if process.returncode:
        raise SystemExit(f'{algorithm} failed: {process.stderr.read()}')
      with open(os.path.join(root, 'run', 'metrics.csv')) as f:
        seconds = [float(r['round_seconds']) for r in csv.DictReader(f)]
    print(f'  {algorithm:9s} median round {np.median(seconds):6.2f} s'
          f' (rounds: {", ".join(f"{s:.2f}" for s in seconds)}),'
          f' peak memory {peak / 1e9:5.2f} GB')


def main(argv):
  del argv
  if _FEDERATION.value:
    compare_federation(_FEDERATION.value)
    return
  source = data.load_source('digits')
  fed = data.federate(source, _NUM_CLIENTS, 'iid', seed=0)
  model_fn = lambda: keras_models.build_model(
      'cnn', source.image_shape, source.num_classes,
      gate=gated_conv.GateSpec.from_flags(keep_ratio=0.7))
  tf.keras.utils.set_random_seed(0)
  print(f'digits, {_NUM_CLIENTS} clients of about '
        f'{len(source.train) // _NUM_CLIENTS} images, gated CNN keep 0.7, '
        f'median of {_ROUNDS.value} rounds after a warm-up round:')
  with runtime.local_runtime():
    process = learning_process.build_learning_process(
        model_fn, fed.element_spec, client_learning_rate=0.05,
        client_momentum=0.9)
    state = process.initialize()
    for size in (int(s) for s in _SIZES.value):
      client_data = [
          client_work.client_data(fed.client_train_dataset(c, 32), 0.7)
          for c in range(size)
      ]
      state = process.next(state, client_data).state
      times = []
      for _ in range(_ROUNDS.value):
        start = time.perf_counter()
        state = process.next(state, client_data).state
        times.append(time.perf_counter() - start)
      median = float(np.median(times))
      print(f'  {size:4d} clients/round: {median:6.2f} s/round '
            f'({median / size * 1e3:6.1f} ms per client)')


if __name__ == '__main__':
  app.run(main)

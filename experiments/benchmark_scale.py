"""Round time of FedDP against the number of clients per round.

  python -m experiments.benchmark_scale [--rounds=3] [--sizes=10,20,50,100]

digits split into 100 clients (iid, about 14 training images each), gated
CNN at keep 0.7, the owned local TFF worker. For each number of clients per
round it times `--rounds` rounds after one warm-up round and prints the
median, measured in this run, to show how a round's cost grows.
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import client_work  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import learning_process  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per size.')
_SIZES = flags.DEFINE_list('sizes', ['10', '20', '50', '100'],
                           'Clients per round to time.')
_NUM_CLIENTS = 100


def main(argv):
  del argv
  source = data.load_source('digits')
  fed = data.federate(source, _NUM_CLIENTS, 'iid', seed=0)
  model_fn = lambda: keras_models.build_model(
      'cnn', source.image_shape, source.num_classes, gated=True,
      keep_ratio=0.7)
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
          client_work.client_data(fed.client_train_dataset(c, 32), 0.7, c)
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

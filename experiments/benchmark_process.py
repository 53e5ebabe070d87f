"""Round time of the FedDP process with pruning off vs TFF's stock FedAvg.

  python -m experiments.benchmark_process [--rounds=8] [--dataset=digits]

Both processes train the same dense CNN from the same initial weights on the
same client datasets, through the same owned TFF worker; rounds alternate
between the two so that machine drift affects both alike. Prints the median
round time of each and their ratio, measured in this run.
"""

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

_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Timed rounds per process.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'Data source.')
_CLIENTS = flags.DEFINE_integer('num_clients', 10, 'Clients per round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')


def main(argv):
  del argv
  source = data.load_source(_DATASET.value)
  fed = data.federate(source, _CLIENTS.value, 'iid', seed=0)
  model_fn = lambda: keras_models.build_model(
      'cnn', source.image_shape, source.num_classes)
  tf.keras.utils.set_random_seed(0)
  weights = tf.nest.map_structure(lambda v: v.numpy(),
                                  model_state.global_weights(model_fn()))
  datasets = [fed.client_train_dataset(c, _BATCH.value)
              for c in range(fed.num_clients)]
  with runtime.local_runtime():
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
    times = {name: [] for name in runs}
    for name, (process, state, client_data) in runs.items():
      runs[name] = (process, process.next(state, client_data).state,
                    client_data)  # Warm-up round (first call traces).
    for _ in range(_ROUNDS.value):
      for name, (process, state, client_data) in runs.items():
        start = time.perf_counter()
        state = process.next(state, client_data).state
        times[name].append(time.perf_counter() - start)
        runs[name] = (process, state, client_data)
  medians = {name: float(np.median(t)) for name, t in times.items()}
  print(f'{_DATASET.value}, {fed.num_clients} clients, dense CNN, median of '
        f'{_ROUNDS.value} rounds after one warm-up round:')
  for name, seconds in medians.items():
    print(f'  {name:28s} {seconds:7.3f} s/round')
  ratio = medians['feddp (pruning off)'] / medians['tff build_weighted_fed_avg']
  print(f'  ratio feddp / stock: {ratio:.3f}')


if __name__ == '__main__':
  app.run(main)

"""What keeping the TFF worker off the network costs per round.

  python -m experiments.benchmark_runtime [--rounds=10] [--dataset=digits]

One FedDP process (gated CNN at keep 0.7, all clients of the dataset split
into `--num_clients`, 1 local epoch) runs its rounds through three workers
in turn, so machine drift affects all alike:

* `port`: the bare worker_binary on a TCP port (what TFF does; reachable
  from the network);
* `unix relay`: the default local worker, in a private network namespace
  behind the Unix-socket relay;
* `mutual TLS`: `python -m tff_fedprune.worker` with TLS and client
  certificates on loopback, as a remote worker is reached.

Prints the median round time of each and its ratio to `port`, measured in
this run.
"""

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
import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

from experiments import make_certificates  # pylint: disable=g-import-not-at-top
import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import gated_conv  # pylint: disable=g-import-not-at-top
from tff_fedprune import client_work  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import learning_process  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
from tff_fedprune.runtime import worker_process  # pylint: disable=g-import-not-at-top

_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds per worker.')
_DATASET = flags.DEFINE_string('dataset', 'digits', 'Data source.')
_CLIENTS = flags.DEFINE_integer('num_clients', 10, 'Clients per round.')


def main(argv):
  del argv
  source = data.load_source(_DATASET.value)
  fed = data.federate(source, _CLIENTS.value, 'iid', seed=0)
  model_fn = lambda: keras_models.build_model(
      'cnn', source.image_shape, source.num_classes,
      gate=gated_conv.GateSpec.from_flags(keep_ratio=0.7))
  tf.keras.utils.set_random_seed(0)
  client_data = [client_work.client_data(fed.client_train_dataset(c, 32), 0.7)
                 for c in range(fed.num_clients)]
  with tempfile.TemporaryDirectory() as certs_dir:
    certs = make_certificates.make(certs_dir, days=1)
    port = worker_process._pick_free_port()  # pylint: disable=protected-access
    tls_worker = subprocess.Popen(
        [sys.executable, '-m', 'tff_fedprune.worker', f'--port={port}',
         '--host=127.0.0.1', f'--tls_cert={certs["worker"]}',
         f'--tls_key={certs["worker_key"]}',
         f'--tls_client_ca={certs["ca"]}'],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      if tls_worker.stdout.readline().strip() != 'ready':
        raise SystemExit('the TLS worker did not start')
      credentials = runtime.tls_credentials(
          certs['ca'], certs['driver'], certs['driver_key'])
      with runtime.OwnedWorker(isolate=False) as plain, \
          runtime.OwnedWorker() as isolated:
        contexts = {
            'port': runtime.create_remote_context(plain.address),
            'unix relay': runtime.create_remote_context(isolated.address),
            'mutual TLS': runtime.create_remote_context(
                f'localhost:{port}', credentials=credentials),
        }
        times = {name: [] for name in contexts}
        process = learning_process.build_learning_process(
            model_fn, fed.element_spec, client_learning_rate=0.05,
            client_momentum=0.9)
        for r in range(_ROUNDS.value + 1):
          for name, context in contexts.items():
            with tff.framework.get_context_stack().install(context):
              state = process.initialize()
              start = time.perf_counter()
              process.next(state, client_data)
              if r:  # The first round of each traces; not timed.
                times[name].append(time.perf_counter() - start)
    finally:
      tls_worker.terminate()
      tls_worker.wait()
  base = float(np.median(times['port']))
  print(f'{_DATASET.value}, {_CLIENTS.value} clients, gated CNN keep 0.7,'
        f' median of {_ROUNDS.value} alternating rounds:')
  for name, values in times.items():
    median = float(np.median(values))
    print(f'  {name:11s} {median:6.3f} s/round  {median / base:5.3f}x port')


if __name__ == '__main__':
  app.run(main)

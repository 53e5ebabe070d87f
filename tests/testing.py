"""Helpers shared by the test suites: small models, client data, processes."""

import collections
import dataclasses
import os
import subprocess
import sys
import time

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from experiments import make_certificates as make_certificates_lib
import keras_models
from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune import runtime
from tff_fedprune.simulation import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'configs', 'quickstart.cfg')


class LocalRuntimeTestCase(parameterized.TestCase):
  """Runs its tests inside one owned local TFF runtime (shared per class)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._runtime = runtime.local_runtime()
    cls._runtime.__enter__()

  @classmethod
  def tearDownClass(cls):
    cls._runtime.__exit__(None, None, None)
    super().tearDownClass()


def model_fn(gated=False):
  """A builder of the small CNN on 8x8x1 inputs (keep ratio 0.5 if gated)."""
  return lambda: keras_models.build_model(
      'cnn', (8, 8, 1), 10,
      gate=gated_conv.GateSpec.from_flags(keep_ratio=0.5) if gated else None)


def client_datasets(num_clients=3, n=12, seed=0, poison=None):
  """`num_clients` datasets of `n` examples each (or `n[k]` for client k)."""
  rng = np.random.default_rng(seed)
  sizes = n if isinstance(n, list) else [n] * num_clients
  out = []
  for k, size in enumerate(sizes):
    x = rng.normal(size=(size, 8, 8, 1)).astype(np.float32)
    if k == poison:
      x[0, 0, 0, 0] = np.nan
    y = rng.integers(0, 10, size).astype(np.int32)
    out.append(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
  return out


def initial_weights(fn):
  """The global weights of `fn()` built under seed 1, as numpy arrays."""
  tf.keras.utils.set_random_seed(1)
  return tf.nest.map_structure(lambda v: v.numpy(),
                               model_state.global_weights(fn()))


def small_config(root, **overrides):
  """A 3-round gated run on synthetic data in 4 clients, 2 per round."""
  return dataclasses.replace(
      config_lib.ExperimentConfig(
          experiment_name='run', root_output_dir=root, dataset='synthetic',
          num_clients=4, clients_per_round=2, partition='iid', batch_size=16,
          total_rounds=3, client_learning_rate=0.05, seed=7,
          dynamic_pruning=True, keep_ratio=0.5),
      **overrides)


def is_alive(pid):
  try:
    with open(f'/proc/{pid}/status') as f:
      return 'State:\tZ' not in f.read()
  except FileNotFoundError:
    return False


def wait_dead(pid, timeout_s=15):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not is_alive(pid):
      return True
    time.sleep(0.1)
  return False


def worker_pids():
  """Pids of this environment's TFF worker binaries (not other checkouts')."""
  out = subprocess.run(['pgrep', '-f', runtime.worker_binary_path()],
                       capture_output=True, text=True).stdout
  return {int(p) for p in out.split()}


def run_module(module, *args, timeout=600):
  """Runs `python -m module args...` from the repository root.

  The environment is the user's: without the log level this suite sets.
  """
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout,
      stdin=subprocess.DEVNULL, env=env)


# A small ModelWeights-shaped update: two trainable tensors, one statistic.
UPDATE_SPECS = tff.learning.models.ModelWeights(
    (tf.TensorSpec([4, 3], tf.float32), tf.TensorSpec([5], tf.float32)),
    (tf.TensorSpec([2], tf.float32),))


def masked_updates(seed=0):
  """Three clients' `OrderedDict(update, mask)` shaped like UPDATE_SPECS."""
  rng = np.random.default_rng(seed)
  values = []
  for k in range(3):
    mask = tff.learning.models.ModelWeights(
        (rng.random((4, 3)) < 0.5, np.full(5, float(k != 1))),
        (np.array([1.0, 0.0]) if k else np.zeros(2),))
    mask = tf.nest.map_structure(lambda a: np.asarray(a, np.float32), mask)
    update = tf.nest.map_structure(
        lambda m: rng.normal(size=m.shape).astype(np.float32) * m, mask)
    values.append(collections.OrderedDict(update=update, mask=mask))
  return values


def update_value_type(extra=()):
  """The TFF type of `OrderedDict(update, mask, *extra)` for UPDATE_SPECS."""
  update_type = tff.types.tensorflow_to_type(UPDATE_SPECS)
  return tff.types.StructWithPythonType(
      [('update', update_type), ('mask', update_type), *extra],
      collections.OrderedDict)


def make_certificates(directory, ca_name='ca'):
  """A CA and, signed by it, localhost worker and driver certificates."""
  return make_certificates_lib.make(directory, ca_name=ca_name, days=2)


def start_tls_worker(certificates, port):
  """`python -m tff_fedprune.worker` with mutual TLS on 127.0.0.1:port."""
  process = subprocess.Popen(
      [sys.executable, '-m', 'tff_fedprune.worker', f'--port={port}',
       '--host=127.0.0.1', f'--tls_cert={certificates["worker"]}',
       f'--tls_key={certificates["worker_key"]}',
       f'--tls_client_ca={certificates["ca"]}'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
      stdin=subprocess.DEVNULL)
  line = process.stdout.readline().strip()
  if line != 'ready':
    process.kill()
    raise RuntimeError(f'TLS worker did not start: {line!r}')
  return process


def listening_tcp_sockets():
  """(local address, process info) of every TCP listener (`ss -ltnp`)."""
  out = subprocess.run(['ss', '-Hltnp'], capture_output=True, text=True,
                       check=True).stdout
  return [(line.split()[3], ' '.join(line.split()[5:]))
          for line in out.splitlines() if line.strip()]


def children(pid):
  """Pids of the direct children of `pid`."""
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    return [int(c) for c in f.read().split()]

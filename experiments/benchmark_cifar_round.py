"""CPU time of the paper's CIFAR-10 round, measured on one client-epoch.

  python -m experiments.benchmark_cifar_round [--models=resnet32,vgg11]

The paper's setting (experiments/configs/cifar10_*.cfg) trains 10 clients
for 10 local epochs each round on 5,000 images each (CIFAR-10's 50,000 split
10 ways), batch 64, then evaluates on 10,000 test images. No CIFAR-10 is
needed: one client holds 5,000 synthetic 32x32x3 images (augmented as CIFAR
is) and there are 10,000 synthetic test images. For each model, gated at the
flagfile's keep ratio, it times through an owned TFF worker: a first round
of one client and one local epoch (it traces the computations), a second
such round (steady state), and one evaluation of the global model. The
paper's round is then extrapolated, and printed labelled so, as
10 clients x 10 epochs x the steady client-epoch + one evaluation
(clients share the machine's cores, so their CPU work adds up).
"""

import dataclasses
import time

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.
import keras_models  # pylint: disable=g-import-not-at-top
from tff_fedprune import data  # pylint: disable=g-import-not-at-top
from tff_fedprune import runtime  # pylint: disable=g-import-not-at-top
from tff_fedprune.data import sources  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import loop  # pylint: disable=g-import-not-at-top
from tff_fedprune.simulation import program  # pylint: disable=g-import-not-at-top
from experiments import cifar  # pylint: disable=g-import-not-at-top

_MODELS = flags.DEFINE_list('models', ['resnet32', 'vgg11'],
                            'Architectures to time (their cifar10 flagfile).')
_CLIENT_IMAGES = 5000
_TEST_IMAGES = 10000
_CLIENTS, _EPOCHS = 10, 10


def paper_config(model: str):
  """The flagfile's configuration, reduced to one client and one epoch."""
  values = flags.FlagValues()
  cifar.define_flags(values)
  values(['benchmark',
          f'--flagfile=experiments/configs/cifar10_{model}.cfg'])
  config = cifar.config_from_flags(values)
  return dataclasses.replace(
      config, dataset='synthetic', data_dir=None, num_clients=1,
      clients_per_round=1, partition='iid', local_epochs=1,
      total_rounds=100, eval_every=100)


def synthetic_cifar() -> data.FederatedData:
  source = sources.make_synthetic(_CLIENT_IMAGES, _TEST_IMAGES, (32, 32, 3),
                                  10)
  return data.federate(dataclasses.replace(source, augment=True), 1, 'iid')


def time_model(model: str, fed_data) -> dict:
  """Seconds of the two one-client-epoch rounds and of one evaluation."""
  config = paper_config(model)
  parts = loop.build_parts(config, keras_models.BUILDERS[model], fed_data)
  run_round = program.RoundRunner(parts.process, parts.data_source,
                                  parts.evaluation, parts.traffic)
  state = parts.process.initialize()
  times = {}
  for name, round_num in (('first round', 1), ('client-epoch', 2)):
    start = time.perf_counter()
    state = run_round(state, round_num).state
    times[name] = time.perf_counter() - start
  start = time.perf_counter()
  parts.evaluation.test(parts.process.get_model_weights(state))
  times['evaluation'] = time.perf_counter() - start
  times['keep_ratio'] = config.keep_ratio
  times['batch_size'] = config.batch_size
  return times


def main(argv):
  del argv
  fed_data = synthetic_cifar()
  with runtime.local_runtime():
    for model in _MODELS.value:
      t = time_model(model, fed_data)
      paper = _CLIENTS * _EPOCHS * t['client-epoch'] + t['evaluation']
      print(f'{model}, gated keep {t["keep_ratio"]}, batch {t["batch_size"]},'
            f' {_CLIENT_IMAGES} synthetic 32x32x3 images: first round'
            f' (tracing) {t["first round"]:.1f} s, one client-epoch'
            f' {t["client-epoch"]:.1f} s, evaluation of {_TEST_IMAGES}'
            f' images {t["evaluation"]:.1f} s; extrapolated paper round'
            f' ({_CLIENTS} clients x {_EPOCHS} epochs + evaluation)'
            f' {paper / 60:.1f} min, 100 rounds {100 * paper / 3600:.1f} h',
            flush=True)


if __name__ == '__main__':
  cli.run(main)

"""Every committed flagfile parses into a valid experiment configuration."""

import glob
import os

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

from experiments import cifar
import keras_models
from tests import testing
from tff_fedprune import learning_process
from tff_fedprune.simulation import config as config_lib

ROOT = testing.ROOT
CONFIGS = sorted(glob.glob(
    os.path.join(ROOT, 'experiments', 'configs', '**', '*.cfg'),
    recursive=True))


def parse(path):
  flag_values = flags.FlagValues()
  cifar.define_flags(flag_values)
  flag_values(['cifar', f'--flagfile={path}'])
  return cifar.config_from_flags(flag_values)


class ConfigsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Nested flagfiles are named relative to the repository root.
    cwd = os.getcwd()
    os.chdir(ROOT)
    self.addCleanup(os.chdir, cwd)

  @parameterized.parameters(*CONFIGS)
  def test_flagfile_is_a_valid_configuration(self, path):
    config_lib.validate(parse(path), keras_models.MODELS)

  def test_paper_cells_set_their_algorithm_and_pruning(self):
    for model in ('resnet32', 'vgg11'):
      for algorithm in learning_process.ALGORITHMS:
        for mode in ('dense', 'gated'):
          config = parse(os.path.join(
              ROOT, 'experiments', 'configs', f'cifar10_{model}',
              f'{algorithm}_{mode}.cfg'))
          self.assertEqual(config.model, model)
          self.assertEqual(config.algorithm, algorithm)
          self.assertEqual(config.dynamic_pruning, mode == 'gated')
          self.assertEqual(
              (config.dataset, config.num_clients, config.dirichlet_alpha,
               config.total_rounds, config.local_epochs,
               config.client_learning_rate, config.client_momentum,
               config.batch_size, config.keep_ratio, config.weight_decay),
              ('cifar10', 10, 0.1, 100, 10, 0.01, 0.9, 64, 0.7, 1e-5))
          self.assertEqual(config.experiment_name,
                           f'cifar10_{model}_{algorithm}_{mode}')


if __name__ == '__main__':
  absltest.main()

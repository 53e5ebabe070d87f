"""Runs a comparison grid: algorithms x pruning on/off (or methods) x seeds.

  python -m experiments.grid --flagfile=experiments/configs/fmnist_grid.cfg \\
      --algorithms=fedavg,fedprox,fednova,scaffold --pruning=on,off \\
      --seeds=0,1

The flagfile gives every other setting (the flags of experiments.cifar). Each
cell is a run directory `<root_output_dir>/<experiment_name>/<algorithm>_
<gated|dense>_seed<seed>/`; with `--methods` (`METHODS`: the channel
policies and dense baselines of a heterogeneous federation) in place of
`--pruning`, `<algorithm>_<method>_seed<seed>/`. Finished cells are skipped and unfinished ones
resume from their last checkpoint, so rerunning the same command after a
crash or SIGKILL completes the grid with the results of an uninterrupted one.
When every cell is done, `report.md` (the experiments.report table) and the
comparison plots are written to the grid directory.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags

from experiments import cifar
from tff_fedprune import cli
from tff_fedprune.simulation.methods import METHODS

_ALGORITHMS = flags.DEFINE_list(
    'algorithms', ['fedavg', 'fedprox', 'fednova', 'scaffold'],
    'Algorithms of the grid.')
_PRUNING = flags.DEFINE_list(
    'pruning', ['on', 'off'],
    'on (gated, --dynamic_pruning) and/or off (dense).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of the grid.')
_METHODS = flags.DEFINE_list(
    'methods', [], f'Methods of the grid in place of --pruning: {list(METHODS)}'
    ' (feddp is evaluated with static batch norm, as heterofl and fjord are;'
    ' feddp_trained_bn with its averaged statistics; dense: every client'
    ' trains the full model; dense_full_tier: only the clients of tiers with'
    ' keep ratio 1.0 take part; feddp_identity, feddp_balance, feddp_warmup,'
    ' feddp_distill: FedDP with a remedy, simulation.methods.REMEDIES).')


def cells(base) -> list:
  """The grid's configurations, in the order they run.

  Raises ValueError before anything runs if a list is empty or a cell's
  configuration is invalid (an unknown algorithm, a grid name that is not a
  directory inside --root_output_dir).
  """
  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top

  for name, values in (('algorithms', _ALGORITHMS.value),
                       ('pruning', _PRUNING.value), ('seeds', _SEEDS.value)):
    if not values:
      raise ValueError(f'--{name} is empty')
  if not set(_PRUNING.value) <= {'on', 'off'}:
    raise ValueError(f'--pruning takes on and/or off, got {_PRUNING.value}')
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise ValueError(f'unknown --methods {sorted(unknown)}; choose from'
                     f' {list(METHODS)}')
  variants = ({m: METHODS[m] for m in _METHODS.value} if _METHODS.value else {
      'gated' if p == 'on' else 'dense': dict(dynamic_pruning=p == 'on')
      for p in _PRUNING.value})
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    raise ValueError(f'--seeds takes integers, got {_SEEDS.value}') from e
  grid_dir = base.run_dir
  configs = []
  for seed in seeds:
    for algorithm in _ALGORITHMS.value:
      for variant, overrides in variants.items():
        configs.append(dataclasses.replace(
            base,
            root_output_dir=grid_dir,
            experiment_name=f'{algorithm}_{variant}_seed{seed}',
            algorithm=algorithm,
            seed=seed,
            **overrides,
        ))
  config_lib.validate(base, keras_models.MODELS)
  for config in configs:
    config_lib.validate(config, keras_models.MODELS)
  return configs


def is_finished(config) -> bool:
  """Whether `config`'s run directory holds all its rounds for `config`."""
  try:
    with open(os.path.join(config.run_dir, 'summary.json')) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return False
  from tff_fedprune.simulation import config as config_lib  # pylint: disable=g-import-not-at-top

  return (config_lib.with_defaults(summary['config'])
          == dataclasses.asdict(config)
          and summary['rounds_completed'] >= config.total_rounds)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cifar.quiet_logs()
  from tff_fedprune.simulation import reporting  # pylint: disable=g-import-not-at-top

  base = cifar.config_from_flags()
  try:
    configs = cells(base)
  except ValueError as e:  # config.ConfigError included.
    print(f'error: {e}', file=sys.stderr)
    return 2
  from tff_fedprune.simulation import run_directory  # pylint: disable=g-import-not-at-top

  try:
    run_directory.prepare(base.root_output_dir, base.run_dir)
  except run_directory.RunDirectoryError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for i, config in enumerate(configs, 1):
    name = f'[{i}/{len(configs)}] {config.experiment_name}'
    if is_finished(config):
      print(f'{name}: finished, skipped', flush=True)
      continue
    print(f'{name}: running', flush=True)
    code = cifar.run(config)
    if code:
      return code
  from tff_fedprune import files  # pylint: disable=g-import-not-at-top

  runs = [reporting.load_run(c.run_dir) for c in configs]
  table = reporting.markdown_table(reporting.summarize(runs))
  files.write_atomically(os.path.join(base.run_dir, 'report.md'),
                         table.encode('utf-8'))
  reporting.plot_runs(runs, os.path.join(base.run_dir, 'plots'))
  print(table, end='')
  print(f'report: {os.path.join(base.run_dir, "report.md")}')
  return 0


if __name__ == '__main__':
  cifar.define_flags()
  cli.run(main)

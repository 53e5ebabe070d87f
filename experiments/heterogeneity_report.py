"""The report of a heterogeneous-federation grid (`simulation.tier_report`).

  python -m experiments.heterogeneity_report --grid_dir=GRID \\
      [--remedies_dir=REMEDIES] [--target_accuracy=0.6]

GRID holds the run directories of experiments.grid --methods=... (and, if
experiments.tier_exports ran on them, their tier_exports.json); REMEDIES
those of FedDP's remedies (--methods=feddp_identity,...), compared with
GRID's FedDP runs of the same seed over the same rounds. Writes
GRID/report.md and prints it.
"""

import os
import sys

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.

# The full-width accuracy the committed reports time (dense reaches it by
# round 10 of the Fashion-MNIST grid).
TARGET_ACCURACY = 0.6

_GRID_DIR = flags.DEFINE_string('grid_dir', None, 'The grid directory.',
                                required=True)
_REMEDIES_DIR = flags.DEFINE_string(
    'remedies_dir', None, 'A grid directory of FedDP remedy runs.')
_TARGET = flags.DEFINE_float(
    'target_accuracy', TARGET_ACCURACY, 'Full-width test accuracy whose simulated time'
    ' to reach is reported.')


def finished_runs(grid_dir: str) -> list:
  """The runs under `grid_dir` that wrote their summary."""
  from tff_fedprune.simulation import reporting  # pylint: disable=g-import-not-at-top

  runs = [reporting.load_run(os.path.join(grid_dir, d))
          for d in sorted(os.listdir(grid_dir))
          if os.path.exists(os.path.join(grid_dir, d, 'summary.json'))]
  if not runs:
    raise ValueError(f'{grid_dir} holds no finished run')
  return runs


def report(grid_dir: str, target: float, remedies_dir=None) -> str:
  """The markdown report of the finished runs under `grid_dir` (and of
  the remedies under `remedies_dir`)."""
  from tff_fedprune.simulation import methods  # pylint: disable=g-import-not-at-top
  from tff_fedprune.simulation import tier_report  # pylint: disable=g-import-not-at-top

  runs = finished_runs(grid_dir)
  remedies = ()
  if remedies_dir:
    feddp = [r for r in runs if methods.method_of(r.config) == 'feddp']
    remedies = tier_report.summarize_remedies(
        finished_runs(remedies_dir), feddp, target)
  return tier_report.markdown(tier_report.summarize(runs, target), target,
                              remedies)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from tff_fedprune import files  # pylint: disable=g-import-not-at-top

  try:
    table = report(_GRID_DIR.value, _TARGET.value, _REMEDIES_DIR.value)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  files.write_atomically(os.path.join(_GRID_DIR.value, 'report.md'),
                         table.encode('utf-8'))
  print(table, end='')
  return 0


if __name__ == '__main__':
  cli.run(main)

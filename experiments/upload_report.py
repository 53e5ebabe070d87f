"""The upload comparison: the grid's cells beside their quantised variants.

  python -m experiments.upload_report [--results_dir=results]

Reads the FedAvg and SCAFFOLD cells of `<results_dir>/fmnist_grid/` and
every quantised grid `<results_dir>/fmnist_grid_<bits>bit*/`, and writes
`<results_dir>/upload_comparison.md` (the experiments.report table, then
each gated FedAvg variant's last-5 accuracy against the float32 gated cells,
paired by seed) and `<results_dir>/upload_comparison_plots/` (accuracy
against cumulative upload, among others).
"""

import os
import re
import sys

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.
from tff_fedprune import files
from tff_fedprune.simulation import reporting

_RESULTS_DIR = flags.DEFINE_string('results_dir', 'results',
                                   'Directory of the committed results.')
REFERENCE = 'fedavg gated keep 0.7 tau 0.5'
_QUANTISED_GRID = re.compile(r'fmnist_grid_\d+bit(_\w+)?$')


def run_dirs(results_dir: str) -> list[str]:
  """The compared run directories, grid by grid, in name order."""
  grid = os.path.join(results_dir, 'fmnist_grid')
  dirs = [d for d in _runs_in(grid)
          if os.path.basename(d).split('_')[0] in ('fedavg', 'scaffold')]
  for name in sorted(os.listdir(results_dir)):
    if _QUANTISED_GRID.match(name):
      dirs += _runs_in(os.path.join(results_dir, name))
  return dirs


def _runs_in(directory: str) -> list[str]:
  return sorted(
      os.path.join(directory, n) for n in os.listdir(directory)
      if os.path.isfile(os.path.join(directory, n, 'metrics.csv')))


def report(runs: list) -> str:
  """The comparison table and the paired table, as markdown."""
  paired = reporting.paired_against(runs, REFERENCE)
  return (reporting.markdown_table(reporting.summarize(runs)) + '\n'
          + reporting.paired_markdown(paired, 'float32 gated'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  results_dir = _RESULTS_DIR.value
  try:
    runs = [reporting.load_run(d) for d in run_dirs(results_dir)]
    text = report(runs)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  path = os.path.join(results_dir, 'upload_comparison.md')
  files.write_atomically(path, text.encode('utf-8'))
  reporting.plot_runs(
      runs, os.path.join(results_dir, 'upload_comparison_plots'),
      colour_by='label')
  print(text, end='')
  return 0


if __name__ == '__main__':
  cli.run(main)

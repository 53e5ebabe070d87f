"""Markdown table and plots comparing run directories.

  python -m experiments.report RUN_DIR [RUN_DIR ...] [--plots_dir=DIR]

Prints a table (final and best accuracy, total upload, upload vs the dense
run of the same algorithm, FLOPs ratio, wall time; mean ± std over seeds) and
writes accuracy, upload, density and FLOPs plots under --plots_dir.
"""

import sys

from absl import app
from absl import flags

from tff_fedprune.simulation import reporting

_PLOTS_DIR = flags.DEFINE_string('plots_dir', 'plots',
                                 'Where the comparison plots are written.')


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories')
  try:
    runs = [reporting.load_run(path) for path in argv[1:]]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(reporting.markdown_table(reporting.summarize(runs)), end='')
  for path in reporting.plot_runs(runs, _PLOTS_DIR.value):
    print(f'plot: {path}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

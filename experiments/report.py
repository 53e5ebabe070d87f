"""Markdown table and plots comparing run directories.

  python -m experiments.report RUN_DIR [RUN_DIR ...] [--plots_dir=DIR]

Prints a table (final, last-5 and best accuracy, total upload, upload vs the
dense run of the same algorithm, upload to reach the target accuracy and its
ratio to the dense run's, FLOPs ratio, wall time; mean ± std over seeds) and
writes accuracy, upload, density and FLOPs plots under --plots_dir.
"""

import sys

from absl import app
from absl import flags

from tff_fedprune import cli  # Before TensorFlow: it quiets its start-up.
from tff_fedprune.simulation import reporting  # pylint: disable=g-import-not-at-top

_PLOTS_DIR = flags.DEFINE_string('plots_dir', 'plots',
                                 'Where the comparison plots are written.')
_TARGET_ACCURACY = flags.DEFINE_float(
    'target_accuracy', None,
    'Accuracy for the upload-to-target columns (default: 95% of the paired'
    " dense run's last-5 accuracy).")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories')
  target = _TARGET_ACCURACY.value
  if target is not None and not 0 < target <= 1:
    raise app.UsageError(f'--target_accuracy must be in (0, 1], got {target}')
  try:
    runs = [reporting.load_run(path) for path in argv[1:]]
    table = reporting.summarize(runs, target)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(reporting.markdown_table(table), end='')
  for path in reporting.plot_runs(runs, _PLOTS_DIR.value):
    print(f'plot: {path}')
  return 0


if __name__ == '__main__':
  cli.run(main)

"""The start of every command-line program: quiet TensorFlow, one-line errors.

Every program (`experiments.cifar`, `grid`, `report`, `export_tflite`,
`make_certificates`, `tff_fedprune.worker`) runs its `main` through `run`, so
that whatever the user got wrong (a flag, a flagfile, an argument, a file it
cannot write) is one `error:` line on stderr and exit code 2, with no
TensorFlow start-up lines before it. Import this module before TensorFlow.
"""

import os
import sys

# TensorFlow's C++ start-up lines (cuDNN/cuFFT factories) would come before
# a one-line error; set the variable to see them.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

USAGE_ERROR = 2


def fail(message, code: int = USAGE_ERROR):
  """Prints `error: message` (its first line) on stderr and exits."""
  lines = str(message).strip().splitlines() or ['']
  print(f'error: {lines[0]}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags_or_exit(argv, flag_values=flags.FLAGS):
  """absl's flag parsing, with its errors as one `error:` line and exit 2."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    fail(e)
  except (OSError, UnicodeError) as e:
    fail(f'cannot read a flagfile: {e}')


def os_error_message(e: OSError) -> str:
  where = e.filename or ''
  return f'{where}: {e.strerror or e}' if where else str(e.strerror or e)


def quiet_logs():
  """absl and TensorFlow Python logging at ERROR only."""
  logging.set_verbosity(logging.ERROR)
  if 'tensorflow' in sys.modules:
    sys.modules['tensorflow'].get_logger().setLevel('ERROR')


def run(main):
  """`app.run(main)`; usage and file-system errors as one line, exit 2.

  `main(argv)` returns the exit code; it may raise `app.UsageError`.
  """

  def checked(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e)
    except OSError as e:
      fail(os_error_message(e))

  app.run(lambda argv: sys.exit(checked(argv)),
          flags_parser=parse_flags_or_exit)

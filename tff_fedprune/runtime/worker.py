"""A TFF worker service in the foreground: `python -m tff_fedprune.worker`.

  python -m tff_fedprune.worker --port=8000

Replaces itself with the `worker_binary` shipped in the TFF wheel (TFF's C++
executor service over gRPC), so signals and exit status are the service's
own. Experiments reach such workers with `--workers=host:port` (`contexts`).
"""

import os

from absl import app
from absl import flags

from tff_fedprune.runtime import worker_process

_PORT = flags.DEFINE_integer('port', 8000, 'Port to serve on.')
_MAX_CALLS = flags.DEFINE_integer(
    'max_concurrent_computation_calls', -1,
    'Concurrent computation calls the service accepts (<= 0: unlimited).',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not 0 < _PORT.value < 65536:
    raise app.UsageError(f'--port must be in 1..65535, got {_PORT.value}')
  binary = worker_process.worker_binary_path()
  os.execv(binary, [
      binary,
      f'--port={_PORT.value}',
      f'--max_concurrent_computation_calls={_MAX_CALLS.value}',
  ])


"""A TFF worker service for other machines: `python -m tff_fedprune.worker`.

  python -m tff_fedprune.worker --port=8000 \\
      --tls_cert=worker.pem --tls_key=worker.key --tls_client_ca=ca.pem

TFF's `worker_binary` (its C++ executor service over gRPC) runs whatever
TensorFlow graph a client sends and has no authentication of its own. So this
service runs it in a private network namespace behind `relay.py`, which
serves `--port` over TLS with client certificates: only a driver holding a
certificate signed by `--tls_client_ca` gets through (the experiment's
`--worker_ca_cert`, `--worker_client_cert`, `--worker_client_key`). The
process becomes the relay, so signals and exit status are its own, and the
binary dies with it. Where the kernel refuses unprivileged user namespaces
it exits 3 rather than expose the binary. Bad flags or unusable TLS files
are one `error:` line on stderr and exit 2 (`tff_fedprune.cli`).

`--insecure_plaintext_no_auth` instead runs the bare binary on `--port`, on
every interface, without encryption or authentication: only for a network
where every host is trusted.
"""

import os
import ssl
import sys

from absl import app
from absl import flags

from tff_fedprune.runtime import relay
from tff_fedprune.runtime import worker_process

_PORT = flags.DEFINE_integer('port', 8000, 'Port to serve on.')
_HOST = flags.DEFINE_string(
    'host', '0.0.0.0', 'Address the TLS port binds (0.0.0.0: every IPv4'
    ' interface, 127.0.0.1: this machine only).')
_MAX_CALLS = flags.DEFINE_integer(
    'max_concurrent_computation_calls', -1,
    'Concurrent computation calls the service accepts (<= 0: unlimited).',
)
_TLS_CERT = flags.DEFINE_string(
    'tls_cert', None, "PEM certificate chain of this worker (its host name"
    " or address in subjectAltName).")
_TLS_KEY = flags.DEFINE_string('tls_key', None, 'PEM private key of --tls_cert.')
_TLS_CLIENT_CA = flags.DEFINE_string(
    'tls_client_ca', None, 'PEM CA certificate that signs the certificates of'
    ' drivers allowed to connect.')
_INSECURE = flags.DEFINE_bool(
    'insecure_plaintext_no_auth', False, 'Serve the bare worker_binary on'
    ' every interface without TLS or authentication (anyone who reaches the'
    ' port can run code as this user).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not 0 < _PORT.value < 65536:
    raise app.UsageError(f'--port must be in 1..65535, got {_PORT.value}')
  binary = worker_process.worker_binary_path()
  calls = f'--max_concurrent_computation_calls={_MAX_CALLS.value}'
  if _INSECURE.value:
    os.execv(binary, [binary, f'--port={_PORT.value}', calls])
  tls_files = (_TLS_CERT.value, _TLS_KEY.value, _TLS_CLIENT_CA.value)
  if not all(tls_files):
    raise app.UsageError(
        'give --tls_cert, --tls_key and --tls_client_ca (mutual TLS), or'
        ' --insecure_plaintext_no_auth'
    )
  for path in tls_files:
    if not os.path.isfile(path):
      raise app.UsageError(f'no such file: {path}')
  try:
    relay.tls_context(*tls_files)
  except (OSError, ssl.SSLError) as e:
    raise app.UsageError(
        f'--tls_cert, --tls_key and --tls_client_ca must be a readable PEM'
        f' certificate, its key and a CA certificate ({e.strerror or e})'
    ) from None
  os.execv(sys.executable, [
      sys.executable, worker_process.RELAY,
      f'--tls_port={_PORT.value}', f'--tls_host={_HOST.value}',
      f'--tls_cert={_TLS_CERT.value}', f'--tls_key={_TLS_KEY.value}',
      f'--tls_client_ca={_TLS_CLIENT_CA.value}', '--', binary, calls,
  ])

"""Makes a CA and the certificates for workers and drivers (mutual TLS).

  python -m experiments.make_certificates --out_dir=certs \\
      --worker_names=DNS:hostA,DNS:hostB,IP:10.0.0.5

writes `ca.pem` (give it to workers as --tls_client_ca and to drivers as
--worker_ca_cert), `ca.key` (keep it offline: it signs new members),
`ca_worker.pem`/`ca_worker.key` (workers' --tls_cert/--tls_key, valid for the
names given) and `ca_driver.pem`/`ca_driver.key` (the driver's
--worker_client_cert/--worker_client_key). ECDSA P-256 keys made with the
`openssl` command line; the commands are those of the README's Security
section.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write the files.')
_WORKER_NAMES = flags.DEFINE_list(
    'worker_names', ['DNS:localhost', 'IP:127.0.0.1'],
    "subjectAltName entries of the workers' certificate (how drivers address"
    ' them).')
_DAYS = flags.DEFINE_integer('days', 365, 'Validity of every certificate.')


def make(directory, worker_names=('DNS:localhost', 'IP:127.0.0.1'),
         days=365, ca_name='ca'):
  """Writes the files; returns {'ca', 'worker', 'worker_key', 'driver',
  'driver_key'} paths. Raises subprocess.CalledProcessError on failure."""
  def openssl(*args):
    subprocess.run(['openssl', *args], cwd=directory, check=True,
                   capture_output=True)

  os.makedirs(directory, exist_ok=True)
  ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
  openssl('req', '-x509', *ec, '-days', str(days), '-subj', f'/CN={ca_name}',
          '-keyout', f'{ca_name}.key', '-out', f'{ca_name}.pem')
  san = f'{ca_name}_worker.ext'
  with open(os.path.join(directory, san), 'w') as f:
    f.write(f'subjectAltName={",".join(worker_names)}\n')
  paths = {'ca': os.path.join(directory, f'{ca_name}.pem')}
  for name, extra in (('worker', ['-extfile', san]), ('driver', [])):
    prefix = f'{ca_name}_{name}'
    openssl('req', *ec, '-subj', f'/CN={name}', '-keyout', f'{prefix}.key',
            '-out', f'{prefix}.csr')
    openssl('x509', '-req', '-in', f'{prefix}.csr', '-CA', f'{ca_name}.pem',
            '-CAkey', f'{ca_name}.key', '-CAcreateserial', '-days', str(days),
            *extra, '-out', f'{prefix}.pem')
    paths[name] = os.path.join(directory, f'{prefix}.pem')
    paths[f'{name}_key'] = os.path.join(directory, f'{prefix}.key')
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUT_DIR.value:
    raise app.UsageError('--out_dir is required')
  try:
    paths = make(_OUT_DIR.value, _WORKER_NAMES.value, _DAYS.value)
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, 'stderr', b'') or b''
    print(f'error: openssl failed: {e} {detail.decode().strip()}'.strip(),
          file=sys.stderr)
    return 1
  for name, path in paths.items():
    print(f'{name}: {path}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

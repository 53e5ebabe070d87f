"""Makes a CA and the certificates for workers and drivers (mutual TLS).

  python -m experiments.make_certificates --out_dir=certs \\
      --worker_names=DNS:hostA,DNS:hostB,IP:10.0.0.5

writes `ca.pem` (give it to workers as --tls_client_ca and to drivers as
--worker_ca_cert), `ca.key` (keep it offline: it signs new members),
`ca_worker.pem`/`ca_worker.key` (workers' --tls_cert/--tls_key, valid for the
names given) and `ca_driver.pem`/`ca_driver.key` (the driver's
--worker_client_cert/--worker_client_key). With `--worker_hosts=A,B`, each
worker host gets its own `ca_worker_A.pem`/`.key` instead, valid for that
name alone, so that one compromised host cannot impersonate the others.

Worker certificates allow only serverAuth and driver certificates only
clientAuth (extended key usage): workers refuse a worker's certificate from a
driver, and drivers a driver's from a worker. ECDSA P-256 keys made with the
`openssl` command line. Every file is made in a temporary directory and
linked in only if none of them exists yet: an existing CA key is never
overwritten, and a failure leaves nothing behind.
"""

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile

from absl import app
from absl import flags

from tff_fedprune import cli

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write the files.')
_WORKER_NAMES = flags.DEFINE_list(
    'worker_names', ['DNS:localhost', 'IP:127.0.0.1'],
    "subjectAltName entries of the shared workers' certificate (how drivers"
    ' address them).')
_WORKER_HOSTS = flags.DEFINE_list(
    'worker_hosts', [], 'One certificate per worker host instead of the'
    ' shared one: host names or IP addresses, each written as'
    ' ca_worker_HOST.pem/.key.')
_DAYS = flags.DEFINE_integer('days', 365, 'Validity of every certificate.')

_MAX_DAYS = 36500
_WORKER_USAGE = 'keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n'
_DRIVER_USAGE = 'keyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n'


class CertificateError(ValueError):
  """The certificates cannot be made as asked."""


def subject_alt_name(host: str) -> str:
  """'10.0.0.5' -> 'IP:10.0.0.5', 'hostA' -> 'DNS:hostA'."""
  try:
    return f'IP:{ipaddress.ip_address(host)}'
  except ValueError:
    pass
  if not re.fullmatch(r'[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?', host):
    raise CertificateError(f'worker host {host!r} is not a host name or IP'
                           ' address')
  return f'DNS:{host}'


def _check_names(worker_names, days) -> None:
  if not worker_names:
    raise CertificateError('--worker_names is empty')
  for entry in worker_names:
    kind, _, value = entry.partition(':')
    try:
      ok = kind in ('DNS', 'IP') and subject_alt_name(value).startswith(kind)
    except CertificateError:
      ok = False
    if not ok:
      raise CertificateError(f'--worker_names entry {entry!r} is not DNS:NAME'
                             ' or IP:ADDRESS')
  if not 1 <= days <= _MAX_DAYS:
    raise CertificateError(f'--days must be in 1..{_MAX_DAYS}, got {days}')


def _plan(worker_names, worker_hosts, ca_name) -> dict:
  """{file prefix: (extensions, subject)} of the leaf certificates."""
  workers = {f'{ca_name}_worker': (worker_names, 'worker')}
  if worker_hosts:
    workers = {
        f'{ca_name}_worker_{host.replace(":", "_")}':
            ([subject_alt_name(host)], f'worker {host}')
        for host in worker_hosts
    }
  plan = {prefix: (f'subjectAltName={",".join(names)}\n{_WORKER_USAGE}',
                   subject)
          for prefix, (names, subject) in workers.items()}
  plan[f'{ca_name}_driver'] = (_DRIVER_USAGE, 'driver')
  return plan


def _generate(work, plan, days, ca_name) -> None:
  def openssl(*args):
    subprocess.run(['openssl', *args], cwd=work, check=True,
                   capture_output=True)

  ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
  openssl('req', '-x509', *ec, '-days', str(days), '-subj', f'/CN={ca_name}',
          '-keyout', f'{ca_name}.key', '-out', f'{ca_name}.pem')
  for prefix, (extensions, subject) in plan.items():
    with open(os.path.join(work, f'{prefix}.ext'), 'w') as f:
      f.write(extensions)
    openssl('req', *ec, '-subj', f'/CN={subject}', '-keyout', f'{prefix}.key',
            '-out', f'{prefix}.csr')
    openssl('x509', '-req', '-in', f'{prefix}.csr', '-CA', f'{ca_name}.pem',
            '-CAkey', f'{ca_name}.key', '-CAcreateserial', '-days', str(days),
            '-extfile', f'{prefix}.ext', '-out', f'{prefix}.pem')


def make(directory, worker_names=('DNS:localhost', 'IP:127.0.0.1'),
         days=365, ca_name='ca', worker_hosts=()):
  """Writes the files; returns {'ca', 'worker', 'worker_key', 'driver',
  'driver_key'} paths ('worker_HOST', 'worker_HOST_key' per host with
  `worker_hosts`). Raises CertificateError if any file exists or a name is
  malformed, subprocess.CalledProcessError if openssl fails."""
  _check_names(list(worker_names), days)
  plan = _plan(list(worker_names), list(worker_hosts), ca_name)
  names = [f'{ca_name}.pem', f'{ca_name}.key']
  for prefix in plan:
    names += [f'{prefix}.pem', f'{prefix}.key']
  existing = [n for n in names if os.path.lexists(os.path.join(directory, n))]
  if existing:
    raise CertificateError(f'{directory} already holds {", ".join(existing)};'
                           ' refusing to overwrite (give another --out_dir)')
  os.makedirs(directory, mode=0o700, exist_ok=True)
  work = tempfile.mkdtemp(prefix='.make_certificates-', dir=directory)
  linked = []
  try:
    _generate(work, plan, days, ca_name)
    for name in names:
      os.chmod(os.path.join(work, name), 0o600 if name.endswith('.key')
               else 0o644)
      os.link(os.path.join(work, name), os.path.join(directory, name))
      linked.append(name)
  except BaseException:
    for name in linked:
      os.remove(os.path.join(directory, name))
    raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  paths = {'ca': os.path.join(directory, f'{ca_name}.pem')}
  for prefix in plan:
    key = prefix[len(ca_name) + 1:]
    paths[key] = os.path.join(directory, f'{prefix}.pem')
    paths[f'{key}_key'] = os.path.join(directory, f'{prefix}.key')
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUT_DIR.value:
    raise app.UsageError('--out_dir is required')
  try:
    paths = make(_OUT_DIR.value, _WORKER_NAMES.value, _DAYS.value,
                 worker_hosts=_WORKER_HOSTS.value)
  except CertificateError as e:
    cli.fail(e)
  except subprocess.CalledProcessError as e:
    detail = (e.stderr or b'').decode(errors='replace').strip()
    cli.fail(f'openssl failed: {detail or e}', code=1)
  for name, path in paths.items():
    print(f'{name}: {path}')
  return 0


if __name__ == '__main__':
  cli.run(main)

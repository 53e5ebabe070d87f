"""The TFF `worker_binary` process, owned by this process.

TFF's default local context starts `worker_binary` with the parent's stdout and
stderr and never reaps it when Python exits, so `cmd | tail` and CI hang on the
orphan. Here the project starts that binary itself: its lifetime is tied to the
parent's (`PR_SET_PDEATHSIG`, so even SIGKILL of the parent ends it), it does
not inherit the parent's output, and it is stopped on exit.

The binary listens on every interface and runs any graph it is sent, without
authentication. So by default it runs in a private network namespace behind
`relay.py`, reached only through an owner-only Unix socket
(`unix:PATH`). Where the kernel refuses unprivileged user namespaces, the
worker falls back to a plain port and says so in one warning line.
"""

import atexit
import ctypes
import importlib.util
import os
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from typing import Optional

from cryptography import x509
import grpc

from tff_fedprune import files
from tff_fedprune.runtime import relay

_PR_SET_PDEATHSIG = 1
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = [
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_BYTES),
]


class WorkerError(RuntimeError):
  """A TFF worker could not be started or reached."""


def worker_binary_path() -> str:
  """Returns the path of the `worker_binary` shipped in the TFF wheel."""
  spec = importlib.util.find_spec('tensorflow_federated')
  if spec is None or not spec.origin:
    raise WorkerError('tensorflow_federated is not installed')
  path = os.path.join(os.path.dirname(spec.origin), 'data', 'worker_binary')
  if not os.path.isfile(path):
    raise WorkerError(f'TFF worker binary not found at {path}')
  return path


def _pick_free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _tie_to_parent(parent_pid: int):
  """Returns a `preexec_fn` that makes the child die with its parent."""

  def preexec():
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # The parent died before prctl took hold.
      os._exit(1)

  return preexec


RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'relay.py')
_SOCKET_DIR_PREFIX = 'tff_fedprune_worker_'


def remove_dead_socket_directories() -> None:
  """Deletes this user's worker socket directories whose owner has died.

  A SIGKILLed driver cannot remove its `tff_fedprune_worker_PID_*`
  directory; the next owned worker does.
  """
  pattern = re.compile(re.escape(_SOCKET_DIR_PREFIX) + r'(\d+)_\w+$')
  root = tempfile.gettempdir()
  for name in os.listdir(root):
    match = pattern.match(name)
    path = os.path.join(root, name)
    if not match or files.pid_alive(int(match.group(1))):
      continue
    try:
      info = os.lstat(path)
    except FileNotFoundError:
      continue
    if info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode):
      shutil.rmtree(path, ignore_errors=True)


def _read_status(process: subprocess.Popen, timeout_s: float) -> str:
  """The relay's first stdout line ('' if none came within the timeout)."""
  ready, _, _ = select.select([process.stdout], [], [], timeout_s)
  line = process.stdout.readline().strip() if ready else ''
  process.stdout.close()
  return line


class OwnedWorker:
  """A `worker_binary` process that lives no longer than this process.

  With `isolate` (the default) it runs in a private network namespace and is
  reached at `unix:PATH`; otherwise, or where the kernel refuses the
  namespace, at `localhost:PORT` while listening on every interface.
  Start it from the main thread: the kernel's parent-death signal follows the
  thread that forked the child.
  """

  def __init__(
      self,
      port: Optional[int] = None,
      log_path: Optional[str] = None,
      max_concurrent_computation_calls: int = -1,
      isolate: bool = True,
  ):
    self.port = port or _pick_free_port()
    self._log_path = log_path
    self._max_calls = max_concurrent_computation_calls
    self._isolate = isolate
    self._process: Optional[subprocess.Popen] = None
    self._socket_dir: Optional[str] = None

  @property
  def address(self) -> str:
    if self._socket_dir:
      return f'unix:{os.path.join(self._socket_dir, "worker.sock")}'
    return f'localhost:{self.port}'

  @property
  def isolated(self) -> bool:
    return self._socket_dir is not None

  @property
  def pid(self) -> Optional[int]:
    """The pid of the process started (the relay, when isolated)."""
    return self._process.pid if self._process else None

  def start(self, timeout_s: float = 60.0) -> 'OwnedWorker':
    """Starts the process and waits until it serves gRPC."""
    if self._process is not None:
      return self
    worker = [
        worker_binary_path(),
        f'--max_concurrent_computation_calls={self._max_calls}',
    ]
    log = (
        open(self._log_path, 'ab')
        if self._log_path
        else subprocess.DEVNULL
    )
    popen = dict(
        stdin=subprocess.DEVNULL,
        stderr=log,
        close_fds=True,
        preexec_fn=_tie_to_parent(os.getpid()),
    )
    try:
      if self._isolate:
        self._start_isolated(worker, popen, timeout_s)
      if self._process is None:
        self._process = subprocess.Popen(
            worker + [f'--port={self.port}'], stdout=log, **popen
        )
    finally:
      if log is not subprocess.DEVNULL:
        log.close()
    atexit.register(self.stop)
    try:
      wait_until_ready(self.address, timeout_s, process=self._process)
    except WorkerError:
      self.stop()
      raise
    return self

  def _start_isolated(self, worker, popen, timeout_s) -> None:
    remove_dead_socket_directories()
    socket_dir = tempfile.mkdtemp(prefix=f'{_SOCKET_DIR_PREFIX}{os.getpid()}_')
    path = os.path.join(socket_dir, 'worker.sock')
    process = subprocess.Popen(
        [sys.executable, RELAY, f'--socket={path}', '--', *worker],
        stdout=subprocess.PIPE, text=True, **popen
    )
    status = _read_status(process, timeout_s)
    if status == 'ready':
      self._process, self._socket_dir = process, socket_dir
      return
    process.kill()
    process.wait()
    shutil.rmtree(socket_dir, ignore_errors=True)
    if not status.startswith('unavailable:'):
      raise WorkerError(f'TFF worker could not start: {status or "timeout"}')
    print(
        f'warning: TFF worker not isolated (private network namespace'
        f' {status}): it listens unauthenticated on every interface at port'
        f' {self.port}',
        file=sys.stderr, flush=True,
    )

  def stop(self) -> None:
    """Stops the process (SIGTERM, then SIGKILL) and reaps it."""
    process, self._process = self._process, None
    socket_dir, self._socket_dir = self._socket_dir, None
    if socket_dir:
      shutil.rmtree(socket_dir, ignore_errors=True)
    if process is None:
      return
    atexit.unregister(self.stop)
    if process.poll() is None:
      process.terminate()
      try:
        process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

  def __enter__(self) -> 'OwnedWorker':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def tls_client_context(
    ca_cert: str, client_cert: str, client_key: str
) -> ssl.SSLContext:
  """A driver's side of mutual TLS; WorkerError if a file is not usable PEM
  or the driver's certificate does not allow clientAuth."""
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
  context.set_alpn_protocols(['h2'])
  try:
    context.load_verify_locations(ca_cert)
  except (OSError, ssl.SSLError) as e:
    raise WorkerError(f'{ca_cert} is not a readable PEM CA certificate'
                      f' ({e.strerror or e})') from None
  try:
    context.load_cert_chain(client_cert, client_key)
  except (OSError, ssl.SSLError) as e:
    raise WorkerError(f'{client_cert} and {client_key} are not a readable PEM'
                      f' certificate and its key ({e.strerror or e})') from None
  if not relay.allows(x509.load_pem_x509_certificate(_read(client_cert)),
                      relay.CLIENT_AUTH):
    raise WorkerError(
        f'{client_cert} lacks the clientAuth extended key usage (a worker\'s'
        ' certificate, or one made before it was required: regenerate with'
        ' experiments.make_certificates)')
  return context


def check_worker_certificate(address: str, context: ssl.SSLContext,
                             timeout_s: float) -> None:
  """Raises WorkerError unless the worker at host:port presents, verified
  by `context`, a certificate that allows serverAuth: a driver's (or any
  client-only) certificate cannot pose as a worker."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  try:
    with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
      with context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
  except ssl.SSLCertVerificationError as e:
    raise WorkerError(f'the worker at {address} presents a certificate this'
                      f' driver does not accept ({e.verify_message})') from None
  except (OSError, ssl.SSLError) as e:
    raise WorkerError(f'cannot reach the TLS worker at {address}'
                      f' ({e.strerror or e})') from None
  if not relay.allows(x509.load_der_x509_certificate(der), relay.SERVER_AUTH):
    raise WorkerError(
        f'the worker at {address} presents a certificate without the'
        ' serverAuth extended key usage (a driver\'s certificate, or one made'
        ' before it was required: regenerate with'
        ' experiments.make_certificates)')


def _read(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise WorkerError(f'cannot read {path}: {e.strerror}') from e


def tls_credentials(
    ca_cert: str, client_cert: str, client_key: str
) -> grpc.ChannelCredentials:
  """Mutual-TLS credentials of a driver for `python -m tff_fedprune.worker`."""
  tls_client_context(ca_cert, client_cert, client_key)  # Checks the files.
  return grpc.ssl_channel_credentials(
      root_certificates=_read(ca_cert),
      private_key=_read(client_key),
      certificate_chain=_read(client_cert),
  )


def open_channel(
    address: str, credentials: Optional[grpc.ChannelCredentials] = None
) -> grpc.Channel:
  """A gRPC channel to a worker: TLS with `credentials`, else plaintext.

  Plaintext is for `unix:` sockets (owner-only, on this machine: always
  plaintext), or remote workers the caller chose to trust
  (`--insecure_workers`).
  """
  if credentials is None or is_local_socket(address):
    return grpc.insecure_channel(address, GRPC_OPTIONS)
  return grpc.secure_channel(address, credentials, GRPC_OPTIONS)


def wait_until_ready(
    address: str,
    timeout_s: float,
    process: Optional[subprocess.Popen] = None,
    credentials: Optional[grpc.ChannelCredentials] = None,
) -> None:
  """Blocks until a TFF executor service answers at `address`."""
  channel = open_channel(address, credentials)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
  except grpc.FutureTimeoutError as e:
    died = process is not None and process.poll() is not None
    reason = 'exited' if died else f'did not answer within {timeout_s:.0f} s'
    raise WorkerError(f'TFF worker at {address} {reason}') from e
  finally:
    channel.close()


def is_serving(
    address: str,
    timeout_s: float = 1.0,
    credentials: Optional[grpc.ChannelCredentials] = None,
) -> bool:
  """Whether a TFF executor service answers at `address` within the timeout."""
  try:
    wait_until_ready(address, timeout_s, credentials=credentials)
    return True
  except WorkerError:
    return False


def parse_addresses(spec: str) -> list[str]:
  """'host:port,unix:/path' -> a list, with a clear error when malformed.

  `unix:/path` names a worker socket on this machine (an owned worker's).
  """
  addresses = [a.strip() for a in spec.split(',') if a.strip()]
  for address in addresses:
    if is_local_socket(address):
      if not os.path.isabs(address[len('unix:'):]):
        raise ValueError(f'worker address {address!r} is not unix:/abs/path')
      continue
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(
          f'worker address {address!r} is not host:port or unix:/path'
      )
  return addresses


def is_local_socket(address: str) -> bool:
  return address.startswith('unix:')

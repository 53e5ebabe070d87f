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
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Optional

import grpc
import tensorflow_federated as tff

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
  path = os.path.join(os.path.dirname(tff.__file__), 'data', 'worker_binary')
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
    socket_dir = tempfile.mkdtemp(prefix='tff_fedprune_worker_')
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


def tls_credentials(
    ca_cert: str, client_cert: str, client_key: str
) -> grpc.ChannelCredentials:
  """Mutual-TLS credentials of a driver for `python -m tff_fedprune.worker`."""
  def read(path):
    try:
      with open(path, 'rb') as f:
        return f.read()
    except OSError as e:
      raise WorkerError(f'cannot read {path}: {e.strerror}') from e

  return grpc.ssl_channel_credentials(
      root_certificates=read(ca_cert),
      private_key=read(client_key),
      certificate_chain=read(client_cert),
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

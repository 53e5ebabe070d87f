"""The TFF `worker_binary` process, owned by this process.

TFF's default local context starts `worker_binary` with the parent's stdout and
stderr and never reaps it when Python exits, so `cmd | tail` and CI hang on the
orphan. Here the project starts that binary itself: its lifetime is tied to the
parent's (`PR_SET_PDEATHSIG`, so even SIGKILL of the parent ends it), it does
not inherit the parent's output, and it is stopped on exit.
"""

import atexit
import ctypes
import os
import signal
import socket
import subprocess
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


class OwnedWorker:
  """A `worker_binary` process that lives no longer than this process.

  Start it from the main thread: the kernel's parent-death signal follows the
  thread that forked the child.
  """

  def __init__(
      self,
      port: Optional[int] = None,
      log_path: Optional[str] = None,
      max_concurrent_computation_calls: int = -1,
  ):
    self.port = port or _pick_free_port()
    self._log_path = log_path
    self._max_calls = max_concurrent_computation_calls
    self._process: Optional[subprocess.Popen] = None

  @property
  def address(self) -> str:
    return f'localhost:{self.port}'

  @property
  def pid(self) -> Optional[int]:
    return self._process.pid if self._process else None

  def start(self, timeout_s: float = 60.0) -> 'OwnedWorker':
    """Starts the process and waits until it serves gRPC."""
    if self._process is not None:
      return self
    args = [
        worker_binary_path(),
        f'--port={self.port}',
        f'--max_concurrent_computation_calls={self._max_calls}',
    ]
    log = (
        open(self._log_path, 'ab')
        if self._log_path
        else subprocess.DEVNULL
    )
    try:
      self._process = subprocess.Popen(
          args,
          stdin=subprocess.DEVNULL,
          stdout=log,
          stderr=subprocess.STDOUT,
          close_fds=True,
          preexec_fn=_tie_to_parent(os.getpid()),
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

  def stop(self) -> None:
    """Stops the process (SIGTERM, then SIGKILL) and reaps it."""
    process, self._process = self._process, None
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


def wait_until_ready(
    address: str,
    timeout_s: float,
    process: Optional[subprocess.Popen] = None,
) -> None:
  """Blocks until a TFF executor service answers at `address`."""
  channel = grpc.insecure_channel(address, GRPC_OPTIONS)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
  except grpc.FutureTimeoutError as e:
    died = process is not None and process.poll() is not None
    reason = 'exited' if died else f'did not answer within {timeout_s:.0f} s'
    raise WorkerError(f'TFF worker at {address} {reason}') from e
  finally:
    channel.close()


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
  """Whether a TFF executor service answers at `address` within the timeout."""
  try:
    wait_until_ready(address, timeout_s)
    return True
  except WorkerError:
    return False


def parse_addresses(spec: str) -> list[str]:
  """'host:port,host:port' -> a list, with a clear error when malformed."""
  addresses = [a.strip() for a in spec.split(',') if a.strip()]
  for address in addresses:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f'worker address {address!r} is not host:port')
  return addresses



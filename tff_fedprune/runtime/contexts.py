"""TFF execution contexts on owned or remote workers.

Execution goes through TFF's own `RemoteExecutor` in a `SyncExecutionContext`,
the same path that serves workers started on other machines (`host:port`
addresses); with several workers, TFF's mergeable-computation context splits
each round's clients across them. `disable_default_context` removes TFF's
default context, whose worker process would outlive Python; importing this
module does so.
"""

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Optional

import grpc
import tensorflow_federated as tff

from tff_fedprune.runtime import worker_process


def disable_default_context() -> None:
  """Replaces TFF's default context (which would start a leaky worker).

  Invoking a computation outside `local_runtime` (or another installed
  context) then raises a clear error instead of spawning an orphan process.
  """
  tff.test.set_no_default_context()


disable_default_context()


def _remote_executor_factory(
    address: str, default_num_clients: int, credentials
) -> tff.framework.ResourceManagingExecutorFactory:
  channel = worker_process.open_channel(address, credentials)
  stub = tff.framework.RemoteExecutorGrpcStub(channel)

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(
      executor_stack_fn=stack_fn
  )


def compile_for_worker(computation):
  """TFF's native compilation, secure sums first made plain sums.

  TFF's worker binary has no secure-sum intrinsic, so the simulation
  computes `tff.federated_secure_sum*` in the clear (`secure_sum`).
  """
  return tff.backends.native.desugar_and_transform_to_native(
      tff.backends.test.replace_secure_intrinsics_with_bodies(computation))


def _context_args(address: str, default_num_clients: int, credentials) -> dict:
  return dict(
      executor_fn=_remote_executor_factory(
          address, default_num_clients, credentials
      ),
      compiler_fn=compile_for_worker,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result,
  )


def create_remote_context(
    address: str,
    default_num_clients: int = 0,
    credentials: Optional[grpc.ChannelCredentials] = None,
) -> tff.framework.SyncExecutionContext:
  """A synchronous TFF context executing on the worker at `address`."""
  return tff.framework.SyncExecutionContext(
      **_context_args(address, default_num_clients, credentials)
  )


def create_distributed_context(
    addresses: Sequence[str],
    credentials: Optional[grpc.ChannelCredentials] = None,
) -> tff.framework.MergeableCompExecutionContext:
  """A context splitting each round's clients across the given workers.

  TFF's mergeable-computation runtime compiles a computation into per-worker
  parts whose partial aggregates the driver merges, one asynchronous remote
  context per `host:port` worker (mutual TLS with `credentials`).
  """
  return tff.backends.native.create_mergeable_comp_execution_context(
      [tff.framework.AsyncExecutionContext(**_context_args(a, 0, credentials))
       for a in addresses]
  )


def call_watched(
    fn,
    addresses: Sequence[str],
    poll_s: float = 1.0,
    credentials: Optional[grpc.ChannelCredentials] = None,
    probe_timeout_s: float = 10.0,
):
  """Calls `fn()` while checking that every worker in `addresses` answers.

  TFF's remote executor retries a worker that stopped answering forever, so a
  dead worker would hang the call. `fn` runs in a daemon thread; if a worker
  stops answering first, a `WorkerError` naming it is raised here and the
  abandoned call is left to die with the process. A worker is dead when it
  does not answer a probe within `probe_timeout_s`: a worker busy training
  on a loaded machine can take seconds to answer (1 s once failed a healthy
  run with two runs on two cores).
  """
  outcome = {}
  context_stack = tff.framework.get_context_stack()
  context = context_stack.current  # TFF's context stack is thread-local.

  def target():
    try:
      with context_stack.install(context):
        outcome['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome['error'] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  while True:
    thread.join(poll_s)
    if not thread.is_alive():
      break
    dead = [a for a in addresses
            if not worker_process.is_serving(a, probe_timeout_s, credentials)]
    if dead and thread.is_alive():
      raise worker_process.WorkerError(
          f'TFF worker at {", ".join(dead)} stopped answering'
      )
  if 'error' in outcome:
    raise outcome['error']
  return outcome['value']


@contextlib.contextmanager
def local_runtime(
    log_path: Optional[str] = None, default_num_clients: int = 0
) -> Iterator[worker_process.OwnedWorker]:
  """Starts an owned worker and installs it as TFF's default context.

  On exit the worker is stopped and no default context remains, so nothing
  can silently start TFF's leaky default one.
  """
  worker = worker_process.OwnedWorker(log_path=log_path).start()
  try:
    tff.framework.set_default_context(
        create_remote_context(worker.address, default_num_clients)
    )
    yield worker
  finally:
    disable_default_context()
    worker.stop()

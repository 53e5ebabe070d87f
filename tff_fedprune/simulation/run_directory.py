"""A run directory's integrity: one writer, atomic files, intact checkpoints.

`exclusive_writer` holds an advisory lock (`fcntl.flock` on `RUN_DIR/lock`,
released by the kernel when the process dies, SIGKILL included) for as long
as a run writes there, so a second run on the same directory stops with the
holder's pid instead of interleaving its rows. Files are written to a
temporary name in the same directory and renamed (`write_json`,
`save_keras_model`). Checkpoints are `tff.program.FileProgramStateManager`
versions: `load_latest_intact` falls back to the newest version that loads,
and `remove_stale_temporaries` deletes what a crash left half-written.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf


class RunDirectoryError(ValueError):
  """The run directory cannot be used (held by another run, unreadable)."""


@contextlib.contextmanager
def exclusive_writer(run_dir: str):
  """Holds `run_dir`'s lock; raises RunDirectoryError if another run has it."""
  fd = os.open(os.path.join(run_dir, 'lock'), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'
    os.close(fd)
    if e.errno not in (errno.EAGAIN, errno.EACCES):
      raise
    raise RunDirectoryError(
        f'{run_dir} is being written by another run (pid {holder}); wait for'
        ' it to finish or stop it'
    ) from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'not JSON serialisable: {type(value)}')


def write_json(path: str, value) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def save_keras_model(model: tf.keras.Model, path: str) -> None:
  """`model.save(path)` atomically (Keras needs the .keras suffix)."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f'.tmp{os.getpid()}-{name}')
  try:
    model.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_stale_temporaries(checkpoint_dir: str) -> None:
  """Deletes `program_state_N_temp*` directories a crash left behind."""
  if not os.path.isdir(checkpoint_dir):
    return
  for name in os.listdir(checkpoint_dir):
    if '_temp' in name:
      shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


async def load_latest_intact(state_manager, structure, checkpoint_dir: str):
  """`(state, version)` of the newest checkpoint that loads, or (None, 0).

  A version that fails to load is reported on stderr with its path and
  moved aside to `program_state_N_unreadable` (which is no version, so the
  rerun round can save there); if versions exist but none loads,
  RunDirectoryError.
  """
  versions = sorted(await state_manager.get_versions() or [], reverse=True)
  for version in versions:
    try:
      return await state_manager.load(version, structure), version
    except Exception as e:  # pylint: disable=broad-except
      path = os.path.join(checkpoint_dir, f'program_state_{version}')
      aside = f'{path}_unreadable'
      shutil.rmtree(aside, ignore_errors=True)
      os.replace(path, aside)
      print(f'warning: checkpoint {path} is unreadable'
            f' ({type(e).__name__}), moved to {aside}; trying an older one',
            file=sys.stderr, flush=True)
  if versions:
    raise RunDirectoryError(
        f'no checkpoint under {checkpoint_dir} can be read; move the'
        ' directory away to start over'
    )
  return None, 0

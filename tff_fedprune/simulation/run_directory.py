"""A run directory's integrity: one writer, atomic files, intact checkpoints.

`prepare` creates the root and run directory (0700) and refuses either if it
is another user's or writable by others, and a run directory that is a
symlink: resuming loads checkpoints, which run their graph when loaded.
`exclusive_writer` holds an advisory lock (`fcntl.flock` on `RUN_DIR/lock`,
opened without following links, released by the kernel when the process
dies, SIGKILL included) for as long as a run writes there, so a second run on
the same directory stops with the holder's pid instead of interleaving its
rows. Files are written to a temporary name in the same directory and renamed
(`write_json`, `save_keras_model`); `remove_stale_temporaries` deletes what a
killed writer left. Checkpoints are `tff.program.FileProgramStateManager`
versions, bound to the configuration that wrote them
(`checkpoints/config.json`): `check_resumable` refuses to resume a
directory that holds another configuration. `CheckpointManager.load_latest`
falls back to the newest version that loads.
"""

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import files
from tff_fedprune.simulation import config as config_lib

CHECKPOINTS = 'checkpoints'
BOUND_CONFIG = os.path.join(CHECKPOINTS, 'config.json')


class RunDirectoryError(ValueError):
  """The run directory cannot be used (held by another run, unreadable)."""


def prepare(root: str, run_dir: str) -> None:
  """Creates `root` and `run_dir` (0700); RunDirectoryError if unsafe.

  The root may be this user's own symlink; the run directory may not be one.
  """
  try:
    files.private_directory(root, allow_symlink=True)
    files.private_directory(run_dir)
  except files.UnsafePathError as e:
    raise RunDirectoryError(f'refusing the output directory: {e}') from None
  except OSError as e:
    raise RunDirectoryError(
        f'cannot create {e.filename or run_dir}: {e.strerror}') from None


@contextlib.contextmanager
def exclusive_writer(run_dir: str):
  """Holds `run_dir`'s lock; raises RunDirectoryError if another run has it."""
  try:
    fd = files.open_lock(os.path.join(run_dir, 'lock'))
  except files.UnsafePathError as e:
    raise RunDirectoryError(f'refusing the run directory: {e}') from None
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
  files.write_json(path, value, default=_json_default)


def save_keras_model(model: tf.keras.Model, path: str) -> None:
  """`model.save(path)` atomically (Keras needs the .keras suffix)."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f'.tmp{os.getpid()}-{name}')
  try:
    model.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


# What a writer of a run directory leaves while writing: its own temporaries
# (`files.temporary_name`, Keras' `.tmpPID-model.keras`), TFF's CSV release
# (`metrics.csv_tempNNNN`) and checkpoint saves (`program_state_N_temp*`).
_TEMPORARIES = ('*.tmp[0-9]*', 'model/*.tmp[0-9]*', 'model/.tmp[0-9]*',
                'metrics.csv_temp*', f'{CHECKPOINTS}/*_temp*')


def remove_stale_temporaries(run_dir: str) -> None:
  """Deletes the temporaries of earlier writers (call holding the lock)."""
  for pattern in _TEMPORARIES:
    for path in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)


def has_checkpoints(run_dir: str) -> bool:
  return bool(glob.glob(
      os.path.join(glob.escape(run_dir), CHECKPOINTS, 'program_state_*')))


class CheckpointManager(tff.program.FileProgramStateManager):
  """TFF's file state manager whose `load_latest` skips unreadable versions.

  A version that fails to load is reported on stderr with its path and
  moved aside to `program_state_N_unreadable` (which is no version, so the
  rerun round can save there); if versions exist but none loads,
  RunDirectoryError.
  """

  def __init__(self, checkpoint_dir: str, keep_total: int = 3):
    super().__init__(checkpoint_dir, keep_total=keep_total)
    self.checkpoint_dir = checkpoint_dir

  async def load_latest(self, structure):
    """`(state, version)` of the newest checkpoint that loads, or (None, 0)."""
    versions = sorted(await self.get_versions() or [], reverse=True)
    for version in versions:
      try:
        return await self.load(version, structure), version
      except Exception as e:  # pylint: disable=broad-except
        path = os.path.join(self.checkpoint_dir, f'program_state_{version}')
        aside = f'{path}_unreadable'
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        print(f'warning: checkpoint {path} is unreadable'
              f' ({type(e).__name__}), moved to {aside}; trying an older one',
              file=sys.stderr, flush=True)
    if versions:
      raise RunDirectoryError(
          f'no checkpoint under {self.checkpoint_dir} can be read; move the'
          ' directory away to start over'
      )
    return None, 0


def _stored_config(path: str) -> Optional[dict]:
  """The configuration stored at `path` (with defaults), or None if absent."""
  if not os.path.lexists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
        f'cannot read {path} ({type(e).__name__}: {e}); move the run'
        ' directory away or use another --experiment_name'
    ) from None
  if not isinstance(saved, dict):
    raise config_lib.ConfigError(f'{path} holds no configuration (a JSON object)')
  return config_lib.with_defaults(saved)


def check_resumable(config: config_lib.ExperimentConfig) -> None:
  """Refuses to resume a run directory that holds another configuration.

  Both the run's config.json and the configuration its checkpoints are bound
  to (`BOUND_CONFIG`) must match `config`; checkpoints with
  neither are refused, since nothing says what wrote them.
  """
  run_dir = config.run_dir
  stored = {
      path: _stored_config(path)
      for path in (os.path.join(run_dir, 'config.json'),
                   os.path.join(run_dir, BOUND_CONFIG))
  }
  if (all(s is None for s in stored.values())
      and has_checkpoints(run_dir)):
    raise config_lib.ConfigError(
        f'{run_dir} has checkpoints but no config.json: which configuration'
        ' they belong to is unknown; move the directory away or use another'
        ' --experiment_name'
    )
  current = dataclasses.asdict(config)
  for path, saved in stored.items():
    if saved is None:
      continue
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in config_lib.RESUMABLE_FIELDS and saved.get(k) != current.get(k)
    )
    if changed:
      raise config_lib.ConfigError(
          f'{run_dir} holds a run with different {", ".join(changed)}'
          f' ({os.path.relpath(path, run_dir)}); use another'
          ' --experiment_name or --root_output_dir'
      )

"""Safe file output: private directories, atomic writes, no symlinks followed.

What a run or an export writes goes through here (standard library only, so
the command-line programs can use it before TensorFlow loads):

* `private_directory` creates or accepts a directory only if it is this
  user's and no one else can write to it: resuming loads checkpoints, which
  are TensorFlow graphs that run when loaded, so a directory another local
  user could plant files in must not be used.
* `write_atomically` writes a temporary file next to the target (created
  exclusively, never through a symlink) and renames it over the target.
* `write_together` writes several files so that they all change or none
  does.
* Temporaries carry their writer's pid; `remove_dead_temporaries` deletes
  those whose writer is gone (a killed run or export).
"""

import contextlib
import errno
import json
import os
import re
import signal
import stat

_SIGNALS_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                     signal.SIGQUIT)


class UnsafePathError(ValueError):
  """A path may not be written: a symlink, another user's, or shared."""


def check_private(path: str, allow_symlink: bool = False) -> None:
  """Raises UnsafePathError unless `path` is this user's directory that only
  this user can write (a symlink only with `allow_symlink`, if it is this
  user's own link to such a directory)."""
  info = os.lstat(path)
  if stat.S_ISLNK(info.st_mode):
    if not allow_symlink:
      raise UnsafePathError(f'{path} is a symbolic link; give the directory'
                            ' it points to')
    if info.st_uid != os.geteuid():
      raise UnsafePathError(f'{path} is a symbolic link of another user'
                            f' (uid {info.st_uid})')
    info = os.stat(path)
  if not stat.S_ISDIR(info.st_mode):
    raise UnsafePathError(f'{path} exists and is not a directory')
  if info.st_uid != os.geteuid():
    raise UnsafePathError(
        f'{path} belongs to uid {info.st_uid}, not to this user (uid'
        f' {os.geteuid()}): another user may have planted files there'
    )
  if info.st_mode & 0o022:
    raise UnsafePathError(
        f'{path} is writable by other users (mode'
        f' {stat.S_IMODE(info.st_mode):o}): run chmod go-w {path}'
    )


def private_directory(path: str, allow_symlink: bool = False) -> None:
  """Creates `path` (mode 0700) if absent, then `check_private`s it."""
  try:
    os.makedirs(path, mode=0o700)
  except FileExistsError:
    pass
  check_private(path, allow_symlink)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def temporary_name(path: str) -> str:
  """This process's temporary file for `path`, in the same directory."""
  return f'{path}.tmp{os.getpid()}'


def remove_dead_temporaries(path: str) -> None:
  """Deletes `temporary_name(path)` files of processes no longer alive."""
  directory, name = os.path.split(os.path.abspath(path))
  pattern = re.compile(re.escape(name) + r'\.tmp(\d+)(\.old)?$')
  try:
    entries = os.listdir(directory)
  except OSError:
    return
  for entry in entries:
    match = pattern.match(entry)
    if match and not pid_alive(int(match.group(1))):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, entry))


def _write_new(path: str, content: bytes, mode: int = 0o644) -> None:
  """Writes `content` to a file that must not exist (nor be a link)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
               | os.O_CLOEXEC, mode)
  with os.fdopen(fd, 'wb') as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())


def write_atomically(path: str, content: bytes, mode: int = 0o644) -> None:
  """Replaces `path` with `content` at once: a reader sees old or new."""
  write_together([(path, content)], mode)


def write_json(path: str, value, default=None) -> None:
  """`value` as indented JSON, atomically."""
  write_atomically(
      path, json.dumps(value, indent=2, default=default).encode('utf-8'))


@contextlib.contextmanager
def _signals_deferred():
  """SIGINT, SIGTERM, SIGHUP and SIGQUIT wait until the block has run."""
  old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS_DEFERRED)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def check_distinct_files(paths) -> None:
  """Raises UnsafePathError if two paths name one file or one is a directory."""
  real = [os.path.realpath(p) for p in paths]
  if len(set(real)) < len(real):
    raise UnsafePathError(f'{" and ".join(paths)} name the same file')
  for path in paths:
    if os.path.isdir(path):
      raise UnsafePathError(f'{path} is a directory, not a file name')


def write_together(files, mode: int = 0o644) -> None:
  """Writes every (path, content) or none of them.

  Each content goes to a temporary file first; the renames then run with
  termination signals deferred, and if one fails the files already renamed
  get their previous contents back. Only SIGKILL or a crash of the machine
  between two renames (microseconds) can leave a mix.
  """
  paths = [p for p, _ in files]
  check_distinct_files(paths)
  temporaries, backups = [], {}
  try:
    for path, content in files:
      remove_dead_temporaries(path)
      temporaries.append(temporary_name(path))
      _write_new(temporaries[-1], content, mode)
    for path in paths:
      if os.path.lexists(path):
        backups[path] = f'{temporary_name(path)}.old'
        os.link(path, backups[path], follow_symlinks=False)
    with _signals_deferred():
      done = []
      try:
        for path, tmp in zip(paths, temporaries):
          os.replace(tmp, path)
          done.append(path)
      except OSError:
        for path in done:
          if path in backups:
            os.replace(backups.pop(path), path)
          else:
            os.remove(path)
        raise
  finally:
    for leftover in temporaries + list(backups.values()):
      with contextlib.suppress(FileNotFoundError):
        os.remove(leftover)


def open_lock(path: str) -> int:
  """A descriptor of the regular file `path` (created 0600), never a link."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafePathError(f'{path} is a symbolic link; remove it') from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise UnsafePathError(f'{path} is not a regular file; remove it')
  return fd

"""Tests of safe file output: private directories, atomic and paired writes."""

import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest

from tff_fedprune import files


def read(path):
  with open(path, 'rb') as f:
    return f.read()


class PrivateDirectoryTest(absltest.TestCase):

  def test_creates_0700(self):
    path = os.path.join(self.create_tempdir().full_path, 'a', 'root')
    files.private_directory(path)
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)

  def test_refuses_another_users_shared_or_linked_directory(self):
    base = self.create_tempdir().full_path
    theirs, shared, link = (os.path.join(base, n)
                            for n in ('theirs', 'shared', 'link'))
    os.mkdir(theirs)
    os.chown(theirs, 12345, 12345)
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    os.symlink(base, link)
    for path, message in ((theirs, 'belongs to uid 12345'),
                          (shared, 'writable by other users'),
                          (link, 'symbolic link')):
      with self.subTest(message), self.assertRaisesRegex(
          files.UnsafePathError, message):
        files.private_directory(path)
    files.private_directory(link, allow_symlink=True)  # My link to mine.

  def test_lock_is_never_a_link(self):
    base = self.create_tempdir().full_path
    victim = os.path.join(base, 'victim')
    with open(victim, 'w') as f:
      f.write('keep')
    os.symlink(victim, os.path.join(base, 'lock'))
    with self.assertRaisesRegex(files.UnsafePathError, 'symbolic link'):
      files.open_lock(os.path.join(base, 'lock'))
    self.assertEqual(read(victim), b'keep')


class WriteTogetherTest(absltest.TestCase):

  def test_writes_every_file(self):
    base = self.create_tempdir().full_path
    a, b = os.path.join(base, 'a'), os.path.join(base, 'b')
    files.write_together([(a, b'1'), (b, b'2')])
    self.assertEqual((read(a), read(b)), (b'1', b'2'))
    self.assertEqual(sorted(os.listdir(base)), ['a', 'b'])

  def failing_second_rename(self):
    replace, calls = os.replace, []

    def replace_or_fail(src, dst):
      calls.append(dst)
      if len(calls) == 2:
        raise OSError(28, 'No space left on device', dst)
      return replace(src, dst)

    return mock.patch.object(os, 'replace', replace_or_fail)

  def test_a_failed_second_rename_restores_the_first(self):
    base = self.create_tempdir().full_path
    a, b = os.path.join(base, 'a'), os.path.join(base, 'b')
    files.write_together([(a, b'old a'), (b, b'old b')])
    with self.failing_second_rename(), self.assertRaises(OSError):
      files.write_together([(a, b'new a'), (b, b'new b')])
    self.assertEqual((read(a), read(b)), (b'old a', b'old b'))
    self.assertEqual(sorted(os.listdir(base)), ['a', 'b'])

  def test_a_failed_second_rename_removes_a_new_first(self):
    base = self.create_tempdir().full_path
    a, b = os.path.join(base, 'a'), os.path.join(base, 'b')
    with self.failing_second_rename(), self.assertRaises(OSError):
      files.write_together([(a, b'new a'), (b, b'new b')])
    self.assertEqual(os.listdir(base), [])

  def test_refuses_one_file_twice_or_a_directory(self):
    base = self.create_tempdir().full_path
    a = os.path.join(base, 'a')
    with self.assertRaisesRegex(files.UnsafePathError, 'the same file'):
      files.write_together([(a, b'1'), (os.path.join(base, '.', 'a'), b'2')])
    with self.assertRaisesRegex(files.UnsafePathError, 'is a directory'):
      files.write_together([(a, b'1'), (base, b'2')])
    self.assertEqual(os.listdir(base), [])

  def test_a_planted_temporary_link_is_not_followed(self):
    base = self.create_tempdir().full_path
    victim = os.path.join(base, 'victim')
    with open(victim, 'w') as f:
      f.write('keep')
    target = os.path.join(base, 'out')
    os.symlink(victim, files.temporary_name(target))
    with self.assertRaises(FileExistsError):
      files.write_atomically(target, b'data')
    self.assertEqual(read(victim), b'keep')

  def test_dead_writers_temporaries_are_removed(self):
    base = self.create_tempdir().full_path
    target = os.path.join(base, 'out')
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True)
    stale = f'{target}.tmp{dead.stdout.strip()}'
    alive = f'{target}.tmp1'  # init: alive.
    for path in (stale, stale + '.old', alive):
      with open(path, 'w') as f:
        f.write('x')
    files.write_atomically(target, b'data')
    self.assertEqual(sorted(os.listdir(base)),
                     sorted(['out', os.path.basename(alive)]))


if __name__ == '__main__':
  absltest.main()

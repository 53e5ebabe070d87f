"""Tests of the dataset readers, on small files written in the real formats."""

import gzip
import io
import os
import pickle
import struct
import tarfile

from absl.testing import absltest
import numpy as np

from tff_fedprune.data import sources


def write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory, num_train=12, num_test=5, seed=0):
  rng = np.random.default_rng(seed)
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
              rng.integers(0, 256, (n, 28, 28)))
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'),
              rng.integers(0, 10, n))


def cifar_batches(name, per_batch=4, seed=0):
  """{file name: pickled bytes} of a tiny CIFAR python-version dataset."""
  rng = np.random.default_rng(seed)
  if name == 'cifar10':
    files, key, classes = [f'data_batch_{i}' for i in range(1, 6)] + [
        'test_batch'], b'labels', 10
  else:
    files, key, classes = ['train', 'test'], b'fine_labels', 100
  out = {}
  for f in files:
    batch = {
        b'data': rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        key: rng.integers(0, classes, per_batch).tolist(),
    }
    out[f] = pickle.dumps(batch)
  return out


def write_cifar_dir(directory, name, **kwargs):
  folder = {'cifar10': 'cifar-10-batches-py',
            'cifar100': 'cifar-100-python'}[name]
  path = os.path.join(directory, folder)
  os.makedirs(path)
  batches = cifar_batches(name, **kwargs)
  for f, blob in batches.items():
    with open(os.path.join(path, f), 'wb') as fh:
      fh.write(blob)
  return path, batches


def write_cifar_tar(path, name, **kwargs):
  folder = {'cifar10': 'cifar-10-batches-py',
            'cifar100': 'cifar-100-python'}[name]
  batches = cifar_batches(name, **kwargs)
  with tarfile.open(path, 'w:gz') as tar:
    for f, blob in batches.items():
      info = tarfile.TarInfo(f'{folder}/{f}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return batches


class DigitsTest(absltest.TestCase):

  def test_shapes_split_and_range(self):
    source = sources.load_digits()
    self.assertEqual(source.image_shape, (8, 8, 1))
    self.assertEqual(len(source.train) + len(source.test), 1797)
    self.assertAlmostEqual(len(source.test) / 1797, 0.2, delta=0.01)
    self.assertGreaterEqual(source.train.images.min(), 0.0)
    self.assertLessEqual(source.train.images.max(), 1.0)
    self.assertLen(np.unique(source.test.labels), 10)

  def test_deterministic(self):
    a, b = sources.load_digits(), sources.load_digits()
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


class FashionMnistTest(absltest.TestCase):

  def test_reads_idx_files(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d, num_train=12, num_test=5)
    source = sources.load_fashion_mnist(d)
    self.assertEqual(source.train.images.shape, (12, 28, 28, 1))
    self.assertEqual(source.test.images.shape, (5, 28, 28, 1))
    self.assertEqual(source.train.images.dtype, np.uint8)
    with gzip.open(os.path.join(d, 'train-labels-idx1-ubyte.gz')) as f:
      expected = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(source.train.labels, expected)

  @absltest.skipUnless(os.path.isdir(sources.FASHION_MNIST_DIR),
                       'Debian package dataset-fashion-mnist not installed')
  def test_reads_the_debian_package(self):
    source = sources.load_fashion_mnist()
    self.assertEqual(source.train.images.shape, (60000, 28, 28, 1))
    self.assertEqual(source.test.images.shape, (10000, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(source.test.labels),
                                  np.full(10, 1000))

  def test_missing_directory_names_path_and_package(self):
    with self.assertRaisesRegex(sources.DataSourceError,
                                'nowhere.*dataset-fashion-mnist'):
      sources.load_fashion_mnist('/nowhere')

  def test_missing_file(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    os.remove(os.path.join(d, 't10k-labels-idx1-ubyte.gz'))
    with self.assertRaisesRegex(sources.DataSourceError,
                                't10k-labels-idx1-ubyte.gz'):
      sources.load_fashion_mnist(d)

  def test_truncated_file(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    path = os.path.join(d, 'train-images-idx3-ubyte.gz')
    with gzip.open(path) as f:
      raw = f.read()
    with gzip.open(path, 'wb') as f:
      f.write(raw[:-100])
    with self.assertRaisesRegex(sources.DataSourceError, 'truncated'):
      sources.load_fashion_mnist(d)

  def test_not_gzip(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    with open(os.path.join(d, 'train-images-idx3-ubyte.gz'), 'wb') as f:
      f.write(b'this is not gzip')
    with self.assertRaisesRegex(sources.DataSourceError, 'cannot read'):
      sources.load_fashion_mnist(d)

  def test_mismatched_counts(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    write_idx(os.path.join(d, 'train-labels-idx1-ubyte.gz'), np.zeros(3))
    with self.assertRaisesRegex(sources.DataSourceError, 'do not match'):
      sources.load_fashion_mnist(d)


class CifarTest(absltest.TestCase):

  def assert_matches(self, source, batches, name):
    key = b'labels' if name == 'cifar10' else b'fine_labels'
    train_files = ([f'data_batch_{i}' for i in range(1, 6)]
                   if name == 'cifar10' else ['train'])
    first = pickle.loads(batches[train_files[0]])
    self.assertEqual(source.image_shape, (32, 32, 3))
    self.assertEqual(len(source.train), 4 * len(train_files))
    self.assertLen(source.test, 4)
    # Official layout: 1024 red, then green, then blue values, row-major.
    red = first[b'data'][0, :1024].reshape(32, 32)
    np.testing.assert_array_equal(source.train.images[0, :, :, 0], red)
    blue = first[b'data'][0, 2048:].reshape(32, 32)
    np.testing.assert_array_equal(source.train.images[0, :, :, 2], blue)
    self.assertEqual(list(source.train.labels[:4]), first[key])
    self.assertTrue(source.augment)

  def test_cifar10_directory(self):
    d = self.create_tempdir().full_path
    path, batches = write_cifar_dir(d, 'cifar10')
    self.assert_matches(sources.load_source('cifar10', d), batches, 'cifar10')
    self.assert_matches(sources.load_source('cifar10', path), batches,
                        'cifar10')

  def test_cifar100_archive(self):
    d = self.create_tempdir().full_path
    archive = os.path.join(d, 'cifar-100-python.tar.gz')
    batches = write_cifar_tar(archive, 'cifar100')
    source = sources.load_source('cifar100', archive)
    self.assertEqual(source.num_classes, 100)
    self.assert_matches(source, batches, 'cifar100')
    self.assert_matches(sources.load_source('cifar100', d), batches,
                        'cifar100')

  def test_needs_data_dir(self):
    with self.assertRaisesRegex(sources.DataSourceError,
                                'needs --data_dir.*cifar-10-python.tar.gz'):
      sources.load_source('cifar10', None)

  def test_missing_data(self):
    d = self.create_tempdir().full_path
    with self.assertRaisesRegex(sources.DataSourceError, f'no cifar10 data.*{d}'):
      sources.load_source('cifar10', d)

  def test_truncated_archive(self):
    d = self.create_tempdir().full_path
    archive = os.path.join(d, 'cifar-10-python.tar.gz')
    write_cifar_tar(archive, 'cifar10')
    with open(archive, 'rb') as f:
      blob = f.read()
    with open(archive, 'wb') as f:
      f.write(blob[: len(blob) // 2])
    with self.assertRaisesRegex(sources.DataSourceError,
                                'not a readable archive'):
      sources.load_source('cifar10', archive)

  def test_archive_missing_member(self):
    d = self.create_tempdir().full_path
    archive = os.path.join(d, 'cifar-10-python.tar.gz')
    with tarfile.open(archive, 'w:gz') as tar:
      blob = cifar_batches('cifar10')['test_batch']
      info = tarfile.TarInfo('cifar-10-batches-py/test_batch')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
    with self.assertRaisesRegex(sources.DataSourceError, 'lacks'):
      sources.load_source('cifar10', archive)

  def test_corrupt_batch(self):
    d = self.create_tempdir().full_path
    path, _ = write_cifar_dir(d, 'cifar10')
    with open(os.path.join(path, 'data_batch_3'), 'wb') as f:
      f.write(b'garbage')
    with self.assertRaisesRegex(sources.DataSourceError,
                                'data_batch_3 is not a CIFAR python batch'):
      sources.load_source('cifar10', d)


class _RunsCommand:
  """A pickled object that runs a shell command when unpickled."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class CifarHostileAndMalformedTest(absltest.TestCase):

  def test_a_pickle_that_runs_code_is_refused_before_running(self):
    d = self.create_tempdir().full_path
    path, _ = write_cifar_dir(d, 'cifar10')
    marker = os.path.join(d, 'ran')
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
      with open(os.path.join(path, 'data_batch_1'), 'wb') as f:
        f.write(pickle.dumps(
            {b'data': _RunsCommand(f'touch {marker}')}, protocol))
      with self.assertRaisesRegex(sources.DataSourceError,
                                  'data_batch_1 is not a CIFAR python batch'
                                  '.*posix.system'):
        sources.load_source('cifar10', d)
      self.assertFalse(os.path.exists(marker))

  def test_the_official_protocol_2_layout_loads(self):
    d = self.create_tempdir().full_path
    path, batches = write_cifar_dir(d, 'cifar10')
    rng = np.random.default_rng(3)
    for f in batches:
      official = {
          b'batch_label': b'training batch 1 of 5',
          b'labels': rng.integers(0, 10, 4).tolist(),
          b'data': rng.integers(0, 256, (4, 3072), dtype=np.uint8),
          b'filenames': [b'a.png', b'b.png', b'c.png', b'd.png'],
      }
      with open(os.path.join(path, f), 'wb') as fh:
        fh.write(pickle.dumps(official, protocol=2))
    source = sources.load_source('cifar10', d)
    self.assertEqual(source.train.images.shape, (20, 32, 32, 3))
    self.assertEqual(source.test.labels.dtype, np.int32)

  def write_batch(self, d, name, data, labels):
    path, _ = write_cifar_dir(d, 'cifar10')
    with open(os.path.join(path, name), 'wb') as f:
      f.write(pickle.dumps({b'data': data, b'labels': labels}, protocol=2))

  def test_labels_outside_the_classes(self):
    d = self.create_tempdir().full_path
    self.write_batch(d, 'data_batch_2', np.zeros((2, 3072), np.uint8), [0, 10])
    with self.assertRaisesRegex(sources.DataSourceError,
                                r'data_batch_2: labels span \[0, 10\]'):
      sources.load_source('cifar10', d)

  def test_float_pixels(self):
    d = self.create_tempdir().full_path
    data = np.full((2, 3072), np.nan, np.float32)
    self.write_batch(d, 'test_batch', data, [0, 1])
    with self.assertRaisesRegex(sources.DataSourceError,
                                'test_batch: pixel values are float32'):
      sources.load_source('cifar10', d)

  def test_empty_test_set(self):
    d = self.create_tempdir().full_path
    self.write_batch(d, 'test_batch', np.zeros((0, 3072), np.uint8), [])
    with self.assertRaisesRegex(sources.DataSourceError,
                                'test_batch holds no images'):
      sources.load_source('cifar10', d)


class FashionMnistMalformedTest(absltest.TestCase):

  def test_damaged_gzip_stream(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d, num_train=200)
    path = os.path.join(d, 'train-images-idx3-ubyte.gz')
    with open(path, 'rb') as f:
      blob = bytearray(f.read())
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    with open(path, 'wb') as f:
      f.write(bytes(blob))
    with self.assertRaisesRegex(sources.DataSourceError,
                                f'cannot read {path}'):
      sources.load_source('fashion_mnist', d)

  def test_labels_outside_the_classes(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    write_idx(os.path.join(d, 't10k-labels-idx1-ubyte.gz'),
              np.array([0, 1, 2, 3, 12]))
    with self.assertRaisesRegex(sources.DataSourceError,
                                't10k-labels-idx1-ubyte.gz: labels span'):
      sources.load_source('fashion_mnist', d)

  def test_test_images_of_another_shape(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d)
    write_idx(os.path.join(d, 't10k-images-idx3-ubyte.gz'),
              np.zeros((5, 14, 14)))
    with self.assertRaisesRegex(
        sources.DataSourceError,
        r't10k-images-idx3-ubyte.gz: test images of shape \(14, 14, 1\)'):
      sources.load_source('fashion_mnist', d)

  def test_empty_test_set(self):
    d = self.create_tempdir().full_path
    write_fashion_mnist(d, num_test=0)
    with self.assertRaisesRegex(sources.DataSourceError,
                                't10k-images-idx3-ubyte.gz holds no images'):
      sources.load_source('fashion_mnist', d)


class SyntheticAndDispatchTest(absltest.TestCase):

  def test_synthetic(self):
    source = sources.load_source('synthetic')
    self.assertEqual(source.image_shape, (8, 8, 1))
    self.assertGreater(len(source.train), 0)

  def test_unknown(self):
    with self.assertRaisesRegex(sources.DataSourceError, 'unknown dataset'):
      sources.load_source('imagenet')


if __name__ == '__main__':
  absltest.main()

"""Readers for the labelled image sets the experiments use.

Every source is real data read from local files (nothing is downloaded at run
time), except `synthetic`, which exists for tests. A missing or corrupt source
raises `DataSourceError` naming the path tried and how to obtain the data.
Images are returned as uint8 (or float32 for `digits`/`synthetic`) arrays of
shape (N, H, W, C); labels as int32 (N,).
"""

import dataclasses
import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from typing import Optional

import numpy as np

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

_FASHION_MNIST_HINT = (
    "install Debian's package 'dataset-fashion-mnist' "
    '(apt-get install dataset-fashion-mnist) or pass --data_dir with the '
    'four IDX .gz files'
)
_CIFAR_HINT = (
    'pass --data_dir pointing at the official python version of {name} '
    '(the {archive} archive from https://www.cs.toronto.edu/~kriz/cifar.html, '
    'or the {folder}/ directory it extracts to)'
)


class DataSourceError(ValueError):
  """A data source is missing, unreadable or malformed."""


@dataclasses.dataclass(frozen=True)
class LabelledImages:
  """A split of images (N, H, W, C) with integer labels (N,)."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or len(self.images) != len(self.labels):
      raise DataSourceError(
          f'images {self.images.shape} and labels {self.labels.shape} do not'
          ' form a labelled set'
      )

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """A labelled dataset with its official train/test split."""

  name: str
  train: LabelledImages
  test: LabelledImages
  num_classes: int
  augment: bool = False  # Random crop + flip during training (CIFAR).

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


def _checked_labels(labels: np.ndarray, num_classes: int, where: str):
  """`labels` as int32 if they are class ids in [0, num_classes)."""
  if labels.ndim != 1 or (
      labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise DataSourceError(
        f'{where}: labels are not integer class ids ({labels.dtype},'
        f' shape {labels.shape})'
    )
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    raise DataSourceError(
        f'{where}: labels span [{labels.min()}, {labels.max()}], outside the'
        f' {num_classes} classes [0, {num_classes - 1}]'
    )
  return labels.astype(np.int32)


def _check_splits(train: LabelledImages, test: LabelledImages,
                  train_where: str, test_where: str) -> None:
  """Both splits hold images, of one shape, with finite pixel values."""
  for split, where in ((train, train_where), (test, test_where)):
    if not len(split):
      raise DataSourceError(f'{where} holds no images')
    if (np.issubdtype(split.images.dtype, np.floating)
        and not np.all(np.isfinite(split.images))):
      raise DataSourceError(f'{where} holds non-finite pixel values')
  if train.images.shape[1:] != test.images.shape[1:]:
    raise DataSourceError(
        f'{test_where}: test images of shape {test.images.shape[1:]} differ'
        f' from the training images {train.images.shape[1:]}'
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageSource:
  """scikit-learn's 8x8 handwritten digits, split per class into train/test."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test_mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test_mask[idx[: int(round(test_fraction * len(idx)))]] = True
  return ImageSource(
      'digits',
      LabelledImages(images[~test_mask], labels[~test_mask]),
      LabelledImages(images[test_mask], labels[test_mask]),
      num_classes=10,
  )


def _read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST family's format)."""
  if not os.path.isfile(path):
    raise DataSourceError(f'missing {path}: {_FASHION_MNIST_HINT}')
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
      raise DataSourceError(f'{path} is not an unsigned-byte IDX file')
    shape = struct.unpack(f'>{ndim}I', data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
      raise DataSourceError(
          f'{path} is truncated: header says {shape}, found {payload.size}'
          ' bytes'
      )
    return payload.reshape(shape)
  except (OSError, EOFError, struct.error, zlib.error) as e:
    raise DataSourceError(
        f'cannot read {path} ({e}): {_FASHION_MNIST_HINT}'
    ) from None


def load_fashion_mnist(data_dir: Optional[str] = None) -> ImageSource:
  """Fashion-MNIST from its four IDX .gz files."""
  data_dir = data_dir or FASHION_MNIST_DIR
  if not os.path.isdir(data_dir):
    raise DataSourceError(
        f'Fashion-MNIST directory {data_dir} not found: {_FASHION_MNIST_HINT}'
    )

  def path(prefix, kind):
    return os.path.join(data_dir, f'{prefix}-{kind}-ubyte.gz')

  def split(prefix):
    images = _read_idx(path(prefix, 'images-idx3'))
    labels = _read_idx(path(prefix, 'labels-idx1'))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise DataSourceError(
          f'{data_dir}: {prefix} images {images.shape} do not match labels'
          f' {labels.shape}'
      )
    labels = _checked_labels(labels, 10, path(prefix, 'labels-idx1'))
    return LabelledImages(images[..., np.newaxis], labels)

  train, test = split('train'), split('t10k')
  _check_splits(train, test, path('train', 'images-idx3'),
                path('t10k', 'images-idx3'))
  return ImageSource('fashion_mnist', train, test, 10)


_CIFAR_LAYOUT = {
    'cifar10': dict(
        folder='cifar-10-batches-py',
        archive='cifar-10-python.tar.gz',
        train=[f'data_batch_{i}' for i in range(1, 6)],
        test=['test_batch'],
        label_key=b'labels',
        num_classes=10,
    ),
    'cifar100': dict(
        folder='cifar-100-python',
        archive='cifar-100-python.tar.gz',
        train=['train'],
        test=['test'],
        label_key=b'fine_labels',
        num_classes=100,
    ),
}


# What the official CIFAR python files need: dicts, bytes, lists and numpy
# arrays (protocol-2 files make bytes with `_codecs.encode` or `bytes()`).
_CIFAR_PICKLE_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('_codecs', 'encode'),
    ('__builtin__', 'bytes'),
    ('builtins', 'bytes'),
})


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles data only: any other global (code) is refused, not called."""

  def find_class(self, module, name):
    if (module, name) not in _CIFAR_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(f'{module}.{name} is not CIFAR data')
    return super().find_class(module, name)


def _decode_cifar_batch(blob: bytes, where: str, label_key: bytes,
                        num_classes: int):
  try:
    batch = _CifarUnpickler(io.BytesIO(blob), encoding='bytes').load()
    data = np.asarray(batch[b'data'])
    labels = np.asarray(batch[label_key])
  except Exception as e:  # pickle raises many types on corrupt input.
    raise DataSourceError(f'{where} is not a CIFAR python batch ({e!r})')
  if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
    raise DataSourceError(
        f'{where}: data {data.shape} and labels {labels.shape} are not a CIFAR'
        ' batch'
    )
  if data.dtype != np.uint8:
    raise DataSourceError(
        f'{where}: pixel values are {data.dtype}, not 8-bit integers'
    )
  labels = _checked_labels(labels, num_classes, where)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def load_cifar(name: str, data_dir: Optional[str]) -> ImageSource:
  """CIFAR-10/100 from the official python version (directory or .tar.gz).

  `data_dir` may be the extracted folder itself, a directory holding it or the
  archive, or the archive's path.
  """
  layout = _CIFAR_LAYOUT[name]
  hint = _CIFAR_HINT.format(
      name=name, archive=layout['archive'], folder=layout['folder']
  )
  if not data_dir:
    raise DataSourceError(f'{name} needs --data_dir: {hint}')
  candidates = [
      data_dir,
      os.path.join(data_dir, layout['folder']),
      os.path.join(data_dir, layout['archive']),
  ]
  files = layout['train'] + layout['test']

  def read_all(fetch):
    blobs = {f: fetch(f) for f in files}
    decoded = {
        f: _decode_cifar_batch(blob, where, layout['label_key'],
                               layout['num_classes'])
        for f, (blob, where) in blobs.items()
    }

    def split(names):
      return LabelledImages(
          np.concatenate([decoded[f][0] for f in names]),
          np.concatenate([decoded[f][1] for f in names]),
      )

    train, test = split(layout['train']), split(layout['test'])
    _check_splits(train, test, blobs[layout['train'][0]][1],
                  blobs[layout['test'][0]][1])
    return ImageSource(name, train, test, layout['num_classes'], augment=True)

  for path in candidates:
    if os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, f)) for f in files
    ):

      def fetch_file(f, path=path):
        where = os.path.join(path, f)
        with open(where, 'rb') as fh:
          return fh.read(), where

      return read_all(fetch_file)
    if os.path.isfile(path):
      try:
        with tarfile.open(path, 'r:*') as tar:
          members = {
              os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()
          }
          missing = [f for f in files if f not in members]
          if missing:
            raise DataSourceError(f'{path} lacks {missing}: {hint}')
          blobs = {
              f: (tar.extractfile(members[f]).read(), f'{path}:{f}')
              for f in files
          }
      except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataSourceError(
            f'{path} is not a readable archive ({e}): {hint}'
        ) from e
      return read_all(blobs.__getitem__)
  raise DataSourceError(f'no {name} data found at {data_dir}: {hint}')


def make_synthetic(
    num_train: int = 600,
    num_test: int = 200,
    image_shape: tuple[int, int, int] = (8, 8, 1),
    num_classes: int = 10,
    seed: int = 0,
) -> ImageSource:
  """Class-conditional Gaussian images, learnable; for tests only."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes,) + tuple(image_shape))

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.normal(scale=0.5, size=(n,) + tuple(image_shape))
    return LabelledImages((prototypes[labels] + noise).astype(np.float32), labels)

  return ImageSource('synthetic', split(num_train), split(num_test), num_classes)


SOURCES = ('digits', 'fashion_mnist', 'cifar10', 'cifar100', 'synthetic')


def load_source(name: str, data_dir: Optional[str] = None) -> ImageSource:
  """Loads the source `name` (one of `SOURCES`)."""
  if name == 'digits':
    return load_digits()
  if name == 'fashion_mnist':
    return load_fashion_mnist(data_dir)
  if name in _CIFAR_LAYOUT:
    return load_cifar(name, data_dir)
  if name == 'synthetic':
    return make_synthetic()
  raise DataSourceError(f'unknown dataset {name!r}; choose from {SOURCES}')

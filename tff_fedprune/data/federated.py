"""A source partitioned into clients, served as `tf.data` pipelines.

Client datasets yield `(images, labels)` batches, float32 images normalised per
channel with the training set's statistics. CIFAR-style sources are augmented
(random crop after 4-pixel padding, horizontal flip) with stateless random ops
seeded by (seed, round, client), so a round replays identically on resume.
"""

import dataclasses
import numpy as np
import tensorflow as tf

from tff_fedprune.data import partitions
from tff_fedprune.data import sources

_CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Per-client train and test index sets over one `ImageSource`."""

  source: sources.ImageSource
  client_train: list[np.ndarray]
  client_test: list[np.ndarray]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.client_train)

  @property
  def element_spec(self):
    h, w, c = self.source.image_shape
    return (
        tf.TensorSpec([None, h, w, c], tf.float32),
        tf.TensorSpec([None], tf.int32),
    )

  def _normalise(self, images):
    return (tf.cast(images, tf.float32) - self.mean) / self.std

  def client_train_dataset(
      self,
      client_id: int,
      batch_size: int,
      epochs: int = 1,
      seed: int = 0,
      round_num: int = 0,
  ) -> tf.data.Dataset:
    """Client `client_id`'s shuffled, augmented training batches."""
    split = self.source.train
    idx = self.client_train[client_id]
    ds = tf.data.Dataset.from_tensor_slices(
        (split.images[idx], split.labels[idx])
    )
    shuffle_seed = _mix(seed, round_num, client_id)
    ds = ds.shuffle(len(idx), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat(epochs)
    if self.source.augment:
      ds = ds.enumerate().map(
          lambda i, xy: self._augment(xy, i, shuffle_seed),
          num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True,
      )
    ds = ds.map(lambda x, y: (self._normalise(x), y))
    return ds.batch(batch_size)

  def _augment(self, xy, index, seed):
    image, label = xy
    h, w, _ = self.source.image_shape
    op_seed = tf.stack([tf.constant(seed, tf.int64), index])
    p = _CROP_PADDING
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
    image = tf.image.stateless_random_crop(
        padded, tf.shape(image), seed=op_seed
    )
    image = tf.image.stateless_random_flip_left_right(image, seed=op_seed + 1)
    return image, label

  def _eval_dataset(self, split, idx, batch_size):
    if idx is not None:
      split = sources.LabelledImages(split.images[idx], split.labels[idx])
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    return ds.batch(batch_size).map(lambda x, y: (self._normalise(x), y))

  def test_dataset(self, batch_size: int = 256) -> tf.data.Dataset:
    """The source's held-out test set, unaugmented."""
    return self._eval_dataset(self.source.test, None, batch_size)

  def train_eval_dataset(self, batch_size: int = 256) -> tf.data.Dataset:
    """Every client's training examples pooled, unaugmented, unshuffled."""
    idx = np.sort(np.concatenate(self.client_train))
    return self._eval_dataset(self.source.train, idx, batch_size)

  def calibration_images(self, count: int, seed: int) -> np.ndarray:
    """`count` pooled training images (seeded, preprocessed): static BN."""
    idx = np.concatenate(self.client_train)
    rng = np.random.default_rng([seed, 0xB2])
    chosen = np.sort(rng.choice(idx, min(count, len(idx)), replace=False))
    return self._normalise(self.source.train.images[chosen]).numpy()

  def client_test_dataset(
      self, client_id: int, batch_size: int = 256
  ) -> tf.data.Dataset:
    """Client `client_id`'s share of the test set (its own label mix)."""
    return self._eval_dataset(
        self.source.test, self.client_test[client_id], batch_size
    )

  def report(self) -> dict:
    """Client sizes and label histograms, for logs and `summary.json`."""
    hist = partitions.label_histogram(
        self.source.train.labels, self.client_train, self.source.num_classes
    )
    sizes = [len(p) for p in self.client_train]
    return {
        'dataset': self.source.name,
        'num_clients': self.num_clients,
        'train_examples': len(self.source.train),
        'test_examples': len(self.source.test),
        'client_train_sizes': sizes,
        'unassigned_train_examples': len(self.source.train) - sum(sizes),
        'client_test_sizes': [len(p) for p in self.client_test],
        'client_label_histograms': hist.tolist(),
        'client_size_min_mean_max': [
            int(min(sizes)),
            float(np.mean(sizes)),
            int(max(sizes)),
        ],
    }


def _mix(*values: int) -> int:
  """A deterministic 31-bit seed from integers."""
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


def federate(
    source: sources.ImageSource,
    num_clients: int,
    partition: str = 'iid',
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    classes_per_client: int = 2,
) -> FederatedData:
  """Partitions `source`'s training set into clients and its test set alike."""
  train_parts = partitions.partition(
      source.train.labels,
      num_clients,
      partition,
      seed,
      dirichlet_alpha=dirichlet_alpha,
      classes_per_client=classes_per_client,
  )
  test_parts = partitions.split_like(
      source.train.labels, train_parts, source.test.labels, seed
  )
  pixels = source.train.images.reshape(-1, source.image_shape[-1])
  mean = pixels.mean(axis=0, dtype=np.float64)
  std = np.maximum(pixels.std(axis=0, dtype=np.float64), 1e-6)
  return FederatedData(
      source,
      train_parts,
      test_parts,
      np.asarray(mean, np.float32),
      np.asarray(std, np.float32),
  )

"""Tests of the per-client tf.data pipelines."""

from absl.testing import absltest
import numpy as np

from tff_fedprune.data import federated
from tff_fedprune.data import sources


def cifar_like(n=40):
  rng = np.random.default_rng(0)
  split = lambda k: sources.LabelledImages(
      rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, k).astype(np.int32))
  return sources.ImageSource('cifar10', split(n), split(20), 10, augment=True)


def as_arrays(ds):
  xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
  return np.concatenate(xs), np.concatenate(ys)


class FederatedDataTest(absltest.TestCase):

  def test_client_dataset_covers_client_examples_per_epoch(self):
    fd = federated.federate(sources.make_synthetic(), 4, 'iid', seed=0)
    x, y = as_arrays(fd.client_train_dataset(1, batch_size=7, epochs=2))
    idx = fd.client_train[1]
    self.assertLen(y, 2 * len(idx))
    np.testing.assert_array_equal(
        np.sort(y), np.sort(np.tile(fd.source.train.labels[idx], 2)))
    self.assertEqual(x.dtype, np.float32)

  def test_train_evaluation_set_pools_every_client_once(self):
    fd = federated.federate(sources.make_synthetic(), 4, 'iid', seed=0)
    x, y = as_arrays(fd.train_eval_dataset(batch_size=50))
    idx = np.sort(np.concatenate(fd.client_train))
    np.testing.assert_array_equal(y, fd.source.train.labels[idx])
    np.testing.assert_allclose(
        x, (fd.source.train.images[idx] - fd.mean) / fd.std, rtol=1e-6)

  def test_normalised_with_training_statistics(self):
    fd = federated.federate(cifar_like(), 2, 'iid', seed=0)
    x, _ = as_arrays(fd.test_dataset())
    raw = fd.source.test.images.astype(np.float32)
    np.testing.assert_allclose(x, (raw - fd.mean) / fd.std, rtol=1e-5)
    train = fd.source.train.images.reshape(-1, 3)
    np.testing.assert_allclose(fd.mean, train.mean(0), rtol=1e-5)

  def test_replays_per_round_and_differs_across_rounds(self):
    fd = federated.federate(cifar_like(), 2, 'iid', seed=0)
    a = as_arrays(fd.client_train_dataset(0, 8, seed=1, round_num=5))
    b = as_arrays(fd.client_train_dataset(0, 8, seed=1, round_num=5))
    c = as_arrays(fd.client_train_dataset(0, 8, seed=1, round_num=6))
    np.testing.assert_array_equal(a[0], b[0])
    self.assertFalse(np.array_equal(a[0], c[0]))

  def test_augmentation_is_crop_and_flip_of_the_original(self):
    source = cifar_like(1)
    fd = federated.federate(source, 1, 'iid', seed=0)
    x, _ = as_arrays(fd.client_train_dataset(0, 1, epochs=8))
    original = (source.train.images[0].astype(np.float32) - fd.mean) / fd.std
    pad = np.pad(original, [(4, 4), (4, 4), (0, 0)],
                 constant_values=0)
    pad[:4] = pad[-4:] = pad[:, :4] = pad[:, -4:] = -fd.mean / fd.std

    def is_crop(img):
      for flip in (img, img[:, ::-1]):
        for i in range(9):
          for j in range(9):
            if np.allclose(pad[i:i + 32, j:j + 32], flip, atol=1e-5):
              return True
      return False

    self.assertTrue(all(is_crop(img) for img in x))
    self.assertFalse(all(np.allclose(img, original) for img in x))

  def test_report(self):
    fd = federated.federate(sources.make_synthetic(), 5, 'shards', seed=0,
                            classes_per_client=2)
    report = fd.report()
    held = set(np.flatnonzero(np.sum(report['client_label_histograms'], 0)))
    expected = np.isin(fd.source.train.labels, list(held)).sum()
    self.assertEqual(sum(report['client_train_sizes']), expected)
    self.assertEqual(report['unassigned_train_examples'],
                     len(fd.source.train) - expected)
    self.assertTrue(all((np.array(report['client_label_histograms']) > 0).sum(1)
                        == 2))


if __name__ == '__main__':
  absltest.main()

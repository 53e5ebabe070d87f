"""Tests of the client partitions."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from tff_fedprune.data import partitions

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, 10 balanced classes.


def max_class_share(parts, labels=LABELS):
  hist = partitions.label_histogram(labels, parts, 10)
  return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


class PartitionTest(parameterized.TestCase):

  @parameterized.parameters(
      ('iid', {}), ('dirichlet', {'dirichlet_alpha': 0.1}),
      ('shards', {'classes_per_client': 2}))
  def test_disjoint_nonempty_deterministic(self, method, kwargs):
    parts = partitions.partition(LABELS, 10, method, seed=3, **kwargs)
    self.assertLen(parts, 10)
    merged = np.concatenate(parts)
    self.assertLen(np.unique(merged), len(merged))
    self.assertTrue(all(len(p) > 0 for p in parts))
    again = partitions.partition(LABELS, 10, method, seed=3, **kwargs)
    for a, b in zip(parts, again):
      np.testing.assert_array_equal(a, b)
    other = partitions.partition(LABELS, 10, method, seed=4, **kwargs)
    self.assertFalse(all(np.array_equal(a, b) for a, b in zip(parts, other)))

  def test_iid_covers_everything_evenly(self):
    parts = partitions.iid(LABELS, 7, seed=0)
    self.assertEqual(sum(len(p) for p in parts), len(LABELS))
    self.assertLessEqual(max(map(len, parts)) - min(map(len, parts)), 1)
    self.assertLess(max_class_share(parts), 0.35)

  def test_dirichlet_small_alpha_is_skewed(self):
    skewed = partitions.dirichlet(LABELS, 10, alpha=0.1, seed=0)
    mild = partitions.dirichlet(LABELS, 10, alpha=100.0, seed=0)
    self.assertEqual(sum(len(p) for p in skewed), len(LABELS))
    self.assertGreater(max_class_share(skewed), 0.6)
    self.assertLess(max_class_share(mild), 0.3)
    self.assertGreaterEqual(min(map(len, skewed)), 10)

  def test_dirichlet_rejects_bad_alpha(self):
    with self.assertRaisesRegex(partitions.PartitionError, 'alpha must be > 0'):
      partitions.dirichlet(LABELS, 10, alpha=0.0, seed=0)

  def test_shards_give_exact_class_counts(self):
    parts = partitions.shards(LABELS, 10, classes_per_client=3, seed=0)
    hist = partitions.label_histogram(LABELS, parts, 10)
    self.assertTrue(np.all((hist > 0).sum(axis=1) == 3))
    self.assertEqual(sum(len(p) for p in parts), len(LABELS))

  def test_shards_rejects_too_many_classes(self):
    with self.assertRaisesRegex(partitions.PartitionError, r'\[1, 10\]'):
      partitions.shards(LABELS, 10, classes_per_client=11, seed=0)

  def test_too_many_clients(self):
    with self.assertRaisesRegex(partitions.PartitionError, 'cannot each get'):
      partitions.iid(LABELS[:5], 6, seed=0)

  def test_unknown_method(self):
    with self.assertRaisesRegex(partitions.PartitionError, 'unknown partition'):
      partitions.partition(LABELS, 10, 'pathological', seed=0)

  def test_split_like_follows_client_label_mix(self):
    train = partitions.shards(LABELS, 5, classes_per_client=2, seed=0)
    test_labels = np.repeat(np.arange(10), 20)
    test = partitions.split_like(LABELS, train, test_labels, seed=0)
    merged = np.concatenate(test)
    self.assertLen(np.unique(merged), len(merged))
    for tr, te in zip(train, test):
      self.assertGreater(len(te), 0)
      self.assertContainsSubset(set(test_labels[te]), set(LABELS[tr]))


if __name__ == '__main__':
  absltest.main()

"""Tests of the per-round row files (clients.csv, layers.csv)."""

import asyncio
import os

from absl.testing import absltest

from tff_fedprune.simulation import round_rows


def client(round_num, client_id, flops=1.0):
  return round_rows.ClientRow(round=round_num, client=client_id,
                              keep_ratio=0.5, train_flops=flops,
                              dense_train_flops=2.0, upload_bytes=10)


class RoundRowsCsvTest(absltest.TestCase):

  def test_release_appends_rounds_and_a_replayed_round_replaces_its_rows(self):
    path = os.path.join(self.create_tempdir().full_path, 'clients.csv')
    rows = round_rows.RoundRowsCsv(path, round_rows.ClientRow)
    asyncio.run(rows.release([client(1, 0), client(1, 3)], 1))
    asyncio.run(rows.release([client(2, 1)], 2))
    asyncio.run(rows.release([client(2, 2, flops=5.0)], 2))  # Replayed.
    read = rows.read()
    self.assertEqual([(r['round'], r['client']) for r in read],
                     [('1', '0'), ('1', '3'), ('2', '2')])
    self.assertEqual(read[-1]['train_flops'], '5.0')
    self.assertEqual(list(read[0]), round_rows.columns(round_rows.ClientRow))
    with open(path) as f:
      self.assertEqual(f.readline().strip(),
                       'round,client,keep_ratio,train_flops,'
                       'dense_train_flops,upload_bytes,download_bytes,tier,'
                       'simulated_seconds')

  def test_release_of_an_earlier_round_drops_the_later_ones(self):
    path = os.path.join(self.create_tempdir().full_path, 'layers.csv')
    rows = round_rows.RoundRowsCsv(path, round_rows.LayerRow)
    for r in (1, 2, 3):
      asyncio.run(rows.release(
          [round_rows.LayerRow(round=r, layer='block1', computed_share=0.5)],
          r))
    asyncio.run(rows.release([], 2))
    self.assertEqual([r['round'] for r in rows.read()], ['1'])


if __name__ == '__main__':
  absltest.main()

"""Eval readers skip unreadable images like training does: named once, replaced, counted."""
import logging

import numpy as np
import pytest

from rae_jax.eval import scoring


class Source:
  kind = "image"

  def __init__(self, n, bad):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def describe(self, i):
    return f"/data/img_{i}.JPEG"

  def __getitem__(self, i):
    if i in self.bad:
      raise OSError("image file is truncated (3 bytes not processed)")
    return np.full((4, 4, 3), i, np.uint8), 0


def test_source_reader_replaces_names_and_counts_bad_files(caplog):
  reader = scoring.source_reader(Source(10, {3, 4, 9}), num_threads=2)
  with caplog.at_level(logging.WARNING):
    got = reader(np.arange(10))
    got = reader(np.arange(10))  # met again: logged once, counted once
  assert [int(x[0, 0, 0]) for x in got] == [0, 1, 2, 5, 5, 5, 6, 7, 8, 0]
  assert reader.num_skipped == 3 and scoring.total_skipped(reader) == 3
  named = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(named) == 3 and any("/data/img_3.JPEG" in m and "truncated" in m for m in named)


def test_all_unreadable_fails_clearly():
  reader = scoring.SourceReader(Source(5, range(5)), 1)
  with pytest.raises(RuntimeError, match="5 consecutive unreadable examples from index 0"):
    reader([0])

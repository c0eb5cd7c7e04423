"""read_ahead.ReadAhead: a background producer a bounded number of items ahead, in order, errors re-raised."""

import time

import pytest

from noisy_student.read_ahead import ReadAhead


def test_read_ahead_runs_the_producer_ahead_and_keeps_order():
  """The producer runs before the consumer asks, stops `depth` items ahead, yields everything in order and
  re-raises its error in the consumer; close() stops a producer nobody reads."""
  produced = []

  def items(n, fail_at=None):
    for i in range(n):
      if i == fail_at:
        raise OSError(f"corrupt record {i}")
      produced.append(i)
      yield i

  with ReadAhead(items(100), depth=5) as ahead:
    deadline = time.monotonic() + 10
    while len(produced) < 6 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)
    # 5 queued and one more made, waiting for room: nothing was consumed yet.
    assert len(produced) == 6
    assert list(ahead) == list(range(100))
    assert list(ahead) == []
  produced.clear()
  ahead = ReadAhead(items(10, fail_at=7), depth=2)
  assert [next(ahead) for _ in range(7)] == list(range(7))
  with pytest.raises(OSError, match="corrupt record 7"):
    next(ahead)
  ahead.close()
  produced.clear()
  ahead = ReadAhead(items(10**6), depth=3)
  ahead.close()
  stopped_at = len(produced)
  time.sleep(0.2)
  assert stopped_at <= 3 + 2 and len(produced) == stopped_at  # it stopped near `depth` and stays stopped
  assert not ahead._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="depth must be >= 1"):
    ReadAhead([], depth=0)

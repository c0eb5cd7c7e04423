"""ReadAhead: iterate anything in a background thread, a bounded number of items ahead of the consumer.

Not tied to the input pipelines: the labeling job runs its eval batches (decoding, resizing, the copy to the
devices) ahead of the model with it, and any other producer / consumer pair may.
"""

import queue
import threading
from typing import Any, Iterable

from absl import logging


class ReadAhead:
  """Iterates `items` in a background thread, up to `depth` items ahead of the consumer.

  It starts at construction, so the producer's work (decoding, resizing, copying batches to the devices)
  overlaps what the consumer does before its first `next`, such as a labeling job loading its teacher and
  compiling its step. An error in the producer is raised by the consumer's `next`. Use as a context manager
  (or call `close`) so an abandoned producer thread stops. The producer must not run multi-process
  collectives: the consumer's thread may be running its own, and the two would interleave differently on
  different processes.
  """

  _END = object()

  def __init__(self, items: Iterable[Any], depth: int):
    if depth < 1:
      raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True, name="read_ahead")
    self._thread.start()

  def _produce(self, items):
    try:
      for item in items:
        if not self._put((item, None)):
          return
      self._put((self._END, None))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      self._put((self._END, e))

  def _put(self, entry) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(entry, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    item, error = self._queue.get()
    if item is self._END:
      self._finished = True
      if error is not None:
        raise error
      raise StopIteration
    return item

  def close(self) -> None:
    self._finished = True
    self._stop.set()
    self._drain()  # unblock a producer waiting on a full queue
    self._thread.join(timeout=10)
    self._drain()  # what it put before it saw the stop
    if self._thread.is_alive():
      logging.warning(
        "The read-ahead producer is still inside its iterator 10 s after close(); it stops at its next item."
      )

  def _drain(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

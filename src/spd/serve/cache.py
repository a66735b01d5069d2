"""The server's encoded-image cache: LRU by bytes, with expiry, safe across threads.

An entry is one image's `ImageFeatures` (the row table and everything decode reads: ~25 MB for v15
at 480x640 in fp32). The bound is on the bytes of the tensors the entry holds, counted once per
storage (the row table's views share it).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


def nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor / array reachable from `obj` (dataclasses, lists, tuples, dicts), each
    storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return base.nbytes if isinstance(base, np.ndarray) else obj.nbytes
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(nbytes(item, seen) for item in obj.values())
    return 0


@dataclass
class Entry:
    value: Any
    size: int
    expires: float


class FeatureCache:
    """image_id -> value, at most `max_bytes` in all (least recently used evicted first), each entry
    dropped `ttl_s` seconds after its last use. An entry larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = self.hits = self.misses = 0

    def put(self, value: Any) -> str | None:
        """Stores `value`; returns its new id, or None when it alone exceeds the bound."""
        size = nbytes(value)
        if size > self.max_bytes:
            return None
        image_id = uuid.uuid4().hex
        with self._lock:
            self._expire()
            while self._entries and self._bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.size
                self.evictions += 1
            self._entries[image_id] = Entry(value, size, self._clock() + self.ttl_s)
            self._bytes += size
        return image_id

    def get(self, image_id: str) -> Any | None:
        """The value, or None when unknown, evicted or expired; a hit renews the entry's expiry."""
        with self._lock:
            self._expire()
            entry = self._entries.get(image_id)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(image_id)
            entry.expires = self._clock() + self.ttl_s
            return entry.value

    def _expire(self) -> None:
        now = self._clock()
        for image_id in [i for i, e in self._entries.items() if e.expires <= now]:
            self._bytes -= self._entries.pop(image_id).size

    def stats(self) -> dict:
        with self._lock:
            self._expire()
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s, "evictions": self.evictions,
                    "hits": self.hits, "misses": self.misses}

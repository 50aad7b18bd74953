"""Least outstanding with random ties: endpoints bucketed by their count of requests in flight.

Envoy's least-request balancer and the inference gateway's picker choose at random among equals; ties to
the lowest id instead send every request that finds the pods idle to the first one (in the simulator, 8
pods: pod 0 took 5.7 times the mean load at 4 requests/s, 2.7 at 20/s; issue 14 §3). A random key drawn when an entry is pushed is not
enough either: the keys of the pods that lost a draw are biased high, so a pod that comes back with a
fresh key wins again. So the draw is made at pick time, uniform over the pods in the lowest bucket.

A bucket queue: ``count -> [ids]`` with each id's position, so moving an id and picking are O(1) (the
lowest count is found again by a scan over the few counts in use when its bucket empties). Pure: the
caller passes the uniform draw and says which ids are eligible.
"""

from __future__ import annotations

from collections.abc import Callable


class LeastBuckets:
    """Ids by count; ``pick`` takes a uniform id among the lowest count whose ids are eligible."""

    def __init__(self) -> None:
        self._buckets: dict[int, list[int]] = {}
        self._count: dict[int, int] = {}  # id -> the count it is filed under
        self._pos: dict[int, int] = {}  # id -> its index in that bucket
        self._low = 0  # the lowest count with a bucket (meaningless while empty)

    def __len__(self) -> int:
        return len(self._count)

    def count_of(self, key: int) -> int | None:
        """The count ``key`` is filed under, or None when it is not filed."""
        return self._count.get(key)

    def set(self, key: int, count: int) -> None:
        """File ``key`` under ``count`` (moving it if filed elsewhere). The router's hot path: inlined."""
        counts = self._count
        old = counts.get(key)
        if old == count:
            return
        buckets = self._buckets
        pos = self._pos
        emptied = False
        if old is not None:
            bucket = buckets[old]
            last = bucket.pop()
            if last != key:  # the last id takes the moved one's place
                i = pos[key]
                bucket[i] = last
                pos[last] = i
            if not bucket:
                del buckets[old]
                emptied = old == self._low
        into = buckets.get(count)
        if into is None:
            into = buckets[count] = []
        pos[key] = len(into)
        into.append(key)
        counts[key] = count
        if len(counts) == 1 or count < self._low:
            self._low = count
        elif emptied:
            self._low = min(buckets)

    def remove(self, key: int) -> None:
        """Unfile ``key`` (nothing when it is not filed)."""
        count = self._count.pop(key, None)
        if count is None:
            return
        bucket = self._buckets[count]
        i = self._pos.pop(key)
        last = bucket.pop()
        if last != key:  # the last id takes the removed one's place
            bucket[i] = last
            self._pos[last] = i
        if not bucket:
            del self._buckets[count]
            if count == self._low and self._buckets:
                self._low = min(self._buckets)

    def lowest(self) -> tuple[int, list[int]] | None:
        """The lowest count and its ids (the bucket itself: do not change it), or None when empty."""
        if not self._buckets:
            return None
        return self._low, self._buckets[self._low]

    def pick(self, draw: Callable[[], float], eligible: Callable[[int, int], bool]) -> int | None:
        """A uniform id among those filed under the lowest count, ``draw()`` in [0, 1) per try; an id for
        which ``eligible(id, count)`` is false is unfiled and the pick tried again. None when none is left."""
        while self._buckets:
            count = self._low
            bucket = self._buckets[count]
            key = bucket[min(int(draw() * len(bucket)), len(bucket) - 1)]
            if eligible(key, count):
                return key
            self.remove(key)
        return None

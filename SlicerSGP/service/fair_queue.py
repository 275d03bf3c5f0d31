"""The runs waiting for the engine, taken round robin between users (:class:`FairQueue`).

Each user has a queue of their own, in arrival order; the worker takes the first run of the
user whose turn it is, and that user goes to the back of the turn order. A user who queues one
run while another has many waits for at most one of the other's runs (besides the running
one), whatever the other queued before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class HasUser(Protocol):
    user: str


T = TypeVar("T", bound=HasUser)


class FairQueue(Generic[T]):
    """Per-user FIFO queues served round robin. Not thread-safe: the caller holds its lock."""

    def __init__(self) -> None:
        self._by_user: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()
        """Users with waiting items, whose turn comes first at the left."""

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_user.values())

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __iter__(self) -> Iterator[T]:
        """The waiting items in the order they will be taken (if nothing else arrives)."""
        queues = {u: list(self._by_user[u]) for u in self._turns}
        depth = max((len(q) for q in queues.values()), default=0)
        for i in range(depth):
            for user in self._turns:
                if i < len(queues[user]):
                    yield queues[user][i]

    def append(self, item: T) -> None:
        if item.user not in self._by_user:
            self._by_user[item.user] = deque()
            self._turns.append(item.user)
        self._by_user[item.user].append(item)

    def popleft(self) -> T:
        """The next item: the first of the user whose turn it is (IndexError when empty)."""
        user = self._turns.popleft()
        queue = self._by_user[user]
        item = queue.popleft()
        if queue:
            self._turns.append(user)
        else:
            del self._by_user[user]
        return item

    def remove(self, item: T) -> None:
        queue = self._by_user[item.user]
        queue.remove(item)
        if not queue:
            del self._by_user[item.user]
            self._turns.remove(item.user)

    def position(self, item: T) -> int | None:
        return next((i for i, x in enumerate(self) if x is item), None)

    def count(self, user: str) -> int:
        return len(self._by_user.get(user, ()))

    def users(self) -> int:
        return len(self._turns)

    def clear(self) -> None:
        self._by_user.clear()
        self._turns.clear()

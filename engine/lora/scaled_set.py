"""Which combinations of llama-server's --lora adapters at requests' own scales are kept served.

A request's `lora` scales (and POST /lora-adapters) name a combination of the --lora files, served
under `scaled_name(scales)` in an adapter slot of its own. This is the bookkeeping of those names
alone (no torch, no engine: `AsyncEngine` makes and withdraws the slots): which are pinned by a
request between its check and its add, which were asked for least recently, and which may go.
"""
from __future__ import annotations


class ScaledSet:
    KEPT = 4  # combinations kept ready beyond those in use and the server's own
    MOST = 16  # combinations served at once, at most (each holds the adapters' pairs)

    def __init__(self):
        self._pins: dict[str, int] = {}  # name -> requests between pinning it and being added
        self._served: dict[str, None] = {}  # the combinations served, least recently asked for first

    def __len__(self) -> int:
        return len(self._served)

    @property
    def full(self) -> bool:
        """No room for another combination (ask `idle` to free some first)."""
        return len(self._served) >= self.MOST

    def asked(self, name: str) -> None:
        """`name` is served and was just asked for: the last to go."""
        self._served.pop(name, None)
        self._served[name] = None

    def kept(self, name: str) -> None:
        """`name` is served (the server's scales before a change): kept where it stands in the order."""
        self._served.setdefault(name, None)

    def pin(self, name: str) -> None:
        """`name` is not to go until as many `unpin`s: a request is being added through it."""
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str | None) -> bool:
        """Undoes one `pin` -> whether `name` was pinned (then some may go: `idle`)."""
        if name not in self._pins:
            return False
        self._pins[name] -= 1
        if not self._pins[name]:
            del self._pins[name]
        return True

    def idle(self, in_use) -> list[str]:
        """The least recently asked-for combinations beyond KEPT that are neither pinned nor `in_use(name)`
        (held by a running or waiting sequence, or the server's own): dropped here, to be withdrawn."""
        idle = [name for name in self._served if name not in self._pins and not in_use(name)]
        gone = idle[:max(0, len(idle) - self.KEPT)]
        for name in gone:
            del self._served[name]
        return gone

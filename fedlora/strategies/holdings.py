"""What each client holds: one record of versions per part, keyed by partition id.

A method whose clients keep something between rounds (``kept_parts``: Fed-SB's B and A,
FedSVD's A, RoLoRA's A and B; ``additive_parts``: FedEx-LoRA's and FLoRA's ``base``, the sum
of the updates a client has merged into its base weights) must know which version of each
kept part every client holds, so that it sends only what is stale and can restore a client that
lost its state. ``HeldParts`` is that record, for every method (docs/design/node-bookkeeping.md):

    current[part] = version                        the global version of each kept part
    held[partition][part] = (version, rank)        what the client holds; absent = nothing
                                                   (a seeded part: version 0 at its rank)
    history[partition][part] = [(from, to), ...]   the moves of its version it accepted
    ranks[partition] = rank                        the rank the client trains at

* A **version** counts the changes of a part's global value (``advance``, called by the method
  when it changes one). Version 0 is the part's first value (the shared-seed init of a seeded
  part). A count, not a hash: an additive part's catch-up is the sum of the updates between
  two versions.
* **rank** is the rank at which the client holds a factor (clients of different ranks; HetLoRA's
  self-pruning changes it): a factor held at another rank than the client trains at is stale.
  An additive part has no rank (None).
* Keyed by **partition id**, the client's identity across node restarts and hosts: a node that
  comes back under a new id takes its partition's record as it is.

The protocol, per round: ``send`` notes what a messaged client will hold once it accepts
(every kept part at the current version and its rank: its message carries each stale one);
``accept`` commits that on a valid reply (a lost message is simply sent again); ``reject``, on
no valid reply, forgets an additive part the message moved (the client may or may not have
added it: the next message resends it from version 0 and the client starts its sum afresh).
Everything is plain integers: ``state_dict`` is JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Holding = tuple[int, "int | None"]  # (version, rank)


@dataclass
class HeldParts:
    kept: frozenset[str] = frozenset()  # parts clients keep: replaced by the value sent
    additive: frozenset[str] = frozenset()  # kept quantities clients sum (rank-free)
    seeded: frozenset[str] = frozenset()  # parts every client rebuilds at version 0
    current: dict[str, int] = field(default_factory=dict)
    held: dict[int, dict[str, Holding]] = field(default_factory=dict)
    history: dict[int, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)
    ranks: dict[int, int] = field(default_factory=dict)
    pending: dict[int, dict[str, Holding]] = field(default_factory=dict)  # this round's messages

    @property
    def parts(self) -> frozenset[str]:
        return self.kept | self.additive

    def version(self, part: str) -> int:
        """The current global version of ``part``."""
        return self.current.get(part, 0)

    def advance(self, part: str) -> None:
        """The global value of ``part`` changed: clients holding an older version are stale."""
        self.current[part] = self.version(part) + 1

    def _rank_of(self, part: str, rank: int) -> int | None:
        return None if part in self.additive else rank

    def holding(self, partition: int, part: str, rank: int) -> Holding | None:
        """What ``partition`` holds of ``part`` (None: nothing); a seeded part it never
        received is the seed's version 0 at its rank."""
        held = self.held.get(partition, {}).get(part)
        if held is None and part in self.seeded:
            return 0, self._rank_of(part, rank)
        return held

    def held_version(self, partition: int, part: str) -> int:
        """The version of ``part`` the partition holds (0: none, or the seed's)."""
        held = self.held.get(partition, {}).get(part)
        return 0 if held is None else held[0]

    def stale(self, partition: int, rank: int) -> list[str]:
        """The kept parts whose held (version, rank) is not (current, ``rank``), in name order:
        what the partition's next message must carry."""
        return [part for part in sorted(self.parts)
                if self.holding(partition, part, rank) != (self.version(part), self._rank_of(part, rank))]

    def send(self, partition: int, rank: int) -> None:
        """The partition is messaged this round at ``rank``: once it accepts, it holds every kept
        part at its current version."""
        self.pending[partition] = {part: (self.version(part), self._rank_of(part, rank))
                                   for part in self.parts}

    def accept(self, partition: int) -> None:
        """A valid reply: the partition holds what it was sent this round."""
        sent = self.pending.pop(partition, None)
        if sent is None:
            return
        held = self.held.setdefault(partition, {})
        for part, holding in sent.items():
            before = self.held_version(partition, part)
            if holding[0] != before:
                self.history.setdefault(partition, {}).setdefault(part, []).append((before, holding[0]))
            held[part] = holding

    def reject(self, partition: int) -> None:
        """No valid reply: a replaced part is as it was; an additive part the message moved may
        or may not have been added, so it is forgotten (resent from version 0)."""
        sent = self.pending.pop(partition, None) or {}
        for part in self.additive & set(sent):
            if sent[part][0] != self.held_version(partition, part):
                self.held.get(partition, {}).pop(part, None)

    def end_round(self) -> None:
        """Messages of the round that got no reply at all are rejected."""
        for partition in list(self.pending):
            self.reject(partition)

    def state_dict(self) -> dict:
        return {"current": dict(sorted(self.current.items())),
                "held": [[p, part, v, r] for p, parts in sorted(self.held.items())
                         for part, (v, r) in sorted(parts.items())],
                "history": [[p, part, [list(move) for move in moves]]
                            for p, parts in sorted(self.history.items())
                            for part, moves in sorted(parts.items())],
                "ranks": sorted(self.ranks.items())}

    def load_state_dict(self, state: dict) -> None:
        self.current = {part: int(v) for part, v in state["current"].items()}
        self.held, self.history, self.pending = {}, {}, {}
        for p, part, version, rank in state["held"]:
            self.held.setdefault(int(p), {})[part] = (int(version), None if rank is None else int(rank))
        for p, part, moves in state["history"]:
            self.history.setdefault(int(p), {})[part] = [(int(a), int(b)) for a, b in moves]
        self.ranks = {int(p): int(r) for p, r in state["ranks"]}

"""Exact incremental re-runs: the last run's per-slice results, reused where nothing changed.

A sweep (:mod:`~SlicerSGP.method.propagation`) is a chain. Slice ``p`` of it depends on the
sweep's start (a drawn slice and its mask, or the chosen seed), on the support memories top-K
picked for it, and on the 3D bank and object pointers, which only the sweep's earlier slices
made (the features, options and model being the same). So when a sweep starts where last
run's did, with the same options, its results are last run's for as long as every slice
visits the same slice index and picks the same support items (the same memory objects: a
redrawn slice is a new memory, an unchanged one is reused as it was); from the first slice
where anything differs on, everything is recomputed. A new drawn slice thus changes the two
intervals beside it and the slices whose top-K now picks it. The result is bit-identical to
a run without this cache (Testing/engine/test_rerun.py), and the counts say what was recomputed.

Kept per (volume features, structure), for its last successful run only: each sweep (slice,
what it depended on, its result: final probability in image space, PMG logits, scores and the
memory it added to the bank), the drawn slices' support memories and the seed choice. Bounded
by what the feature cache leaves of its byte budget (least recently used structure dropped
first, the newest kept) and by that cache: features that left it take their results along.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from SlicerSGP.data import preprocess
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.memory import bank_size
from SlicerSGP.method.support import Memory, SupportMemories
from SlicerSGP.types import SegmentOptions

Inputs = str | tuple[Memory, ...]
"""What one position of a sweep depended on: an anchor's token (mask hash, or seed), or the
support memories top-K picked for a predicted slice."""


@dataclass
class SliceResult:
    """One sweep's result at one slice: all that fusion, the stop rule and the bank need."""

    memory: Memory | None
    predicted_iou: float
    object_score: float
    prob: np.ndarray
    """(H, W) float32 final probability in image space."""
    pseudo_low: torch.Tensor
    """(1, 1, S/4, S/4) PMG logits (the pseudo-mask is re-derived from them when kept)."""
    pseudo_final_dice: float
    quality: float
    pseudo_prob: np.ndarray | None = None
    """The pseudo-mask in image space while the run that made it uses it; not cached."""

    def nbytes(self) -> int:
        tensors = [self.pseudo_low]
        if self.memory is not None:
            tensors += [self.memory.features, self.memory.obj_ptr]
        return int(self.prob.nbytes) + sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class SweepRecord:
    """One sweep of a run: per position, the slice, its inputs and its result (None at
    anchors)."""

    slices: list[int] = field(default_factory=list)
    inputs: list[Inputs] = field(default_factory=list)
    results: list[SliceResult | None] = field(default_factory=list)


def same_inputs(a: Inputs, b: Inputs) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class SweepReplay:
    """Walks a sweep beside last run's record of it: hands back its results while every input
    matches, and records this run's sweep for the next."""

    def __init__(self, previous: SweepRecord | None, tokens: dict[int, str]):
        self.previous = previous
        self.tokens = tokens
        self.record = SweepRecord()
        self.matching = previous is not None
        self.predicted = 0
        self.reused = 0

    def _step(self, j: int, inputs: Inputs) -> SliceResult | None:
        pos = len(self.record.slices)
        prev = self.previous
        hit = None
        if self.matching and prev is not None and pos < len(prev.slices) \
                and prev.slices[pos] == j and same_inputs(prev.inputs[pos], inputs):
            hit = prev.results[pos]
        else:
            self.matching = False
        self.record.slices.append(j)
        self.record.inputs.append(inputs)
        self.record.results.append(hit)
        return hit

    def anchor(self, j: int) -> None:
        """Position ``j`` is the sweep's drawn slice or seed (or, in one-direction mode, a
        drawn slice it passes)."""
        self._step(j, self.tokens.get(j, f"slice:{j}"))

    def visit(self, j: int, support: list[Memory]) -> SliceResult | None:
        """Last run's result at ``j`` if everything it depended on is unchanged, else None
        (the caller predicts it and calls :meth:`complete`)."""
        hit = self._step(j, tuple(support))
        if hit is None:
            self.matching = False
            self.predicted += 1
        else:
            self.reused += 1
        return hit

    def complete(self, result: SliceResult) -> None:
        self.record.results[-1] = replace(result, pseudo_prob=None)


@dataclass
class SeedChoice:
    """The seed of a run with only external support, and what it was chosen from."""

    pool: tuple[Memory, ...]
    limits: tuple[int, int]
    slice: int
    result: SliceResult
    token: str


class StructureRun:
    """One structure's sweeps in this run, beside last run's (when there was one)."""

    def __init__(self, previous: StructureRun | None, tokens: dict[int, str]):
        self.previous_sweeps = previous.sweeps if previous is not None else {}
        self.previous_seed = previous.seed if previous is not None else None
        self.previous_memories = previous.memories if previous is not None else {}
        self.tokens = dict(tokens)
        self.sweeps: dict[tuple[int, bool], SweepRecord] = {}
        self.replays: list[SweepReplay] = []
        self.memories: dict[tuple[int, str], Memory] = {}
        self.seed: SeedChoice | None = None

    def drawn_memory(self, k: int, make: Callable[[], Memory]) -> Memory:
        """Drawn slice ``k``'s support memory: last run's object if its mask is unchanged."""
        key = (k, self.tokens[k])
        memory = self.previous_memories.get(key) or make()
        self.memories[key] = memory
        return memory

    def cached_seed(self, pool: list[Memory], limits: tuple[int, int]) -> SeedChoice | None:
        s = self.previous_seed
        if s is not None and s.limits == limits and same_inputs(s.pool, tuple(pool)):
            return self._use_seed(s)
        return None

    def new_seed(self, pool: list[Memory], limits: tuple[int, int], j: int,
                 result: SliceResult) -> SeedChoice:
        serial = (int(self.previous_seed.token.rpartition("#")[2]) + 1) if self.previous_seed \
            else 0
        return self._use_seed(SeedChoice(tuple(pool), limits, j, result, f"seed:{j}#{serial}"))

    def _use_seed(self, seed: SeedChoice) -> SeedChoice:
        self.seed = seed
        self.tokens[seed.slice] = seed.token
        return seed

    def replay(self, start: int, reverse: bool) -> SweepReplay:
        replay = SweepReplay(self.previous_sweeps.get((start, reverse)), self.tokens)
        self.sweeps[(start, reverse)] = replay.record
        self.replays.append(replay)
        return replay

    @property
    def predicted(self) -> int:
        return sum(r.predicted for r in self.replays)

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.replays)

    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for record in self.sweeps.values():
            for r in record.results:
                if r is not None:
                    seen[id(r)] = r.nbytes()
        if self.seed is not None:
            seen[id(self.seed.result)] = self.seed.result.nbytes()
        mems = sum(m.features.numel() * m.features.element_size() for m in self.memories.values())
        return sum(seen.values()) + mems


def drawn_memories(support: SupportMemories, feats: EncodedSlices,
                   transform: preprocess.LetterboxTransform, masks: dict[int, np.ndarray],
                   run: StructureRun | None, exclude_of: Any = None) -> list[Memory]:
    """Support memories of the drawn slices, in slice order; with ``run``, an unchanged drawn
    slice keeps last run's memory object (what support choices are compared by).
    ``exclude_of``: slice -> "not here" model pixels (then there is no ``run``)."""
    if run is None:
        return support.from_slices(feats, transform, masks, exclude_of)

    def make(k: int) -> Memory:
        return support.from_slices(feats, transform, {k: masks[k]})[0]

    return [run.drawn_memory(k, lambda _k=k: make(_k)) for k in sorted(masks)]


def mask_token(mask: np.ndarray) -> str:
    """A drawn slice's identity for re-runs: a hash of its mask (shape included)."""
    mask = np.asarray(mask, bool)
    h = hashlib.sha1(f"{mask.shape}|".encode())
    h.update(np.packbits(mask).tobytes())
    return "mask:" + h.hexdigest()


def options_key(opts: SegmentOptions) -> tuple[Any, ...]:
    """The options a slice's prediction depends on (the rest act at fusion or in planning,
    which runs afresh every time)."""
    return (opts.top_k, bank_size(opts), opts.memory_policy, opts.use_pmg, opts.use_pma,
            opts.use_3d_memory, float(opts.threshold), opts.reverse_quality,
            opts.interpolation_prior in ("prompt", "both"))


@dataclass
class _Entry:
    features: weakref.ReferenceType
    options: tuple[Any, ...]
    run: StructureRun
    nbytes: int


class RerunCache:
    """Last successful run per (volume features, structure), within ``budget`` bytes (a number,
    or a function giving what the feature cache leaves of the shared budget)."""

    def __init__(self, budget: int | Callable[[], int]):
        self.budget = budget
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()

    def start(self, feats: Any, value: int, opts: SegmentOptions,
              tokens: dict[int, str]) -> StructureRun:
        """This run of structure ``value`` on ``feats``, beside the last one if it applies."""
        self._prune()
        entry = self._entries.get((id(feats), value))
        usable = entry is not None and entry.features() is feats \
            and entry.options == options_key(opts)
        return StructureRun(entry.run if usable else None, tokens)

    def commit(self, feats: Any, value: int, opts: SegmentOptions,
               run: StructureRun | None) -> None:
        """Keep ``run`` (it completed) as the structure's last run on these features."""
        if run is None:
            return
        key = (id(feats), value)
        self._entries.pop(key, None)
        run.previous_sweeps, run.previous_seed, run.previous_memories = {}, None, {}
        run.replays = []
        self._entries[key] = _Entry(weakref.ref(feats), options_key(opts), run, run.nbytes())
        self._prune()

    def _prune(self) -> None:
        for key in [k for k, e in self._entries.items() if e.features() is None]:
            del self._entries[key]  # those features left the encoder's cache
        budget = self.budget() if callable(self.budget) else self.budget
        while len(self._entries) > 1 and self.nbytes() > budget:
            self._entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

"""Class-aware samplers (class-balanced, square-root, progressive) that are correct under DDP.

Target distribution over classes for a dataset with class counts ``n_c``:

- ``instance``:       ``q_c = n_c / sum(n)`` (what plain shuffling gives);
- ``class_balanced``: ``q_c = 1 / C'`` over the ``C'`` classes with ``n_c > 0``;
- ``sqrt``:           ``q_c = sqrt(n_c) / sum(sqrt(n))`` (square-root sampling, Mahajan et al.);
- ``progressive``:    ``q_c(t) = (1 - t / T) * q_c^instance + (t / T) * q_c^class_balanced`` with
  ``t`` the epoch and ``T = total_epochs`` (Kang et al. 2020, "Decoupling"), ``t / T`` clipped
  to [0, 1].

One epoch = one GLOBAL order of ``num_samples`` indices, a pure function of ``(seed, epoch)``:

1. class quotas: systematic sampling of the cumulative ``q`` with one random offset
   ``u ~ U[0, 1)``: ``k_c = floor(N * Q_c + u) - floor(N * Q_{c-1} + u)`` (``Q`` the cumulative
   sum), so each class gets ``floor`` or ``ceil`` of ``N * q_c`` and exactly ``N * q_c`` in
   expectation;
2. within class ``c``, its ``k_c`` slots take the class's images in successive fresh random
   permutations (every image of a tail class is drawn once before any repeats);
3. the ``N`` slots are shuffled.

Sharding, like ``torch.utils.data.DistributedSampler``: the order is padded by wrapping to a
multiple of ``num_replicas`` (or truncated with ``drop_last``) and rank ``r`` takes positions
``r, r + R, r + 2R, ...``, so ranks read disjoint positions of the same order and all have the same
length. ``num_replicas``/``rank`` default to ``torch.distributed`` when it is initialised.

With ``accelerate`` (and therefore ``transformers.Trainer``) pass ``num_replicas=1, rank=0``: the
prepared DataLoader already splits the batches of the sampler's order across processes
(``BatchSamplerShard``), and because the order depends only on ``(seed, epoch)`` every process
builds the same one, so each rank again gets a disjoint share of one global order. accelerate calls
``set_epoch`` on the sampler each epoch.

All randomness is NumPy ``Generator(PCG64(SeedSequence([seed, epoch])))`` with ``random()``
draws only (keys + argsort for permutations), identical across machines.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from hf_longtail.class_counts import ClassCounts

__all__ = [
    "SAMPLING_MODES",
    "BatchSeededSampler",
    "ClassAwareSampler",
    "SeededIndex",
    "batch_seed",
    "build_class_aware_sampler",
    "create_sampler",
    "sampling_distribution",
    "seed_host_rngs",
]

SAMPLING_MODES = ("instance", "class_balanced", "sqrt", "progressive")


def sampling_distribution(
    class_counts: Sequence[int] | np.ndarray | ClassCounts,
    mode: str = "class_balanced",
    epoch: float = 0,
    total_epochs: float | None = None,
) -> np.ndarray:
    """Per-class sampling probabilities ``q`` (float64, sums to 1) for ``mode`` (module docstring).
    Classes with ``n_c = 0`` get ``q_c = 0``.

    Raises:
        ValueError: counts that break the package's one count rule
            (:class:`~hf_longtail.class_counts.ClassCounts`: ``K >= 2`` non-negative integers,
            one positive), unknown mode, ``progressive`` without a positive ``total_epochs``.
    """
    n = np.asarray(ClassCounts.coerce(class_counts).counts, dtype=np.float64)
    present = (n > 0).astype(np.float64)
    instance = n / n.sum()
    balanced = present / present.sum()
    if mode == "instance":
        return instance
    if mode == "class_balanced":
        return balanced
    if mode == "sqrt":
        root = np.sqrt(n)
        return root / root.sum()
    if mode == "progressive":
        if total_epochs is None or total_epochs <= 0:
            raise ValueError("mode='progressive' needs total_epochs > 0 (T of q(t) = (1-t/T) ...)")
        w = min(max(float(epoch) / float(total_epochs), 0.0), 1.0)
        return (1.0 - w) * instance + w * balanced
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}")


def _labels_of(labels: object, label_column: str | None) -> np.ndarray:
    # A datasets.Dataset can only exist if datasets was imported: no import cost otherwise.
    datasets_module = sys.modules.get("datasets")
    if datasets_module is not None and isinstance(labels, datasets_module.Dataset):
        from hf_longtail.data.columns import detect_label_column, label_array

        column = detect_label_column(labels.features, label_column)
        values = label_array(labels, column)
        if values.dtype == object:
            raise ValueError(
                f"label column {column!r} holds strings; encode it with ensure_class_label first"
            )
        return values.astype(np.int64)
    values = np.asarray(labels)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError("labels must be a 1-D sequence of integer class ids or a datasets.Dataset")
    if values.size and values.min() < 0:
        row = int(np.flatnonzero(values < 0)[0])
        raise ValueError(f"negative label {int(values[row])} at index {row}")
    return values.astype(np.int64)


def _counts_of_sorted(
    sorted_labels: np.ndarray, class_counts: Sequence[int] | ClassCounts | None
) -> np.ndarray:
    """Images per class of the rows whose labels, sorted, are ``sorted_labels``: ``class_counts``
    when given (validated by :class:`ClassCounts` and checked against the rows), else counted
    here, once. The class boundaries of sorted labels give both in ``O(K log N)``."""
    top = int(sorted_labels[-1]) + 1
    given = None if class_counts is None else ClassCounts.coerce(class_counts)
    # Counted here: one class per label up to the largest (at least 2, the rule's K).
    k = max(top, 2) if given is None else len(given)
    counts = np.diff(np.searchsorted(sorted_labels, np.arange(k + 1)))
    if given is not None and (top > k or not np.array_equal(counts, given.counts)):
        raise ValueError(
            f"class_counts {given.to_list()} do not match the labels of the dataset (label "
            f"{top - 1} is the largest; counted {np.bincount(sorted_labels).tolist()}): pass the "
            "counts of this training set, or leave class_counts unset to count them here."
        )
    return counts


class ClassAwareSampler(Sampler[int]):
    """Distributed class-aware sampler; see the module docstring for the exact scheme.

    Args:
        labels: class id per dataset row (sequence / array), or a ``datasets.Dataset`` (its label
            column is read from Arrow, nothing decoded).
        mode: ``"class_balanced"`` (default), ``"sqrt"``, ``"instance"`` or ``"progressive"``.
        num_samples: length of the global order per epoch (default: ``len(labels)``).
        num_replicas, rank: default to ``torch.distributed`` world size / rank when initialised,
            else 1 / 0. Use ``num_replicas=1`` when accelerate shards the DataLoader.
        seed: base seed; the epoch order is seeded by ``(seed, epoch)``.
        total_epochs: ``T`` for ``progressive``.
        drop_last: truncate the global order to a multiple of ``num_replicas`` instead of
            padding it by wrapping.
        label_column: label column when ``labels`` is a Dataset (default: detected).
        class_counts: the images per class of ``labels`` when the caller already has them (a
            list or :class:`~hf_longtail.class_counts.ClassCounts`, e.g. the trainer's); they are
            checked against the rows (a by-product of grouping them by class), not counted
            again. Default: counted from ``labels`` once.

    ``len(sampler)`` is the number of indices this rank yields per epoch. Call ``set_epoch``
    before each epoch (accelerate and the Trainer do), as with ``DistributedSampler``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | object,
        mode: str = "class_balanced",
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        total_epochs: float | None = None,
        drop_last: bool = False,
        label_column: str | None = None,
        class_counts: Sequence[int] | ClassCounts | None = None,
    ):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}")
        self.labels = _labels_of(labels, label_column)
        if self.labels.size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.mode = mode
        self.total_epochs = total_epochs
        # Row indices grouped by class (stable, so the grouping itself is deterministic).
        self._by_class = np.argsort(self.labels, kind="stable")
        self.class_counts = _counts_of_sorted(self.labels[self._by_class], class_counts)
        # Validate the configuration now (e.g. progressive without total_epochs).
        sampling_distribution(self.class_counts, mode, 0, total_epochs)
        n = len(self.labels) if num_samples is None else num_samples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
        self.num_samples_global = int(n)
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if num_replicas < 1 or not (0 <= rank < num_replicas):
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas; got "
                f"num_replicas={num_replicas}, rank={rank}"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.drop_last = bool(drop_last)
        if self.drop_last:
            self.num_samples = self.num_samples_global // self.num_replicas
            if self.num_samples == 0:
                raise ValueError(
                    f"drop_last with num_samples={self.num_samples_global} < num_replicas="
                    f"{self.num_replicas} leaves no sample per rank"
                )
        else:
            self.num_samples = math.ceil(self.num_samples_global / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._starts = np.concatenate(([0], np.cumsum(self.class_counts)[:-1]))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose global order ``__iter__`` yields (and ``q(t)`` if progressive)."""
        self.epoch = int(epoch)

    def probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Class sampling distribution ``q`` used at ``epoch`` (default: the current epoch)."""
        e = self.epoch if epoch is None else epoch
        return sampling_distribution(self.class_counts, self.mode, e, self.total_epochs)

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The full order of ``num_samples`` dataset indices for ``epoch`` (before padding or
        sharding); identical on every rank and machine for the same ``(seed, epoch)``."""
        e = self.epoch if epoch is None else int(epoch)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, e])))
        q = self.probabilities(e)
        total = self.num_samples_global
        cum = np.floor(np.cumsum(q) * total + rng.random())
        cum[-1] = total  # Q_C = 1 exactly; float rounding of cumsum must not lose a slot
        quotas = np.diff(np.concatenate(([0.0], cum))).astype(np.int64)
        slots = np.empty(total, dtype=np.int64)
        pos = 0
        for c in np.flatnonzero(quotas):
            k = int(quotas[c])
            n_c = int(self.class_counts[c])
            members = self._by_class[self._starts[c] : self._starts[c] + n_c]
            rounds = -(-k // n_c)
            picks = np.concatenate(
                [members[np.argsort(rng.random(n_c), kind="stable")] for _ in range(rounds)]
            )
            slots[pos : pos + k] = picks[:k]
            pos += k
        return slots[np.argsort(rng.random(total), kind="stable")]

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """The indices this rank yields for ``epoch``: positions ``rank::num_replicas`` of the
        global order padded by wrapping (or truncated with ``drop_last``) to ``total_size``."""
        order = self.global_order(epoch)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > order.size:
            reps = -(-self.total_size // order.size)
            order = np.tile(order, reps)[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def create_sampler(
    name: str, labels: Sequence[int] | np.ndarray | object, **kwargs: object
) -> ClassAwareSampler:
    """Factory by name: ``"class_balanced"`` (alias ``"balanced"``, ``"cb"``), ``"sqrt"``
    (``"square_root"``), ``"instance"``, ``"progressive"``; ``kwargs`` go to
    :class:`ClassAwareSampler`."""
    aliases = {"balanced": "class_balanced", "cb": "class_balanced", "square_root": "sqrt"}
    mode = aliases.get(name.lower(), name.lower())
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLING_MODES}")
    return ClassAwareSampler(labels, mode=mode, **kwargs)  # type: ignore[arg-type]


def build_class_aware_sampler(
    dataset: object,
    strategy: str = "class_balanced",
    *,
    label_column: str | None = None,
    seed: int = 0,
    num_epochs: float | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    num_samples: int | None = None,
    drop_last: bool = False,
    class_counts: Sequence[int] | ClassCounts | None = None,
) -> ClassAwareSampler:
    """Sampler for a training ``datasets.Dataset`` (or label sequence) by strategy name, as the
    Trainer needs it: ``strategy`` as in :func:`create_sampler`, ``num_epochs`` is ``T`` of the
    progressive schedule (ignored otherwise), ``class_counts`` the dataset's counts when the
    caller has them (see :class:`ClassAwareSampler`). Pass ``num_replicas=1, rank=0`` when
    accelerate shards the DataLoader (see the module docstring)."""
    return create_sampler(
        strategy,
        dataset,
        label_column=label_column,
        seed=seed,
        total_epochs=num_epochs if strategy.lower() == "progressive" else None,
        num_replicas=num_replicas,
        rank=rank,
        num_samples=num_samples,
        drop_last=drop_last,
        class_counts=class_counts,
    )


def seed_host_rngs(*entropy: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch's CPU generator from ``entropy``
    (non-negative integers) through ``numpy.random.SeedSequence``, so that each gets an
    independent, platform-stable stream. CUDA generators are left alone."""
    import random

    words = np.random.SeedSequence([int(e) for e in entropy]).generate_state(4, np.uint32)
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words[:2])  # noqa: NPY002 -- transforms/collators (timm Mixup) read it
    torch.default_generator.manual_seed(int(words[2]) << 32 | int(words[3]))


def batch_seed(*entropy: int) -> int:
    """A 63-bit seed for the ``torch.Generator`` of one batch, from ``(seed, epoch, batch)``
    through ``numpy.random.SeedSequence`` (platform-stable)."""
    words = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class SeededIndex(int):
    """A dataset index that carries the seed of the batch it belongs to (``batch_seed``).

    It is an ``int`` for every consumer (``DataLoader`` batching, accelerate's batch sharding and
    skipping, ``datasets``); a dataset that augments whole batches (the pixel-cache fast path)
    reads ``indices[0].batch_seed`` in ``__getitems__``. The seed travels with the indices into
    DataLoader worker processes, so the batch is the same whatever the number of workers."""

    def __new__(cls, index: int, batch_seed: int) -> SeededIndex:
        obj = super().__new__(cls, index)
        obj.batch_seed = batch_seed
        return obj

    def __reduce__(self):
        return (SeededIndex, (int(self), self.batch_seed))


class BatchSeededSampler(Sampler[int]):
    """Wraps a training sampler so that the data randomness of every batch depends only on
    ``(seed, epoch, batch index)``, which makes a resumed run draw what the uninterrupted run drew.

    Before the first index of batch ``b`` (positions ``b * batch_size ...``) is handed out, the host
    RNGs are re-seeded with :func:`seed_host_rngs` ``(seed, epoch, 1, b)``; ``set_epoch`` and the
    start of an iteration re-seed them with ``(seed, epoch, 0, 0)``. In a single-process
    ``DataLoader`` (``num_workers=0``) a batch is fetched right after its indices are drawn, so its
    transforms (random crops, flips, RandAugment, timm's Python/NumPy draws) and collator (mixup)
    see a seeded state. Why it matters: ``transformers.Trainer`` resumes mid-epoch by skipping the
    first batches without loading them and restoring the checkpoint's RNG state only after it has
    prefetched the next ones, so with a plain global RNG every later augmentation is shifted.

    With ``num_workers > 0`` the workers' RNGs are seeded from the host state at iterator creation,
    which ``set_epoch`` makes a function of ``(seed, epoch)``: a resume at an epoch boundary is
    exact, a resume mid-epoch is exact in order and loss state but not in augmentation draws.

    With ``tag_batches=True`` every index is yielded as a :class:`SeededIndex` whose
    ``batch_seed`` is :func:`batch_seed` ``(seed, epoch, 2, b)``: a dataset that augments the batch
    with its own generator (the pixel-cache fast path) is then exact on a mid-epoch resume with any
    number of workers, since the seed travels with the indices.

    Args:
        sampler: the wrapped sampler (its ``set_epoch`` is forwarded when it has one).
        batch_size: the per-process batch size of the ``DataLoader``.
        seed: base seed (``TrainingArguments.data_seed`` or ``seed``).
        tag_batches: yield :class:`SeededIndex` values (see above).
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, seed: int = 0, tag_batches: bool = False
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.tag_batches = bool(tag_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (forwarded to the wrapped sampler) and re-seed the host RNGs."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        seed_host_rngs(self.seed, self.epoch, 0, 0)

    def __iter__(self) -> Iterator[int]:
        # Seeded before the wrapped iterator starts: a RandomSampler draws its permutation seed
        # from the global torch RNG at its first step.
        seed_host_rngs(self.seed, self.epoch, 0, 0)
        tag = None
        for position, index in enumerate(self.sampler):
            if position % self.batch_size == 0:
                batch = position // self.batch_size
                seed_host_rngs(self.seed, self.epoch, 1, batch)
                if self.tag_batches:
                    tag = batch_seed(self.seed, self.epoch, 2, batch)
            yield SeededIndex(index, tag) if self.tag_batches else index

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

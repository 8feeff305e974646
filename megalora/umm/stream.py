"""The data-parallel sample stream: deterministic, resumable micro-batches for one DP rank.

``dataset`` is anything with ``len`` and integer indexing that returns samples (``data.py``'s
``UMMDataset``); if it has ``check_seq_length(seq_length)``, every sample's length is checked
against ``seq_length`` when the stream is made.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megalora.umm.batch import UMMBatch, collate
from megalora.umm.tokens import SpecialTokens


class DataStream:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Each epoch visits a permutation of the dataset drawn from (seed, epoch). Step k of an epoch
    takes the k-th global batch (``micro_batch_size * dp_size`` samples) of that order and rank r
    keeps its r-th micro-batch-sized piece, so ranks never share a sample within an epoch. The
    last ``len(dataset) % global_batch`` samples of each epoch's order are skipped (a different
    set every epoch when shuffling).
    """

    def __init__(self, dataset, *, micro_batch_size: int, seq_length: int,
                 special: SpecialTokens, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        for name, v in (("micro_batch_size", micro_batch_size), ("seq_length", seq_length),
                        ("dp_size", dp_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DataStream: {name} must be a positive int, got {v!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"DataStream: dp_rank must be in [0, dp_size={dp_size}), got "
                             f"{dp_rank!r}")
        self.dataset, self.special = dataset, special
        check = getattr(dataset, "check_seq_length", None)
        if check is not None:
            # Every sample must fit: found here, before training, rather than at the step that
            # happens to draw it (collate keeps its own check for datasets without this method).
            check(seq_length)
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        if len(dataset) < self.global_batch:
            raise ValueError(f"data: the dataset has {len(dataset)} samples but one global batch "
                             f"needs micro_batch_size x dp_size = {micro_batch_size} x {dp_size} "
                             f"= {self.global_batch}; use more data or a smaller batch")
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global sample order of ``epoch`` (identical on every rank)."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        # Mix seed and epoch into one 63-bit seed so (seed, epoch) pairs do not collide.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        return torch.randperm(n, generator=g)

    def next_indices(self) -> List[int]:
        """Dataset indices of this rank's next micro-batch (advances the stream)."""
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position + self.dp_rank * self.micro_batch_size
        self.position += self.global_batch
        return self._order[start:start + self.micro_batch_size].tolist()

    def next_batch(self) -> UMMBatch:
        return collate([self.dataset[i] for i in self.next_indices()], self.seq_length,
                       self.special)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the stream is; restoring it replays exactly the batches that would follow."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle),
                          ("num_samples", len(self.dataset))):
            if state.get(key) != mine:
                raise ValueError(f"data stream state has {key}={state.get(key)!r} but this stream "
                                 f"has {key}={mine!r}; resuming would not replay the same order")
        position = int(state["position"])
        # Positions are counted in samples, so a resume with another dp_size is exact as long as
        # the old position falls on a boundary of the new global batch.
        if position % self.global_batch or position > len(self.dataset):
            raise ValueError(f"data stream state position={position} is not a multiple of this "
                             f"stream's global batch {self.global_batch} (micro_batch_size x "
                             "dp_size changed?)")
        self.epoch, self.position, self._order = int(state["epoch"]), position, None

"""Batches for the trainer: per-sample records, padding collation, and the resumable per-rank sample stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from accvideo_core.sampling import seeded_noise
from accvideo_core.synvid.format import SynVidDataset, SynVidError, SynVidSample

# One sample's tensors, named per sample (a collated batch keeps the names, with a batch dimension in front): a data
# record holds ``key_latents`` [m+1, C, T, H, W] (sigma 1 first) and ``uid``, a queue entry one ``latent``
# [C, T, H, W] (accvideo_core.train.queues); both hold text_states, text_mask, pooled and guidance.
Record = dict[str, torch.Tensor]


def sample_record(sample: SynVidSample, uid: int) -> Record:
    """Trainer record of a SynVid sample read at the trainer's key steps only (``SynVidDataset(steps=key_steps)``,
    so its stored latents are the key latents), with its conditioning and a unique id."""
    return {"key_latents": sample.latents.float(), "text_states": sample.text_states,
            "text_mask": sample.text_mask, "pooled": sample.pooled,
            "guidance": torch.tensor(float(sample.guidance)), "uid": torch.tensor(int(uid))}


def collate(records: list[Record], device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Stack records; text states and masks are right-padded to the longest prompt (mask 0 = padding)."""
    length = max(int(r["text_mask"].shape[0]) for r in records)
    out: dict[str, torch.Tensor] = {}
    for key in records[0]:
        items = [r[key] for r in records]
        if key in ("text_states", "text_mask"):
            items = [torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[0]) if t.ndim == 2 else
                                             (0, length - t.shape[0])) for t in items]
        t = torch.stack(items)
        if t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.to(device) if device is not None else t
    return out


def split(batch: dict[str, torch.Tensor]) -> list[Record]:
    """Inverse of :func:`collate` (padding kept)."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


@dataclass
class StreamState:
    epoch: int = 0
    cursor: int = 0            # position in this rank's shard of the epoch permutation
    bad: tuple[int, ...] = ()  # dataset indices known to be corrupt (skipped without re-reading)


class SampleStream:
    """Endless, deterministic, resumable stream of training samples for one rank.

    Epoch ``e`` uses the permutation ``randperm(N, seed + e)``; rank ``r`` of ``W`` reads positions ``r, r+W, ...``
    (the tail that does not split evenly is dropped, as DistributedSampler(drop_last=True)). So the samples of a
    global batch are the same for any number of ranks. Corrupt samples (or samples failing ``check``) are reported
    through ``on_error`` once, remembered and skipped; the epoch goes on.
    """

    def __init__(self, dataset: SynVidDataset, indices: list[int], *, rank: int, world: int, seed: int,
                 on_error: Callable[[int, SynVidError], None], check: Callable[[object], None] | None = None):
        self.dataset = dataset
        self.check = check
        self.indices = indices
        self.rank, self.world, self.seed = rank, world, seed
        self.on_error = on_error
        self.state = StreamState()
        self.per_rank = len(indices) // world
        if self.per_rank < 1:
            raise SynVidError(f"{dataset.root}: {len(indices)} training samples cannot feed {world} ranks")

    def _position(self, epoch: int, cursor: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.indices), generator=g)
        return int(perm[self.rank + self.world * cursor])

    def next(self) -> Record:
        misses = 0
        while True:
            s = self.state
            if s.cursor >= self.per_rank:
                s.epoch, s.cursor = s.epoch + 1, 0
            pos = self._position(s.epoch, s.cursor)
            uid = s.epoch * len(self.indices) + pos
            s.cursor += 1
            index = self.indices[pos]
            if index in s.bad:
                misses += 1
            else:
                try:
                    sample = self.dataset.load(index)
                    if self.check is not None:
                        self.check(sample)
                    return sample_record(sample, uid)
                except SynVidError as err:
                    path = str(self.dataset.path(index))
                    if path not in str(err):
                        err = SynVidError(f"{path}: {err}")
                    s.bad = tuple(sorted(set(s.bad) | {index}))
                    self.on_error(index, err)
                    misses += 1
            if misses > self.per_rank:
                raise SynVidError(f"{self.dataset.root}: no readable sample left in this rank's shard")

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "bad": list(self.state.bad)}

    def load_state_dict(self, d: dict) -> None:
        self.state = StreamState(int(d["epoch"]), int(d["cursor"]), tuple(int(i) for i in d["bad"]))

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run on ``len(states)`` ranks: the epoch position (samples
        consumed) is kept and this rank takes its share of the rest, so the global batches go on as in an
        uninterrupted run (exactly when the training samples split evenly over both rank counts and none was
        skipped; after a skipped sample the furthest rank's position is kept)."""
        epoch, cursor = max((int(d["epoch"]), int(d["cursor"])) for d in states)
        consumed = cursor * len(states)
        bad = sorted({int(i) for d in states for i in d["bad"]})
        self.state = StreamState(epoch, -(-consumed // self.world), tuple(bad))


def noise_for(uids: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise per sample, a pure function of (seed, sample uid): identical for any rank layout."""
    return seeded_noise(shape, [(seed * 1_000_003 + int(uid)) % (2 ** 63) for uid in uids.tolist()])

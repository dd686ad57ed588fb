"""Batches for the trainer: per-sample records, padding collation, and the resumable per-rank sample stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from accvideo_core.sampling import sample_flow, seeded_noise
from accvideo_core.synvid.format import SynVidDataset, SynVidError, SynVidSample

# One sample's tensors, named per sample (a collated batch keeps the names, with a batch dimension in front): a data
# record holds ``key_latents`` [m+1, C, T, H, W] (sigma 1 first) and ``uid``, a queue entry one ``latent``
# [C, T, H, W] (accvideo_core.train.queues); both hold text_states, text_mask, pooled and guidance.
Record = dict[str, torch.Tensor]
# The record fields a transformer call is conditioned on, in the order of its positional arguments after (x, t).
CONDITIONING = ("text_states", "text_mask", "pooled", "guidance")


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
    position: int = 0          # this rank's next position in the run's endless sample sequence
    bad: tuple[int, ...] = ()  # dataset indices known to be corrupt (skipped without re-reading)


class SampleStream:
    """Endless, deterministic, resumable stream of training samples for one data-parallel rank.

    The run's sample sequence is the concatenation of the epoch permutations (epoch ``e``: ``randperm(N)`` seeded
    by ``seed`` and ``e``); rank ``r`` of ``W`` reads its positions ``r, r + W, r + 2W, ...``, across epoch
    boundaries (nothing is dropped, so ``N`` need not be a multiple of ``W``). The samples of a global batch are
    therefore the same for any number of ranks, and a run continues on another number of ranks from any position
    (:meth:`load_resharded`). Corrupt samples (or samples failing ``check``) are reported through ``on_error``
    once, remembered and skipped (the rank reads its next position).
    """

    def __init__(self, dataset: SynVidDataset, indices: list[int], *, rank: int, world: int, seed: int,
                 on_error: Callable[[int, SynVidError], None], check: Callable[[object], None] | None = None):
        self.dataset = dataset
        self.check = check
        self.indices = indices
        self.rank, self.world, self.seed = rank, world, seed
        self.on_error = on_error
        self.state = StreamState(position=rank)
        self._perm: tuple[int, torch.Tensor] | None = None   # (epoch, its permutation)
        if len(indices) < world:
            raise SynVidError(f"{dataset.root}: {len(indices)} training samples cannot feed {world} ranks")

    def _sample_at(self, position: int) -> tuple[int, int]:
        """(index into ``indices``, sample uid) at a position of the run's sample sequence."""
        epoch, offset = divmod(position, len(self.indices))
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(len(self.indices), generator=g))
        pos = int(self._perm[1][offset])
        return pos, epoch * len(self.indices) + pos

    def next(self) -> Record:
        misses = 0
        while True:
            s = self.state
            pos, uid = self._sample_at(s.position)
            s.position += self.world
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
            if misses > len(self.indices):
                raise SynVidError(f"{self.dataset.root}: no readable sample left in this rank's shard")

    def state_dict(self) -> dict:
        return {"position": self.state.position, "bad": list(self.state.bad)}

    def load_state_dict(self, d: dict) -> None:
        self.state = StreamState(self._saved_position(d, self.rank, self.world), tuple(int(i) for i in d["bad"]))

    def _saved_position(self, d: dict, rank: int, world: int) -> int:
        if "position" in d:
            return int(d["position"])
        # checkpoints of the earlier per-epoch layout (epoch, cursor in the rank's shard; exact for even splits)
        return int(d["epoch"]) * len(self.indices) + rank + world * int(d["cursor"])

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the states of all data-parallel ranks of a run on ``len(states)`` of them (in rank
        order): the run's samples consumed so far are kept and this rank reads its share of the rest, so the
        global batches go on exactly as in an uninterrupted run, for any sample count and rank counts (as long as
        no corrupt sample was skipped; after a skip the furthest rank's position is kept)."""
        world = len(states)
        consumed = max(self._saved_position(d, r, world) - r for r, d in enumerate(states))
        bad = sorted({int(i) for d in states for i in d["bad"]})
        self.state = StreamState(consumed + self.rank, tuple(bad))


def noise_for(uids: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise per sample, a pure function of (seed, sample uid): identical for any rank layout."""
    return seeded_noise(shape, [(seed * 1_000_003 + int(uid)) % (2 ** 63) for uid in uids.tolist()])


def chain_from_noise(model: torch.nn.Module, batch: dict[str, torch.Tensor], sigmas: list[float],
                     seed: int) -> list[torch.Tensor]:
    """``model``'s Euler chain over ``sigmas`` (``sample_flow``) from ``noise_for(uid, seed)`` with the batch's
    prompts: its latent after every step, entry j at ``sigmas[j + 1]`` (fp32). Over the key sigmas these are the
    fakes a discriminator is judged on."""
    latents: list[torch.Tensor] = []
    sample_flow(model, noise_for(batch["uid"], tuple(batch["key_latents"].shape[2:]), seed), sigmas,
                **{key: batch[key] for key in CONDITIONING}, callback=lambda step: latents.append(step["x"]))
    return latents


def conditioning(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A batch's ``CONDITIONING`` tensors, for ``model(x, t, *conditioning(batch))``."""
    return tuple(batch[key] for key in CONDITIONING)

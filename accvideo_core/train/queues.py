"""The m+1 FIFO queues Q_0..Q_m of AccVideo's Alg. 1 (fake samples without forward diffusion).

Q_m holds fresh Gaussian noise with the conditioning of the sample it was drawn for; Q_k (k < m) holds the
student's own latents at t'_k, made by one Euler step of the student from an entry popped from Q_{k+1}.
Entries are per sample (latent + its conditioning), so micro-batch sizes may differ between push and pop.
"""
from __future__ import annotations

from collections import deque

import torch

from accvideo_core.train.batching import Record, collate, split


class TrajectoryQueues:
    def __init__(self, segments: int, capacity: int):
        self.segments = segments
        self.capacity = capacity
        self.queues: list[deque[Record]] = [deque() for _ in range(segments + 1)]
        self.dropped = [0] * (segments + 1)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues)

    def size(self, k: int) -> int:
        return len(self.queues[k])

    def push(self, k: int, latent: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Append a batch ``latent [n, C, T, H, W]`` (one latent at t'_k per sample, detached) with its
        conditioning; the oldest entries beyond ``capacity`` are dropped (only Q_0, which nobody pops, normally
        fills up)."""
        batch = dict(cond, latent=latent.detach())
        q = self.queues[k]
        for rec in split(batch):
            q.append(rec)
            if len(q) > self.capacity:
                q.popleft()
                self.dropped[k] += 1

    def pop(self, k: int, n: int, device: torch.device | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Remove the ``n`` oldest entries of Q_k: ``(latent [n, C, T, H, W], conditioning batch)``."""
        q = self.queues[k]
        if len(q) < n:
            raise RuntimeError(f"queue Q_{k} holds {len(q)} entries, {n} needed; raise loss.queue_capacity")
        batch = collate([q.popleft() for _ in range(n)], device)
        latent = batch.pop("latent")
        return latent, batch

    def snapshot(self) -> tuple[list[deque[Record]], list[int]]:
        """The contents now, for :meth:`restore` (entries are never changed in place: copies of the deques)."""
        return [deque(q) for q in self.queues], list(self.dropped)

    def restore(self, snapshot: tuple[list[deque[Record]], list[int]]) -> None:
        self.queues, self.dropped = [deque(q) for q in snapshot[0]], list(snapshot[1])

    def state_dict(self) -> dict:
        return {"queues": [[{k: v.to("cpu") for k, v in rec.items()} for rec in q] for q in self.queues],
                "dropped": list(self.dropped)}

    def load_resharded(self, states: list[dict], rank: int, world: int, device: torch.device | str) -> None:
        """Entries for ``rank`` of ``world`` from the queues of all ranks of a run on ``len(states)`` ranks.

        Entry i of old rank r is entry ``i * len(states) + r`` of the run's global order (ranks push in
        lockstep, rank r holding global batch positions r, r + W, ...); this rank takes positions
        ``rank, rank + world, ...``, the newest ``capacity`` kept.
        """
        if any(len(d["queues"]) != self.segments + 1 for d in states):
            raise ValueError(f"checkpoint queues do not match this run's {self.segments + 1}")
        for k in range(self.segments + 1):
            lists = [d["queues"][k] for d in states]
            if len({len(q) for q in lists}) > 1:
                raise ValueError(f"queue Q_{k} has different lengths on the saved ranks; resume on "
                                 f"{len(states)} ranks")
            merged = [q[i] for i in range(len(lists[0])) for q in lists]
            mine = merged[rank::world][-self.capacity:]
            self.queues[k] = deque({key: v.to(device) for key, v in rec.items()} for rec in mine)
        self.dropped = [sum(d["dropped"][k] for d in states) // world for k in range(self.segments + 1)]

    def load_state_dict(self, d: dict, device: torch.device | str) -> None:
        if len(d["queues"]) != self.segments + 1:
            raise ValueError(f"checkpoint has {len(d['queues'])} queues, this run needs {self.segments + 1}")
        self.queues = [deque({k: v.to(device) for k, v in rec.items()} for rec in q) for q in d["queues"]]
        self.dropped = list(d["dropped"])

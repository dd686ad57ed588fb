"""A tiny deterministic text encoder for the miniature HunyuanVideo family (no downloads, no training).

It stands in for HunyuanVideo's two text encoders with the same interface the transformer consumes:
text states ``[B, L, D]`` (LLaVA-Llama hidden states in the real model), a mask ``[B, L]`` (1 = valid token,
0 = padding after the caption) and a pooled vector ``[B, P]`` (CLIP-L's pooled output, 768-d, in the real model).

Tokens are the words of a fixed vocabulary (the caption template's words and every attribute value), preceded by
``<bos>`` so that no prompt has an empty mask. Token embeddings are a seeded Gaussian table, positions a fixed
sinusoidal table; states = token + position for valid tokens and exactly 0 for padding. The pooled vector is a
seeded projection of the masked mean of ``tanh(states)`` (the nonlinearity makes it depend on word order, so
"a red square ... blue background" and "a blue square ... red background" pool differently). All weights are
frozen; ``save``/``load`` round-trip them (and the vocabulary and config) through one safetensors file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from ..utils.io import CheckpointError, read_metadata, read_state_dict, save_safetensors
from .data import BACKGROUND_COLORS, CAPTION_TEMPLATE, DIRECTIONS, SHAPE_COLORS, SHAPES

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
_WORD = re.compile(r"[a-z]+")


def default_vocab() -> tuple[str, ...]:
    """Special tokens, then the template's words and all attribute values, sorted (fixed ids)."""
    words = set(_WORD.findall(CAPTION_TEMPLATE.lower())) - {"color", "shape", "direction"}
    words |= {"an"} | set(SHAPES) | set(SHAPE_COLORS) | set(DIRECTIONS) | set(BACKGROUND_COLORS)
    return (PAD, BOS, UNK, *sorted(words))


@dataclass(frozen=True)
class TinyTextEncoderConfig:
    vocab: tuple[str, ...] = field(default_factory=default_vocab)
    text_dim: int = 64
    pooled_dim: int = 768  # CLIP-L's width: keeps a miniature transformer loadable where 768 is hard-coded
    max_length: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if tuple(self.vocab[:3]) != (PAD, BOS, UNK) or len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"vocab must start with {(PAD, BOS, UNK)} and hold unique words")
        if self.text_dim < 2 or self.text_dim % 2 or self.pooled_dim < 1 or self.max_length < 2:
            raise ValueError("text_dim must be even and >= 2, pooled_dim >= 1, max_length >= 2; "
                             f"got {self.text_dim}, {self.pooled_dim}, {self.max_length}")


class TextEncoding(NamedTuple):
    states: torch.Tensor  # [B, L, D] float32
    mask: torch.Tensor  # [B, L] int64, 1 = valid
    pooled: torch.Tensor  # [B, P] float32


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)[None]
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freqs)
    table[:, 1::2] = torch.cos(pos * freqs)
    return table.float()


class TinyTextEncoder(nn.Module):
    """Frozen, seeded text encoder: ``encode(prompts) -> TextEncoding(states, mask, pooled)``."""

    def __init__(self, config: TinyTextEncoderConfig = TinyTextEncoderConfig()):
        super().__init__()
        self.config = config
        self.word_to_id = {w: i for i, w in enumerate(config.vocab)}
        gen = torch.Generator().manual_seed(config.seed)
        self.token_embedding = nn.Parameter(torch.randn(len(config.vocab), config.text_dim, generator=gen),
                                            requires_grad=False)
        self.position_embedding = nn.Parameter(0.5 * sinusoidal_positions(config.max_length, config.text_dim),
                                               requires_grad=False)
        proj = torch.randn(config.pooled_dim, config.text_dim, generator=gen) / math.sqrt(config.text_dim)
        self.pooled_proj = nn.Parameter(proj, requires_grad=False)

    def tokenize(self, prompts: Sequence[str], *, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token_ids [B, L], mask [B, L])``, L = ``max_length``. Unknown words raise (or map to ``<unk>``
        with ``strict=False``); prompts longer than ``max_length - 1`` words raise."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = _WORD.findall(prompt.lower())
            unknown = [w for w in words if w not in self.word_to_id]
            if unknown and strict:
                raise ValueError(f"prompt {prompt!r} has words outside the mini vocabulary: {unknown}. "
                                 f"Known words: {' '.join(self.config.vocab[3:])}")
            if len(words) + 1 > length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {length - 1} fit "
                                 f"(max_length {length} includes <bos>)")
            toks = [self.word_to_id[BOS]] + [self.word_to_id.get(w, self.word_to_id[UNK]) for w in words]
            ids[b, :len(toks)] = torch.tensor(toks)
            mask[b, :len(toks)] = 1
        return ids, mask

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        valid = mask.to(self.token_embedding.dtype)[..., None]
        states = (self.token_embedding[token_ids] + self.position_embedding[None, :token_ids.shape[1]]) * valid
        mean = (torch.tanh(states) * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        return TextEncoding(states, mask, mean @ self.pooled_proj.T)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str, *, strict: bool = True) -> TextEncoding:
        ids, mask = self.tokenize(prompts, strict=strict)
        return self(ids.to(self.token_embedding.device), mask.to(self.token_embedding.device))

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights + config (as safetensors metadata) atomically."""
        meta = {"format": "accvideo-mini-text-encoder", "config": json.dumps(asdict(self.config))}
        return save_safetensors(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TinyTextEncoder":
        """Read a file written by :meth:`save` (safetensors only; config from its metadata)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: the mini text encoder is stored as .safetensors")
        tensors, meta = read_state_dict(path), read_metadata(path)
        if meta.get("format") != "accvideo-mini-text-encoder" or "config" not in meta:
            raise CheckpointError(f"{path} is not a mini text encoder file (metadata {sorted(meta)}); write it "
                                  "with TinyTextEncoder.save")
        raw = json.loads(meta["config"])
        config = TinyTextEncoderConfig(**{**raw, "vocab": tuple(raw["vocab"])})
        model = cls(config)
        model.load_state_dict(tensors, strict=True)
        return model

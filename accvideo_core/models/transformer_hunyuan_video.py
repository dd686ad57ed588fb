"""HunyuanVideo transformer (the 13B T2V DiT and AccVideo's distilled student share it).

Module names follow the ORIGINAL Tencent checkpoint layout exactly (``double_blocks.N.img_attn_qkv.weight``, ...),
so ``model.state_dict()`` is an original-layout checkpoint and LoRA targets are original names. Never rename.

Text padding follows the original varlen attention: image tokens and the valid text tokens of a prompt form one
sequence; padded text tokens are never attended to. The token refiner attends with the mask x mask pattern
(column 0 forced on) and pools the text with a masked mean.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn

from .. import kernels
from .attention import attention
from .sequence_parallel import SequenceParallel, TokenShard, joint_attention, replicated_input

TIMESTEP_CHANNELS = 256
TIMESTEP_MAX_PERIOD = 10000.0
GUIDANCE_SCALE_FACTOR = 1000.0  # the original embeds guidance * 1000 (6.0 -> 6000)
DEFAULT_GUIDANCE = 6.0  # HunyuanVideo / AccVideo embedded guidance (also ComfyUI's default)


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per axis (T, H, W): (16, 56, 56) for head dim 128 (the released models; ComfyUI hard-codes
    it); otherwise about a quarter for time and equal even halves of the rest for H and W ((4, 6, 6) for 16)."""
    if head_dim == 128:
        return (16, 56, 56)
    if head_dim < 6 or head_dim % 2:
        raise ValueError(f"head dim {head_dim} cannot hold 3D RoPE: it must be even and >= 6")
    t = max(2, 2 * round(head_dim / 8))
    if (head_dim - t) % 4:
        t += 2
    h = (head_dim - t) // 2
    return (t, h, h)


@dataclass
class TransformerConfig:
    """Architecture of a HunyuanVideo transformer. Defaults are the 13B T2V model ("HYVideo-T/2-cfgdistill")."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 20
    num_single_blocks: int = 40
    num_refiner_blocks: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    pooled_dim: int = 768
    guidance_embed: bool = True
    rope_axes: tuple[int, int, int] | None = None  # None -> default_rope_axes(head_dim)
    rope_theta: float = 256.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.rope_axes is None:
            self.rope_axes = default_rope_axes(self.head_dim)
        self.rope_axes = tuple(int(a) for a in self.rope_axes)
        if len(self.rope_axes) != 3 or sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be 3 even sizes summing to the head dim "
                             f"{self.head_dim} (hidden_size / num_heads)")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w); got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_layers(self) -> int:
        """Blocks counted by ``image_features(layer=...)``: double blocks, then single blocks."""
        return self.num_double_blocks + self.num_single_blocks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["rope_axes"] = list(self.rope_axes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_CHANNELS,
                       max_period: float = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of float timesteps ``[B]`` -> ``[B, dim]`` in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def rope_cos_sin(grid: tuple[int, int, int], axes: tuple[int, int, int], theta: float,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for a (T, H, W) token grid: cos, sin ``[T*H*W, sum(axes)]`` fp32, pairs interleaved.

    Tokens are ordered T-major (then H, then W), as the patch embedding flattens them.
    """
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in grid), indexing="ij")
    angles = []
    for pos, dim in zip(coords, axes):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim)
        angles.append(torch.outer(pos.reshape(-1), inv_freq))
    ang = torch.cat(angles, dim=1).repeat_interleave(2, dim=1)
    return ang.cos(), ang.sin()


def _split_qkv(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projection ``[B, L, 3 * heads * D]`` (rows [q, k, v]) -> q, k, v ``[B, L, heads, D]`` (views)."""
    return x.unflatten(-1, (3, heads, -1)).unbind(2)  # "b l (qkv h d) -> qkv b l h d" (no einops: see bench.gpu)


def _gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place tanh-GELU (inference only; works on strided views)."""
    if hasattr(torch.ops.aten, "gelu_"):
        return torch.ops.aten.gelu_(x, approximate="tanh")
    return x.copy_(F.gelu(x, approximate="tanh"))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight (q/k norm of the attention heads)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm_rope(x, self.weight, eps=self.eps)


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu_tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled():
            h = F.gelu(h, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(h)
        elif self.activation == "gelu_tanh":
            _gelu_tanh_(h)  # inference: in place, one [tokens, mlp_hidden] buffer less at the peak
        else:
            F.silu(h, inplace=True)
        return self.fc2(h)


class Modulation(nn.Module):
    """adaLN modulation ``linear(silu(vec))``; callers pass ``silu(vec)`` computed once per forward."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, factor * dim)

    def forward(self, vec_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(vec_act).chunk(self.linear.out_features // self.linear.in_features, dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(dtype))


class MLPEmbedder(nn.Module):
    """Pooled text vector (CLIP-L) -> hidden: in_layer -> SiLU -> out_layer."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """Masked-mean text -> hidden inside the token refiner: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class RefinerBlock(nn.Module):
    """Token-refiner block: masked self-attention over the text, gated by the refiner conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation="silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, self_mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(cond).chunk(2, dim=-1)
        q, k, v = _split_qkv(self.self_attn_qkv(self.norm1(x)), self.heads)
        x = kernels.gated_residual(x, self.self_attn_proj(attention(q, k, v, self_mask)), gate_attn)
        return kernels.gated_residual(x, self.mlp(self.norm2(x)), gate_mlp)


class IndividualTokenRefiner(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RefinerBlock(dim, heads, mlp_ratio) for _ in range(depth))


class SingleTokenRefiner(nn.Module):
    """``txt_in``: projects the LLM hidden states to the model width and refines them (timestep + pooled text)."""

    def __init__(self, text_dim: int, dim: int, heads: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.c_embedder = TextProjection(text_dim, dim)
        self.individual_token_refiner = IndividualTokenRefiner(dim, heads, depth, mlp_ratio)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """text ``[B, L, text_dim]``, timestep ``[B]`` (sigma x 1000), mask bool ``[B, L]``."""
        m = mask.to(torch.float32).unsqueeze(-1)
        pooled = ((text.float() * m).sum(1) / m.sum(1)).to(text.dtype)  # masked mean (the official pooling)
        cond = self.t_embedder(timestep, text.dtype) + self.c_embedder(pooled)
        x = self.input_embedder(text)
        self_mask = None
        if not bool(mask.all()):
            self_mask = mask[:, None, :] & mask[:, :, None]
            self_mask[:, :, 0] = True  # as the original: every row keeps column 0, so no row is empty
        for block in self.individual_token_refiner.blocks:
            x = block(x, cond, self_mask)
        return x


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, joint attention over [image tokens, valid text tokens]."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, 6))
            setattr(self, f"{stream}_attn_qkv", nn.Linear(dim, 3 * dim))
            setattr(self, f"{stream}_attn_q_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_k_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_proj", nn.Linear(dim, dim))
            setattr(self, f"{stream}_mlp", MLP(dim, mlp_hidden))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec_act: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, key_mask: torch.Tensor | None,
                shard: TokenShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``shard``: sequence parallelism (``img`` is this rank's shard of the image tokens)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec_act)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec_act)

        iq, ik, iv = _split_qkv(self.img_attn_qkv(kernels.layer_norm_modulate(img, i_shift1, i_scale1)), self.heads)
        iq = kernels.rms_norm_rope(iq, self.img_attn_q_norm.weight, cos, sin)
        ik = kernels.rms_norm_rope(ik, self.img_attn_k_norm.weight, cos, sin)
        tq, tk, tv = _split_qkv(self.txt_attn_qkv(kernels.layer_norm_modulate(txt, t_shift1, t_scale1)), self.heads)
        tq = kernels.rms_norm_rope(tq, self.txt_attn_q_norm.weight)
        tk = kernels.rms_norm_rope(tk, self.txt_attn_k_norm.weight)

        out = joint_attention(torch.cat((iq, tq), 1), torch.cat((ik, tk), 1), torch.cat((iv, tv), 1), key_mask,
                              shard)
        del iq, ik, iv, tq, tk, tv  # free before the MLPs (inference peak memory)
        img_attn, txt_attn = out.split((img.shape[1], txt.shape[1]), dim=1)

        img = kernels.gated_residual(img, self.img_attn_proj(img_attn), i_gate1)
        img = kernels.gated_residual(img, self.img_mlp(kernels.layer_norm_modulate(img, i_shift2, i_scale2)),
                                     i_gate2)
        txt = kernels.gated_residual(txt, self.txt_attn_proj(txt_attn), t_gate1)
        txt = kernels.gated_residual(txt, self.txt_mlp(kernels.layer_norm_modulate(txt, t_shift2, t_scale2)),
                                     t_gate2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence: parallel attention and MLP from one fused input projection."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim = dim
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)  # rows [q, k, v, mlp]
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)  # input [attention, mlp]
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.modulation = Modulation(dim, 3)

    def forward(self, x: torch.Tensor, vec_act: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None, shard: TokenShard | None = None) -> torch.Tensor:
        """x: ``[B, N_img + L_txt, dim]`` with image tokens first (RoPE covers the first ``cos.shape[0]``, the image
        tokens; with ``shard`` this rank's shard of them)."""
        shift, scale, gate = self.modulation(vec_act)
        fused = self.linear1(kernels.layer_norm_modulate(x, shift, scale))  # [q | k | v | mlp]
        q, k, v = _split_qkv(fused[..., : 3 * self.dim], self.heads)
        q = kernels.rms_norm_rope(q, self.q_norm.weight, cos, sin)
        k = kernels.rms_norm_rope(k, self.k_norm.weight, cos, sin)
        attn = joint_attention(q, k, v, key_mask, shard)
        del q, k, v  # free before the output projection (inference peak memory)
        if torch.is_grad_enabled():
            hidden = torch.cat((attn, F.gelu(fused[..., 3 * self.dim:], approximate="tanh")), dim=-1)
        else:
            # Inference: the [v | mlp] columns of the fused buffer become linear2's input [attention | gelu(mlp)]
            # in place (v is consumed), so neither the GELU output nor the concatenation is allocated.
            hidden = fused[..., 2 * self.dim:]
            hidden[..., : self.dim] = attn
            del attn
            _gelu_tanh_(hidden[..., self.dim:])
        return kernels.gated_residual(x, self.linear2(hidden), gate)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # rows [shift, scale]

    def forward(self, x: torch.Tensor, vec_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](vec_act).chunk(2, dim=-1)
        return self.linear(kernels.layer_norm_modulate(x, shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # "b c t h w -> b (t h w) c"


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in host memory (pinned and asynchronous when ``t`` is on CUDA)."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    return host.copy_(t.detach(), non_blocking=t.is_cuda)


def _saved_on_host(streams: tuple[torch.Tensor, ...]) -> torch.autograd.graph.saved_tensors_hooks:
    """While active, autograd saves these tensors (a checkpointed block's hidden-state inputs, which the checkpoint
    keeps for its recompute) as host copies and copies them back to their device when the backward pass needs
    them; every other saved tensor (the rotary tables all blocks share, the conditioning vector) stays put."""
    pointers = {t.data_ptr() for t in streams}

    def pack(t: torch.Tensor) -> Any:
        return (t.device, _to_host(t)) if t.data_ptr() in pointers else t

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, tuple):
            device, host = saved
            return host.to(device, non_blocking=True)
        return saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@dataclass
class _Prepared:
    """Everything the blocks need, computed once per forward."""

    img: torch.Tensor | None  # [B, N_img, hidden]
    txt: torch.Tensor | None  # [B, L_valid, hidden] (padding dropped or left-packed)
    vec_act: torch.Tensor  # silu(conditioning vector) [B, hidden]
    cos: torch.Tensor  # RoPE tables [N_img, head_dim] fp32
    sin: torch.Tensor
    key_mask: torch.Tensor | None  # [B, N_img + L_valid] bool, only for mixed valid lengths
    grid: tuple[int, int, int]  # (T', H', W') token grid
    shard: TokenShard | None = None  # sequence parallelism: img, cos and sin are this rank's rows


class HunyuanVideoTransformer3D(nn.Module):
    """The HunyuanVideo DiT. ``forward`` returns the flow-matching velocity for latents in model space."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        dim = c.hidden_size
        self.img_in = PatchEmbed(c.patch_size, c.in_channels, dim)
        self.time_in = TimestepEmbedder(dim)
        self.vector_in = MLPEmbedder(c.pooled_dim, dim)
        self.guidance_in = TimestepEmbedder(dim) if c.guidance_embed else None
        self.txt_in = SingleTokenRefiner(c.text_dim, dim, c.num_heads, c.num_refiner_blocks, c.mlp_ratio)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, c.num_heads, c.mlp_hidden) for _ in range(c.num_double_blocks))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, c.num_heads, c.mlp_hidden) for _ in range(c.num_single_blocks))
        self.final_layer = FinalLayer(dim, math.prod(c.patch_size) * c.out_channels)
        self.gradient_checkpointing = False
        self.offload_checkpoints = False
        self.sequence_parallel: SequenceParallel | None = None
        # torch.utils.checkpoint ``context_fn`` (LoRA adapters: the recompute sees the forward's adapter switch)
        self.checkpoint_context_fn: Callable[[], tuple] = noop_context_fn
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (fp8-stored linears compute in this dtype too)."""
        return self.img_in.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.proj.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True, *, offload: bool = False) -> None:
        """Recompute each block in the backward pass (training memory ~ one block's activations). ``offload``: each
        block's checkpointed input (its hidden-state streams) waits for the backward pass in host memory (pinned
        on CUDA, through saved-tensor hooks), so the device holds no per-block activations, at one device-host copy
        each way per block and forward graph."""
        self.gradient_checkpointing = enabled
        self.offload_checkpoints = enabled and offload

    def enable_sequence_parallel(self, group: torch.distributed.ProcessGroup | None) -> None:
        """Ulysses sequence parallelism over ``group`` (``None`` or a group of one rank: off).

        Every rank of the group calls the model with the same inputs and gets the same (full) output; in between
        it holds 1/N of the image tokens (see ``models/sequence_parallel.py``). Parameter gradients are this
        rank's share: sum them over the group. Input gradients are complete on every rank.
        """
        sp = SequenceParallel.over(group) if group is not None else None
        if sp is not None:
            sp.check_heads(self.config.num_heads)
        self.sequence_parallel = sp if sp is not None and sp.size > 1 else None

    # ------------------------------------------------------------------ inputs
    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_cos_sin(grid, self.config.rope_axes, self.config.rope_theta, device)
        return self._rope_cache[key]

    def _check_inputs(self, latents, text_states, text_mask, pooled) -> None:
        c = self.config
        problems = []
        if latents.dim() != 5 or latents.shape[1] != c.in_channels:
            problems.append(f"latents must be [B, {c.in_channels}, T, H, W]; got {tuple(latents.shape)}")
        else:
            for name, size, p in zip("THW", latents.shape[2:], c.patch_size):
                if size % p:
                    problems.append(f"latent {name}={size} is not a multiple of the patch size {p}")
        b = latents.shape[0]
        if text_states.dim() != 3 or text_states.shape[0] != b or text_states.shape[2] != c.text_dim:
            problems.append(f"text_states must be [B={b}, L, {c.text_dim}]; got {tuple(text_states.shape)}")
        if text_mask is None:
            return self._check_inputs(latents, text_states, text_states.new_ones(text_states.shape[:2]), pooled)
        if text_mask.shape != text_states.shape[:2]:
            problems.append(f"text_mask must be [B, L] = {tuple(text_states.shape[:2])}; got {tuple(text_mask.shape)}")
        elif not bool(text_mask.bool().any(1).all()):
            problems.append("text_mask has a prompt with no valid token (every row needs at least one 1)")
        if pooled.shape != (b, c.pooled_dim):
            problems.append(f"pooled must be [B={b}, {c.pooled_dim}] (CLIP-L pooled output); got {tuple(pooled.shape)}")
        if problems:
            raise ValueError("HunyuanVideoTransformer3D inputs: " + "; ".join(problems))

    @staticmethod
    def _batch_vector(value: Any, b: int, device: torch.device, name: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(b)
        if t.numel() != b:
            raise ValueError(f"{name} must be a float or a [B={b}] tensor; got {t.numel()} values")
        return t

    def _prepare(self, latents, timestep, text_states, text_mask, pooled, guidance) -> _Prepared:
        self._check_inputs(latents, text_states, text_mask, pooled)
        c = self.config
        dtype, device = self.dtype, self.device
        sp = self.sequence_parallel
        if sp is not None:  # inputs are replicated over the group: their gradients are the group's sum
            latents, text_states, pooled = (replicated_input(t, sp) for t in (latents, text_states, pooled))
        b = latents.shape[0]
        timestep = self._batch_vector(timestep, b, device, "timestep")
        if text_mask is None:  # no mask (as ComfyUI usually gives): every token is valid
            mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=device)
        else:
            mask = text_mask.to(device=device).bool()

        vec = self.time_in(timestep, dtype) + self.vector_in(pooled.to(device, dtype))
        if self.guidance_in is not None:
            g = DEFAULT_GUIDANCE if guidance is None else guidance
            vec = vec + self.guidance_in(self._batch_vector(g, b, device, "guidance") * GUIDANCE_SCALE_FACTOR, dtype)

        txt = self.txt_in(text_states.to(device, dtype), timestep, mask)
        img = self.img_in(latents.to(device, dtype))
        grid = tuple(s // p for s, p in zip(latents.shape[2:], c.patch_size))
        cos, sin = self._rope(grid, device)
        shard = None
        if sp is not None:
            shard = TokenShard(sp, img.shape[1])
            img, cos, sin = shard.shard(img), shard.local_rows(cos), shard.local_rows(sin)

        # Varlen attention as the original: drop padded text tokens. Equal valid counts -> plain gather, no mask;
        # otherwise left-pack the valid tokens and mask the rest out as keys (their own outputs are never used).
        counts = mask.sum(1)
        key_mask = None
        if not bool(mask.all()):
            n_max = int(counts.max())
            if bool((counts == n_max).all()):
                txt = txt[mask].view(b, n_max, -1)
            else:
                order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :n_max]
                txt = torch.gather(txt, 1, order[..., None].expand(-1, -1, txt.shape[-1]))
                txt_valid = torch.arange(n_max, device=device)[None] < counts[:, None]
                key_mask = torch.cat((mask.new_ones(b, math.prod(grid)), txt_valid), dim=1)
        return _Prepared(img=img, txt=txt, vec_act=F.silu(vec), cos=cos, sin=sin, key_mask=key_mask, grid=grid,
                         shard=shard)

    # ------------------------------------------------------------------ blocks
    def _call(self, block: nn.Module, *args: Any, streams: int = 1):
        """Run ``block`` (checkpointed when training); its first ``streams`` arguments are the hidden states."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args)
        with _saved_on_host(args[:streams]) if self.offload_checkpoints else contextlib.nullcontext():
            return checkpoint(block, *args, use_reentrant=False, context_fn=self.checkpoint_context_fn)

    def _run_blocks(self, p: _Prepared, layers: int) -> torch.Tensor:
        """Run the first ``layers`` blocks (double first); returns the image tokens ``[B, N, hidden]`` (this rank's
        shard under sequence parallelism)."""
        img, txt = p.img, p.txt
        p.img = p.txt = None  # hold no stale activations (inference peak memory)
        for block in self.double_blocks[:layers]:
            img, txt = self._call(block, img, txt, p.vec_act, p.cos, p.sin, p.key_mask, p.shard, streams=2)
        n_single = layers - len(self.double_blocks)
        if n_single <= 0:
            return img
        n_img = img.shape[1]
        x = torch.cat((img, txt), dim=1)
        del img, txt
        for block in self.single_blocks[:n_single]:
            x = self._call(block, x, p.vec_act, p.cos, p.sin, p.key_mask, p.shard)
        return x[:, :n_img]

    # ------------------------------------------------------------------ public API
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float, text_states: torch.Tensor,
                text_mask: torch.Tensor | None, pooled: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Velocity ``[B, C_out, T, H, W]`` (in ``latents``' dtype).

        latents ``[B, C, T, H, W]`` (model space); timestep ``[B]`` or float = sigma x 1000; text_states
        ``[B, L, text_dim]``; text_mask ``[B, L]`` (1 = valid; None = all valid); pooled ``[B, pooled_dim]``;
        guidance = the plain embedded-guidance scale (default 6.0; ignored by models without a guidance embedding).
        """
        p = self._prepare(latents, timestep, text_states, text_mask, pooled, guidance)
        img = self._run_blocks(p, self.config.num_layers)
        out = self._call(self.final_layer, img, p.vec_act)
        if p.shard is not None:
            out = p.shard.gather(out)
        return self._unpatchify(out, p.grid).to(latents.dtype)

    def image_features(self, latents: torch.Tensor, timestep: torch.Tensor | float, text_states: torch.Tensor,
                       text_mask: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | float | None = None,
                       *, layer: int) -> torch.Tensor:
        """Image-token features after block ``layer`` (1-based, double blocks first), ``[B, hidden, T', H', W']``.

        No block past ``layer`` is computed (the discriminator of AccVideo uses layers 40 and 60 of 60).
        """
        total = self.config.num_layers
        if not 1 <= layer <= total:
            raise ValueError(f"layer must be in 1..{total} (double blocks 1..{self.config.num_double_blocks}, "
                             f"then single blocks); got {layer}")
        p = self._prepare(latents, timestep, text_states, text_mask, pooled, guidance)
        img = self._run_blocks(p, layer)
        if p.shard is not None:
            img = p.shard.gather(img)
        t, h, w = p.grid
        return img.transpose(1, 2).unflatten(2, (t, h, w))  # "b (t h w) c -> b c t h w"

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        (pt, ph, pw), (t, h, w) = self.config.patch_size, grid
        # "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)"; torch ops: the single-GPU path needs no einops
        x = x.reshape(x.shape[0], t, h, w, self.config.out_channels, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], self.config.out_channels, t * pt, h * ph, w * pw)

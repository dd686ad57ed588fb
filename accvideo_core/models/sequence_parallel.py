"""Ulysses sequence parallelism for the HunyuanVideo transformer (DeepSpeed-Ulysses style).

With a sequence-parallel group of N ranks every rank holds 1/N of the image tokens between the attention calls.
Around attention an all-to-all trades the token split for a head split (each rank then sees every image token for
1/N of the heads) and a second all-to-all trades it back. The text tokens (a few hundred) are replicated on every
rank: their q/k/v are sliced to the rank's heads locally, and their attention outputs are all-gathered over heads.
So attention is exact, with the same text padding (key mask) and RoPE positions as one process.

Token counts that N does not divide are padded at the end of the sequence (the last ranks hold pad tokens); the pad
tokens are dropped right after the all-to-all, so attention never sees them, and dropped again when the output is
gathered. Nothing per token mixes tokens outside attention, so pad tokens cannot change a real token.

Gradients (every rank computes the same loss on the gathered output, as the trainer does):
- the gather's backward takes the rank's slice of the full gradient; inside the model every parameter gradient
  is this rank's share, so the **sum over the SP group** is the exact gradient (the text and conditioning paths,
  computed on every rank, receive shares too: the text head slice backpropagates zeros for other ranks' heads and
  the head all-gather's backward is a reduce-scatter);
- gradients of the model's inputs (latents for the discriminator path) are summed over the group by an
  identity-forward / all-reduce-backward op, so every rank holds the full, exact input gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import attention

# torch 2.13 renamed the tensor collectives (the old names still work there, with a deprecation warning)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """``einops.rearrange``, imported on first use: only sequence parallelism needs einops, so a single GPU runs
    the transformer with torch alone (``python -m bench.gpu`` on a machine without einops)."""
    from einops import rearrange as einops_rearrange

    return einops_rearrange(tensor, pattern, **sizes)


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel process group: ``size`` ranks, this one is ``rank`` within it."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def over(cls, group: dist.ProcessGroup | None = None) -> "SequenceParallel":
        """The group (default: all ranks of the default process group)."""
        group = group if group is not None else dist.group.WORLD
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.size:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"sequence parallel degree {self.size} must divide the number of attention heads "
                             f"({num_heads}; 24 for HunyuanVideo): use one of {divisors}")


@dataclass(frozen=True)
class TokenShard:
    """How one forward splits ``tokens`` image tokens over a :class:`SequenceParallel` group."""

    sp: SequenceParallel
    tokens: int

    @property
    def local(self) -> int:
        """Image tokens per rank (pad included)."""
        return -(-self.tokens // self.sp.size)

    @property
    def padded(self) -> int:
        return self.local * self.sp.size

    @property
    def start(self) -> int:
        return self.sp.rank * self.local

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad dim 1 (tokens) of ``x`` from ``tokens`` to ``padded`` with zeros."""
        extra = self.padded - x.shape[1]
        return x if extra == 0 else F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra))

    def local_rows(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-token table ``[tokens, ...]`` (RoPE cos / sin), pad rows zero."""
        return self.pad(table[None])[0, self.start:self.start + self.local]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, tokens, C]`` replicated -> this rank's ``[B, local, C]`` (backward: this rank's share)."""
        return _Shard.apply(x, self)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``[B, local, C]`` -> ``[B, tokens, C]`` on every rank (backward: this rank's slice)."""
        return _Gather.apply(x, self)


def _token_chunks(shard: TokenShard):
    """(rank s, first token, token count) of every rank's chunk of the real (unpadded) image tokens."""
    for s in range(shard.sp.size):
        lo = s * shard.local
        yield s, lo, max(0, min(shard.tokens, lo + shard.local) - lo)


class _TokensToHeads(torch.autograd.Function):
    """q, k, v ``[B, local + L, H, D]`` (this rank's image tokens, then the replicated text) -> ``[3, B, tokens + L,
    H/N, D]``: every image token (one all-to-all, pad tokens dropped) and the text, for this rank's heads.
    Backward: the inverse all-to-all for the image tokens; the text gradient for this rank's heads only (its share)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: TokenShard) -> torch.Tensor:
        sp, local, tokens = shard.sp, shard.local, shard.tokens
        b, length, heads, d = q.shape
        h = heads // sp.size
        ctx.shard, ctx.shape = shard, q.shape
        send = q.new_empty((sp.size, 3, b, local, h, d))
        for i, t in enumerate((q, k, v)):
            send[:, i] = rearrange(t[:, :local], "b n (s h) d -> s b n h d", s=sp.size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)
        del send
        joint = q.new_empty((3, b, tokens + length - local, h, d))
        for s, lo, count in _token_chunks(shard):
            joint[:, :, lo:lo + count] = recv[s, :, :, :count]
        del recv
        for i, t in enumerate((q, k, v)):
            joint[i, :, tokens:] = t[:, local:, sp.rank * h:(sp.rank + 1) * h]
        return joint

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard, (b, length, heads, d) = ctx.shard, ctx.shape
        sp, local, tokens = shard.sp, shard.local, shard.tokens
        h = heads // sp.size
        send = grad.new_zeros((sp.size, 3, b, local, h, d))  # pad tokens get zero gradients
        for s, lo, count in _token_chunks(shard):
            send[s, :, :, :count] = grad[:, :, lo:lo + count]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)
        del send
        grads = []
        for i in range(3):
            g = grad.new_zeros((b, length, heads, d))
            g[:, :local] = rearrange(recv[:, i], "s b n h d -> b n (s h) d")
            g[:, local:, sp.rank * h:(sp.rank + 1) * h] = grad[i, :, tokens:]
            grads.append(g)
        return *grads, None


class _HeadsToTokens(torch.autograd.Function):
    """Attention output ``[B, tokens + L, H/N * D]`` (this rank's heads) -> ``[B, local + L, H * D]``: this rank's
    image tokens (the inverse all-to-all) and the text for all heads (an all-gather). Backward: the all-to-all
    back, and for the text a reduce-scatter of the ranks' shares."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, shard: TokenShard) -> torch.Tensor:
        sp, local, tokens = shard.sp, shard.local, shard.tokens
        b, _, c = out.shape
        ctx.shard = shard
        send = out.new_zeros((sp.size, b, local, c))
        for s, lo, count in _token_chunks(shard):
            send[s, :, :count] = out[:, lo:lo + count]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)
        del send
        text = out[:, tokens:].contiguous()
        gathered = out.new_empty((sp.size * b, *text.shape[1:]))
        _all_gather(gathered, text, group=sp.group)
        result = out.new_empty((b, local + text.shape[1], sp.size, c))
        result[:, :local] = rearrange(recv, "s b n c -> b n s c")
        result[:, local:] = rearrange(gathered, "(s b) l c -> b l s c", s=sp.size)
        return rearrange(result, "b n s c -> b n (s c)")  # a view

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard = ctx.shard
        sp, local, tokens = shard.sp, shard.local, shard.tokens
        grad = rearrange(grad, "b n (s c) -> b n s c", s=sp.size)
        b, _, _, c = grad.shape
        send = rearrange(grad[:, :local], "b n s c -> s b n c").contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)
        del send
        text_len = grad.shape[1] - local
        out = grad.new_empty((b, tokens + text_len, c))
        for s, lo, count in _token_chunks(shard):
            out[:, lo:lo + count] = recv[s, :, :count]
        del recv
        text = rearrange(grad[:, local:], "b l s c -> (s b) l c").contiguous()
        text_grad = grad.new_empty((b, text_len, c))
        _reduce_scatter(text_grad, text, group=sp.group)
        out[:, tokens:] = text_grad
        return out, None


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: TokenShard) -> torch.Tensor:
        ctx.shard, ctx.shape = shard, x.shape
        return shard.pad(x)[:, shard.start:shard.start + shard.local].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s = ctx.shard
        full = grad.new_zeros((ctx.shape[0], s.padded, *ctx.shape[2:]))
        full[:, s.start:s.start + s.local] = grad
        return full[:, :s.tokens], None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: TokenShard) -> torch.Tensor:
        ctx.shard = shard
        out = x.new_empty((shard.sp.size * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=shard.sp.group)
        return rearrange(out, "(n b) l c -> b (n l) c", n=shard.sp.size)[:, :shard.tokens]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s = ctx.shard
        return s.pad(grad)[:, s.start:s.start + s.local].contiguous(), None


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (replicated input -> exact input gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        return grad, None


def replicated_input(x, sp: SequenceParallel):
    """Mark a model input that is the same on every rank of the group: its gradient becomes the group's sum."""
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _SumGrad.apply(x, sp)
    return x


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                    shard: TokenShard | None) -> torch.Tensor:
    """Attention over ``[image tokens, text tokens]`` (``[B, N_img + L, heads, D]`` each) -> ``[B, N_img + L,
    heads * D]``. Without ``shard`` plain :func:`attention`; with it the image tokens are this rank's shard
    (``shard.local`` of them) and the sequence attended is the whole one (all ranks' image tokens, then the text)."""
    if shard is None:
        return attention(q, k, v, key_mask)
    joint = _TokensToHeads.apply(q, k, v, shard)  # [3, B, tokens + L, heads / N, D]
    return _HeadsToTokens.apply(attention(*joint.unbind(0), key_mask), shard)


@contextlib.contextmanager
def lead_sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None = None):
    """Spread one process's calls of ``model`` over a sequence-parallel group (the SynVid dumper under torchrun).

    Without a process group it yields ``model``. With one, sequence parallelism over ``group`` (default: all
    ranks) is enabled; the group's first rank gets a stand-in whose every call all ranks of the group run with the
    same inputs (tensors broadcast on the model's device, same grad mode and autocast); the other ranks serve those
    calls until the first rank leaves the ``with`` block, then get ``None``.
    """
    if not dist.is_initialized():
        yield model
        return
    model.enable_sequence_parallel(group)
    sp = SequenceParallel.over(group)
    device = next(model.parameters()).device
    if sp.rank != 0:
        _serve(model, sp, device)
        yield None
        return
    try:
        yield _Leader(model, sp)
    finally:
        _send_call(sp, None, device)


class _Leader(torch.nn.Module):
    """The stand-in of :func:`lead_sequence_parallel`: sends every call to the other ranks, then runs it."""

    def __init__(self, model: torch.nn.Module, sp: SequenceParallel) -> None:
        super().__init__()
        self.model, self.sp = model, sp

    def forward(self, *args, **kwargs):
        _send_call(self.sp, (args, kwargs), next(self.model.parameters()).device)
        return self.model(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)


@dataclass(frozen=True)
class _TensorSlot:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _send_call(sp: SequenceParallel, call: tuple | None, device: torch.device) -> None:
    """Broadcast one call ``(args, kwargs)`` (``None`` = stop) from the group's first rank: tensors by collectives
    on ``device``, other values pickled, with the caller's grad mode and autocast state."""
    src = dist.get_global_rank(sp.group, 0)
    if call is None:
        dist.broadcast_object_list([None], src=src, group=sp.group)
        return
    args, kwargs = call
    values = list(args) + list(kwargs.values())
    plain = [_TensorSlot(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in values]
    amp = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    dist.broadcast_object_list([(len(args), list(kwargs), plain, torch.is_grad_enabled(), amp)], src=src,
                               group=sp.group)
    for v in values:
        if isinstance(v, torch.Tensor):
            dist.broadcast(v.detach().to(device).contiguous(), src=src, group=sp.group)


def _serve(model: torch.nn.Module, sp: SequenceParallel, device: torch.device) -> None:
    """Run the first rank's calls (sent by :func:`_send_call`) until it sends stop."""
    src = dist.get_global_rank(sp.group, 0)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=sp.group)
        if box[0] is None:
            return
        n_args, names, plain, grad, (amp, amp_dtype) = box[0]
        values = []
        for v in plain:
            if isinstance(v, _TensorSlot):
                v = torch.empty(v.shape, dtype=v.dtype, device=device)
                dist.broadcast(v, src=src, group=sp.group)
            values.append(v)
        with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            model(*values[:n_args], **dict(zip(names, values[n_args:])))

"""Tests for the shared foundations: safe checkpoint I/O, atomic writes, the latent convention, kernel refs."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from accvideo_core import kernels
from accvideo_core.kernels import reference
from accvideo_core.latents import VAE_SCALING_FACTOR, latent_shape, to_model_space, to_vae_space
from accvideo_core.utils.io import CheckpointError, read_state_dict, save_safetensors, save_torch


def test_read_state_dict_unwraps_and_refuses_code(tmp_path):
    sd = {"a.weight": torch.randn(3, 4)}
    save_torch({"module": sd}, tmp_path / "m.pt")
    got = read_state_dict(tmp_path / "m.pt")
    assert torch.equal(got["a.weight"], sd["a.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pt")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = save_safetensors({"x": torch.randn(64, 64)}, tmp_path / "x.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(AttributeError):
        save_safetensors({"x": object()}, target)  # fails mid-write
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_latent_convention_and_shape_errors():
    x = torch.randn(2, 16, 3, 4, 4)
    assert torch.allclose(to_vae_space(to_model_space(x)), x)
    assert torch.allclose(to_model_space(x), x * VAE_SCALING_FACTOR)
    assert latent_shape(93, 544, 960) == (1, 16, 24, 68, 120)
    with pytest.raises(ValueError, match="4k\\+1.*try 89 or 93"):
        latent_shape(92, 544, 960)
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_shape(93, 540, 960)


def test_kernel_references_match_definitions():
    b, l, h, d = 2, 7, 3, 8
    x = torch.randn(b, l, h, d)
    w = torch.rand(d) + 0.5
    angles = torch.randn(5, d // 2)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    out = kernels.rms_norm_rope(x, w, cos, sin)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    # complex-number form of the same rotation on the first 5 tokens
    z = torch.view_as_complex(normed[:, :5].reshape(b, 5, h, d // 2, 2).contiguous())
    rot = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    assert torch.allclose(out[:, :5], rot, atol=1e-5)
    assert torch.allclose(out[:, 5:], normed[:, 5:], atol=1e-6)

    xs, shift, scale, gate = torch.randn(2, 5, 6), torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    ref = F.layer_norm(xs, (6,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(kernels.layer_norm_modulate(xs, shift, scale), ref, atol=1e-6)
    y = torch.randn(2, 5, 6)
    assert torch.allclose(kernels.gated_residual(xs, y, gate), xs + y * gate[:, None])

    v = torch.randn(2, 8, 3, 4, 5)
    gw, gb = torch.randn(8), torch.randn(8)
    plain = kernels.group_norm_silu(v, gw, gb, 4)
    assert torch.allclose(plain, F.silu(F.group_norm(v, 4, gw, gb, 1e-6)), atol=1e-6)
    # statistics accumulated over two temporal halves reproduce whole-volume statistics
    s1, q1, n1 = reference.group_norm_stats(v[:, :, :1], 4)
    s2, q2, n2 = reference.group_norm_stats(v[:, :, 1:], 4)
    mean, rstd = reference.stats_to_mean_rstd(s1 + s2, q1 + q2, n1 + n2, 1e-6)
    tiled = torch.cat([kernels.group_norm_silu(v[:, :, sl], gw, gb, 4, mean=mean, rstd=rstd)
                       for sl in (slice(0, 1), slice(1, 3))], dim=2)
    assert torch.allclose(tiled, plain, atol=1e-5)


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

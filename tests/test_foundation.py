"""Tests for the shared foundations: safe checkpoint I/O, atomic writes, the latent convention, kernel refs."""
from __future__ import annotations

import io
import pickle
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accvideo_core import kernels
from accvideo_core.kernels import reference
from accvideo_core.latents import VAE_SCALING_FACTOR, latent_shape, to_model_space, to_vae_space
from accvideo_core.utils import dtypes
from accvideo_core.utils.io import (
    CheckpointError, LazyCheckpoint, load_torch, read_metadata, read_state_dict, save_safetensors, save_torch,
)

PACKAGE = Path(__file__).resolve().parents[1] / "accvideo_core"


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


def _direct_checkpoint_reads(source: str) -> list[str]:
    """Code (not comments or strings) that reads a checkpoint without utils/io: safe_open / load_file / torch.load."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.NAME, tokenize.OP)]
    found = []
    for i, t in enumerate(toks):
        if t.type == tokenize.NAME and t.string in ("safe_open", "load_file"):
            found.append(f"line {t.start[0]}: {t.string}")
        if t.string == "load" and i >= 2 and toks[i - 1].string == "." and toks[i - 2].string == "torch":
            found.append(f"line {t.start[0]}: torch.load")
    return found


def test_checkpoints_are_read_only_through_utils_io():
    # the scanner itself: it finds each form in code and ignores prose
    assert len(_direct_checkpoint_reads("from safetensors import safe_open\nx = torch.load(p)\n"
                                        "from safetensors.torch import load_file\n")) == 3
    assert _direct_checkpoint_reads("# torch.load(p) in a comment\ns = 'safe_open(p)'\n") == []
    io_module = PACKAGE / "utils" / "io.py"
    assert _direct_checkpoint_reads(io_module.read_text())  # the one place that does it
    offenders = {str(f.relative_to(PACKAGE)): hits for f in sorted(PACKAGE.rglob("*.py")) if f != io_module
                 if (hits := _direct_checkpoint_reads(f.read_text()))}
    assert offenders == {}, f"read checkpoints through accvideo_core.utils.io, not directly: {offenders}"


def test_lazy_checkpoint_reads_tensors_rows_shapes_and_metadata(tmp_path):
    sd = {"a": torch.randn(5, 3).to(torch.bfloat16), "b": torch.arange(4)}
    st = save_safetensors(sd, tmp_path / "x.safetensors", metadata={"k": "v"})
    save_torch({"state_dict": sd}, tmp_path / "x.pt")
    legacy = tmp_path / "legacy.pt"  # pre-zip pickle format: cannot be memory-mapped, read anyway
    torch.save({"model": sd}, legacy, _use_new_zipfile_serialization=False)
    for path, meta in ((st, {"k": "v"}), (tmp_path / "x.pt", {}), (legacy, {})):
        assert read_metadata(path) == meta
        with LazyCheckpoint(path) as ckpt:
            assert ckpt.keys() == ["a", "b"] and ckpt.metadata == meta and "a" in ckpt
            assert ckpt.shape_dtype("a") == ((5, 3), torch.bfloat16)
            assert torch.equal(ckpt.get("a"), sd["a"]) and torch.equal(ckpt.get("b"), sd["b"])
            assert torch.equal(ckpt.get_rows("a", [4, 1]), sd["a"][[4, 1]])
            with pytest.raises(KeyError, match="no tensor 'c'"):
                ckpt.get("c")


def test_lazy_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        LazyCheckpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    for read in (LazyCheckpoint, read_metadata):
        with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors file"):
            read(bad)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    for read in (LazyCheckpoint, load_torch):
        with pytest.raises(CheckpointError, match="evil.pt could not be read as a weights-only"):
            read(tmp_path / "evil.pt")


def test_dtype_names_have_one_table():
    assert dtypes.parse_dtype("bf16") is dtypes.parse_dtype("bfloat16") is dtypes.parse_dtype(torch.bfloat16) \
        is torch.bfloat16
    assert dtypes.parse_dtype("FP32") is dtypes.parse_dtype("torch.float32") is torch.float32
    assert dtypes.dtype_name(dtypes.parse_dtype("fp16")) == "float16"
    for name in dtypes.names_for(*dtypes.CANONICAL):
        assert dtypes.dtype_name(dtypes.parse_dtype(name)) in dtypes.CANONICAL
    if dtypes.FP8_DTYPES:
        assert dtypes.parse_dtype("fp8") is torch.float8_e4m3fn
        assert dtypes.SAFETENSORS_TAGS[torch.float8_e4m3fn] == "F8_E4M3"
    with pytest.raises(ValueError, match=r"'fp8'.*expected one of \['fp32', 'fp16', 'bf16'"):
        dtypes.parse_dtype("fp8", allowed=("float32", "float16", "bfloat16"))
    with pytest.raises(ValueError, match="unknown or unsupported dtype 'int4'"):
        dtypes.parse_dtype("int4")

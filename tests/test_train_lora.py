"""The trainer's LoRA mode: adapters (PEFT as the oracle), the on/off switch under gradient checkpointing, exports
that our loader and native ComfyUI read, lora_init, and the bad inputs refused before training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accvideo_core.lora import LoraStack, extract, load_lora
from accvideo_core.lora.adapters import add_adapters, merge_adapters
from accvideo_core.testing import dequantized_state, tiny_transformer
from accvideo_core.train import lora_mode
from accvideo_core.train.config import LORA_TARGETS, ConfigError, config_from_dict
from accvideo_core.train.loop import Trainer
from accvideo_core.utils.io import read_state_dict, save_safetensors
from tests.integration.comfy_probe import run_probe

from test_train import (_assert_close_states, _rows, _states, comfy_compatible_teacher_and_data, make_cfg,  # noqa: F401
                        max_abs_diff, run_torchrun, synvid)  # (synvid: the shared fixture)

TARGETS = list(LORA_TARGETS)
LORA_LR = 3e-3  # the adapters' learning rate on the tiny model (full fine-tune: 3e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(model, b: int = 2, seed: int = 3) -> tuple:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c.in_channels, 2, 4, 6, generator=g)
    text = torch.randn(b, 5, c.text_dim, generator=g)
    mask = torch.ones(b, 5)
    mask[0, 3:] = 0
    return x, torch.tensor([900.0, 400.0][:b]), text, mask, torch.randn(b, c.pooled_dim, generator=g), 6.0


def _randomize_up(adapters, seed: int = 7, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapters.names:
            up = adapters.model.get_submodule(name).lora_up
            up.copy_(torch.randn(up.shape, generator=g) * std)


def _adapted(rank: int = 4, alpha: float | None = 8.0, seed: int = 0, **kw):
    model = tiny_transformer(seed=seed, **kw)
    adapters = add_adapters(model, rank=rank, alpha=alpha, targets=TARGETS)
    _randomize_up(adapters)
    return model, adapters


def test_adapters_equal_peft_and_start_as_the_base():
    peft = pytest.importorskip("peft")
    base = tiny_transformer(seed=0)
    model, adapters = _adapted()
    # every linear layer of the blocks (modulation included) and of the modulation vector's embedders
    linears = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    prefixes = ("double_blocks.", "single_blocks.", "time_in.", "vector_in.", "guidance_in.")
    assert set(adapters.names) == {n for n in linears if n.startswith(prefixes)}
    assert any(n.endswith("img_mod.linear") for n in adapters.names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert sum(p.numel() for p in adapters.parameters()) == sum(
        4 * sum(base.get_submodule(n).weight.shape) for n in adapters.names)
    # oracle: PEFT's LoRA layers on a copy of the base, same factors (PEFT picks the layers from its regex)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             exclude_modules=r"(?!(double_blocks|single_blocks|time_in|vector_in|guidance_in)\.).*")
    oracle = peft.inject_adapter_in_model(config, tiny_transformer(seed=0))
    wrapped = {n.removesuffix(".base_layer") for n, _ in oracle.named_modules() if n.endswith(".base_layer")}
    assert wrapped == set(adapters.names)
    with torch.no_grad():
        for name in adapters.names:
            ours = model.get_submodule(name)
            theirs = oracle.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(ours.lora_down)
            theirs.lora_B["default"].weight.copy_(ours.lora_up)
        x = _inputs(model)
        got, want = model(*x), oracle(*x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with adapters.disabled():
            torch.testing.assert_close(model(*x), base(*x), rtol=0, atol=0)
        assert (got - base(*x)).abs().max() > 1e-3  # the adapters do change the output
    fresh = add_adapters(tiny_transformer(seed=0), rank=4, targets=TARGETS)  # lora_up = 0: starts as the base
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(*x), base(*x), rtol=0, atol=0)


def _mixed_graph_grads(model, adapters, checkpointing: bool, offload: bool = False) -> list[torch.Tensor]:
    """The adversarial pattern: adapters-on student step, then adapters-off features of its output, one backward."""
    model.enable_gradient_checkpointing(checkpointing, offload=offload)
    for p in adapters.parameters():
        p.grad = None
    x, t, text, mask, pooled, g = _inputs(model)
    fake = x + 0.3 * model(x, t, text, mask, pooled, g)
    with adapters.disabled():
        feats = model.image_features(fake, t * 0.5, text, mask, pooled, g, layer=3)
    (feats.square().mean() + fake.square().mean()).backward()
    return [p.grad.clone() for p in adapters.parameters()]


def test_checkpoint_recompute_sees_the_switch_of_its_forward():
    model, adapters = _adapted()
    plain = _mixed_graph_grads(model, adapters, checkpointing=False)
    ckpt = _mixed_graph_grads(model, adapters, checkpointing=True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    # without the checkpoint context the recompute runs the teacher blocks with the adapters on (torch notices
    # the different number of saved tensors)
    from torch.utils.checkpoint import CheckpointError, noop_context_fn

    model.checkpoint_context_fn = noop_context_fn
    with pytest.raises(CheckpointError, match="recomputed"):
        _mixed_graph_grads(model, adapters, checkpointing=True)


def test_offloaded_checkpoints_give_the_same_gradients(monkeypatch):
    """``offload``: every checkpointed block saves host copies of its hidden-state inputs (img and txt of a double
    block, the joint stream of a single block, the final layer's input; not the shared rotary tables) for its
    recompute, and the gradients stay bit-identical."""
    from accvideo_core.models import transformer_hunyuan_video as thv

    model, adapters = _adapted()
    ckpt = _mixed_graph_grads(model, adapters, checkpointing=True)
    copies: list[torch.Tensor] = []
    to_host = thv._to_host
    monkeypatch.setattr(thv, "_to_host", lambda t: copies.append(to_host(t)) or copies[-1])
    offloaded = _mixed_graph_grads(model, adapters, checkpointing=True, offload=True)
    assert all(torch.equal(a, b) for a, b in zip(ckpt, offloaded))
    c = model.config   # the student's forward (every block + final layer), then the features up to layer 3
    assert len(copies) == (2 * c.num_double_blocks + c.num_single_blocks + 1) + 2 * 2 + 1
    # saved values, not graph nodes: the gradients never travel through host memory
    assert all(t.device.type == "cpu" and not t.requires_grad for t in copies)
    with pytest.raises(ConfigError, match="offload_checkpoints needs model.gradient_checkpointing"):
        config_from_dict({"model": {"offload_checkpoints": True, "gradient_checkpointing": False}})


def test_rank_and_target_errors_are_clear():
    with pytest.raises(ValueError, match=r"rank 40 exceeds the smaller dimension of 32 .* "
                                         r"vector_in.in_layer 32x24: use a rank <= 24"):
        add_adapters(tiny_transformer(seed=0), rank=40, targets=TARGETS)
    with pytest.raises(ValueError, match="'double_blocks.*.img_attn_qkvv' matches no linear layer"):
        add_adapters(tiny_transformer(seed=0), rank=2, targets=["double_blocks.*.img_attn_qkvv"])
    with pytest.raises(ConfigError, match="lora_init needs model.lora_rank > 0"):
        config_from_dict({"model": {"lora_init": "x.safetensors"}})
    with pytest.raises(ConfigError, match="lora_targets must be a list of strings"):
        config_from_dict({"model": {"lora_rank": 4, "lora_targets": "double_blocks.*"}})


def _save(model, adapters, path: Path, dtype=torch.float32) -> Path:
    cfg = config_from_dict({"model": {"lora_rank": adapters.rank, "lora_alpha": adapters.alpha}})
    state = model.state_dict()
    return lora_mode.save_lora(state, path, adapters, dtype=dtype, base_fingerprint=lora_mode.fingerprint(state),
                               cfg=cfg, step=3)


def test_exported_lora_on_the_base_equals_the_merged_student(tmp_path):
    model, adapters = _adapted(rank=3, alpha=6.0)
    path = _save(model, adapters, tmp_path / "student_lora.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    info = json.loads(meta["accvideo_lora"])
    assert (info["rank"], info["alpha"], info["targets"], info["step"]) == (3, 6.0, TARGETS, 3)
    assert info["base_fingerprint"] == lora_mode.fingerprint(tiny_transformer(seed=0).state_dict())
    assert info["base_fingerprint"] != lora_mode.fingerprint(tiny_transformer(seed=1).state_dict())
    assert info["train_config"]["model"]["lora_rank"] == 3 and meta["ss_network_dim"] == "3"
    # every key is one native ComfyUI maps onto a model parameter (names it accepts for that module)
    from accvideo_core.lora import comfy_names

    for key in keys:
        module = key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0].removesuffix(".alpha")
        assert key.startswith("diffusion_model.") and module in comfy_names.native_lora_names(module), key
    assert len(keys) == 3 * len(adapters.names)
    # our loader: base + LoRA at strength 1 predicts what the merged student predicts
    merged = tiny_transformer(seed=0)
    merged.load_state_dict(merge_adapters(model.state_dict(), adapters.scale))
    base = tiny_transformer(seed=0)
    LoraStack(base).add(path, 1.0)
    x = _inputs(base)
    with torch.no_grad():
        want, got = merged(*x), base(*x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(*x), want, rtol=1e-4, atol=1e-5)  # and the adapted model itself


def test_lora_init_exact_continuation_svd_and_wrong_models(tmp_path):
    model, adapters = _adapted(rank=4, alpha=8.0)
    path = _save(model, adapters, tmp_path / "a.safetensors")
    cfg = config_from_dict({"model": {"lora_rank": 4, "lora_alpha": 8.0, "lora_init": str(path)}})
    notes: list[str] = []
    # continue a run: the same rank and alpha reproduce the factors bit for bit
    again = lora_mode.build(tiny_transformer(seed=0), cfg)
    lora_mode.init_from_file(again, cfg, notes.append)
    for a, b in zip(adapters.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert notes == []
    # a larger rank: the file's factors fill the first directions, the product is unchanged
    cfg8 = config_from_dict({"model": {"lora_rank": 8, "lora_init": str(path)}})
    wide = lora_mode.build(tiny_transformer(seed=0), cfg8)
    lora_mode.init_from_file(wide, cfg8, notes.append)
    name = adapters.names[0]
    want = adapters.model.get_submodule(name)
    got = wide.model.get_submodule(name)
    torch.testing.assert_close(got.lora_up @ got.lora_down * wide.scale, want.lora_up @ want.lora_down * 2.0)
    assert got.lora_down[4:].abs().sum() > 0 and got.lora_up[:, 4:].abs().sum() == 0  # free directions train
    # an extracted LoRA (rank 8, with bias / norm diffs and untargeted modules): best rank-4 fit, losses reported
    base_sd = tiny_transformer(seed=0).state_dict()
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base_sd.items()}
    extract(base_sd, tuned, 8, out=tmp_path / "x.safetensors", dtype=torch.float32)
    cfgx = config_from_dict({"model": {"lora_rank": 4, "lora_init": str(tmp_path / "x.safetensors")}})
    fit = lora_mode.build(tiny_transformer(seed=0), cfgx)
    lora_mode.init_from_file(fit, cfgx, notes.append)
    assert len(notes) == 1 and "untargeted module(s)" in notes[0] and "bias module(s)" in notes[0]
    mod = fit.model.get_submodule("single_blocks.0.linear2")
    extracted = load_lora(tmp_path / "x.safetensors").modules["single_blocks.0.linear2"]
    u, s, vh = torch.linalg.svd(extracted.weight_delta(mod.weight.shape))
    torch.testing.assert_close(mod.lora_up @ mod.lora_down * fit.scale, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5,
                               rtol=1e-4)
    # another model's LoRA (hidden 64): shapes do not fit -> ConfigError naming the field and the fix
    other = tiny_transformer(seed=0, hidden_size=64, num_heads=4)
    other_ad = add_adapters(other, rank=2, targets=TARGETS)
    _save(other, other_ad, tmp_path / "other.safetensors")
    cfgo = config_from_dict({"model": {"lora_rank": 2, "lora_init": str(tmp_path / "other.safetensors")}})
    with pytest.raises(ConfigError, match=r"model.lora_init = .* does not fit this base: .*different model"):
        lora_mode.init_from_file(lora_mode.build(tiny_transformer(seed=0), cfgo), cfgo, notes.append)
    # a LoRA for another architecture (Wan-style keys)
    save_safetensors({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 8),
                      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 2)},
                     tmp_path / "wan.safetensors")
    cfgw = config_from_dict({"model": {"lora_rank": 2, "lora_init": str(tmp_path / "wan.safetensors")}})
    with pytest.raises(ConfigError, match="no key of this LoRA belongs to a HunyuanVideo transformer"):
        lora_mode.init_from_file(lora_mode.build(tiny_transformer(seed=0), cfgw), cfgw, notes.append)


def _fp8_rounded_copy(src: Path, dst: Path, *, scaled: bool = False) -> tuple[Path, Path]:
    """(an fp8 teacher file, the fp32 file of exactly its values): the block linears rounded to float8_e4m3fn;
    ``scaled``: ComfyUI's "fp8_scaled" form (weight / s in fp8 and ``scale_weight`` s per layer)."""
    from accvideo_core.models.loading import dequantized, load_transformer, save_transformer

    sd = read_state_dict(src)
    fp8, plain = dict(sd), dict(sd)
    for key, value in sd.items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().amax().reshape(1) / 200 if scaled else None
            q = (value / scale if scaled else value).to(torch.float8_e4m3fn)
            fp8[key] = q
            if scaled:
                fp8[key.removesuffix("weight") + "scale_weight"] = scale
            plain[key] = dequantized(q, scale, torch.float32)
    save_safetensors(fp8, dst / "fp8.safetensors")
    save_transformer(load_transformer(plain), dst / "fp32_of_fp8.safetensors")
    return dst / "fp8.safetensors", dst / "fp32_of_fp8.safetensors"


def _fp8_base_values(src: Path, dst: Path) -> Path:
    """The fp32 file of exactly the values ``model.fp8_base`` trains on (block linears quantized with a per-layer
    scale by ``apply_fp8_layout``, then de-scaled)."""
    from accvideo_core.models.loading import (apply_fp8_layout, block_linears_layout, fp8_layout, load_transformer,
                                              save_transformer)

    model = load_transformer(src, dtype=torch.float32)
    apply_fp8_layout(model, block_linears_layout(model))
    assert fp8_layout(model) and all(shape == [] for _, shape in fp8_layout(model).values())   # scaled, per layer
    save_transformer(load_transformer(dequantized_state(model.state_dict())), dst / "fp32_of_fp8_base.safetensors")
    return dst / "fp32_of_fp8_base.safetensors"


@pytest.mark.parametrize("source", ["fp8_base", "fp8_file", "fp8_scaled_file"])
def test_an_fp8_base_trains_exactly_like_the_fp32_copy_of_its_values(synvid, tmp_path, source):
    """LoRA mode on a frozen fp8 base (``model.fp8_base`` on a bf16/fp32 teacher, or an fp8 / ComfyUI fp8_scaled
    teacher file) computes with the up-cast weights: the same run on an fp32 file holding exactly those values
    gives the same adapters, metrics and exports, while the base's block linears stay 1 byte per weight."""
    fp8_file, oracle = _fp8_rounded_copy(synvid / "teacher.safetensors", tmp_path, scaled=source == "fp8_scaled_file")
    if source == "fp8_base":
        oracle = _fp8_base_values(synvid / "teacher.safetensors", tmp_path)
    kw = dict(optim={"steps": 2, "lr": LORA_LR, "segment_updates": "joint"}, log={"plot": False})
    model = {"lora_rank": 4, "gradient_checkpointing": True,   # fp8_base: the 24 GB setting, with offloading
             **({"fp8_base": True, "offload_checkpoints": True} if source == "fp8_base" else {"teacher": str(fp8_file)})}
    if source != "fp8_base":
        assert read_state_dict(fp8_file)["double_blocks.0.img_mlp.fc1.weight"].dtype == torch.float8_e4m3fn
    trainer = Trainer(make_cfg(synvid, tmp_path / "fp8", model=model, **kw))
    linears = {n: m.weight.dtype for n, m in trainer.student.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks.", "single_blocks."))}
    assert linears and set(linears.values()) == {torch.float8_e4m3fn}
    assert all(p.dtype == torch.float32 for p in trainer.adapters.parameters())
    got = trainer.run()
    want = Trainer(make_cfg(synvid, tmp_path / "fp32", model={"lora_rank": 4, "teacher": str(oracle),
                                                               "gradient_checkpointing": True}, **kw)).run()
    assert got["val"] == want["val"]
    for name in ("student_lora.safetensors", "student.safetensors"):
        a, b = read_state_dict(tmp_path / "fp8" / name), read_state_dict(tmp_path / "fp32" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name   # merged: de-scaled, not fp8
    assert _rows(tmp_path / "fp8") == _rows(tmp_path / "fp32")   # every metric of every iteration


def test_fp8_teachers_need_the_lora_mode(synvid, tmp_path):
    from accvideo_core.models.loading import load_transformer
    from accvideo_core.train.setup import _check_not_fp8

    with pytest.raises(ConfigError, match="model.fp8_base needs model.lora_rank > 0"):
        make_cfg(synvid, tmp_path / "x", model={"fp8_base": True})
    model = load_transformer(tiny_transformer(seed=0).state_dict(), storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match="full fine-tune cannot train.*Train a LoRA instead"):
        _check_not_fp8(model)


def test_memory_estimate_of_the_13b_lora_run(capsys):
    from accvideo_core.models.transformer_hunyuan_video import TransformerConfig
    from accvideo_core.train.estimate import estimate, main

    full = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=8)
    one = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=1, lora_rank=64)
    # adapters: 64 x (in + out) for every linear layer of the 60 blocks (20 double x 10 + 40 single x 3) and of
    # the embedders time_in (256 -> h -> h), guidance_in (same) and vector_in (768 -> h -> h)
    h, m = 3072, 4 * 3072
    double = 2 * ((h + 6 * h) + (h + 3 * h) + (h + h) + (h + m) + (m + h))
    single = (h + 3 * h + m) + (h + m + h) + (h + 3 * h)
    embedders = 2 * (256 + h + 2 * h) + (768 + h + 2 * h)
    adapters = 64 * (20 * double + 40 * single + embedders)
    assert one.static["adapters r64 fp32 weights+grads+AdamW"] == pytest.approx(16 * adapters / 1e9)
    assert one.static["base bf16 (frozen, teacher = student)"] == pytest.approx(2 * one.params / 1e9)
    assert one.activations == full.activations  # the same forward/backward graphs per GPU
    assert 70 < one.peak < 80  # docs/training.md: 73 GB on one GPU at 544p
    assert main(["--lora-rank", "64"]) == 0
    out = capsys.readouterr().out
    assert "1280x720x129        1" in out and "no" in out.split("1280x720x129        1")[1].splitlines()[0]
    # model.fp8_base: the block linears' weights at 1 byte (double: qkv, proj, fc1, fc2, mod per stream; single:
    # linear1, linear2, modulation), every other parameter at 2; offload: the two forward graphs' 60 checkpointed
    # block inputs go to host memory, 2 hidden tensors per graph stay on the GPU
    small = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=1, lora_rank=16, fp8_base=True,
                     offload=True)
    linears = 20 * 2 * (3 * h * h + h * h + 2 * h * m + 6 * h * h) + 40 * (h * (3 * h + m) + (h + m) * h + 3 * h * h)
    assert small.static["base fp8 block linears + bf16 rest (frozen)"] == pytest.approx(
        (linears + 2 * (one.params - linears)) / 1e9)
    tokens_gb = one.tokens * h * 2 / 1e9   # one bf16 [tokens, hidden] tensor
    assert small.host_gb == pytest.approx(2 * 60 * tokens_gb)
    assert one.activations["adversarial phase"] - small.activations["adversarial phase"] == pytest.approx(
        2 * (60 - 2) * tokens_gb)
    assert 20 < small.peak < 24   # docs/training.md: 544p on one 24 GB card at rank 16, nominally
    with pytest.raises(SystemExit):
        main(["--fp8-base"])   # a LoRA-mode option without --lora-rank
    capsys.readouterr()
    assert main(["--lora-rank", "64", "--json"]) == 0  # days: the full mode's count (an upper bound)
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[1]["gpus"] == 8 and rows[1]["days_5_segments"] == pytest.approx(full.days(gpus=8))
    assert rows[0]["days_1_segment"] == pytest.approx(full.days(gpus=1, segments=1))


def test_lora_distillation_beats_teacher_few_steps_and_exports(synvid, tmp_path):
    cfg = make_cfg(synvid, tmp_path / "run", model={"lora_rank": 8}, optim={"steps": 6, "lr": LORA_LR},
                   log={"val_every": 3})
    result = Trainer(cfg).run()
    val = result["val"]
    assert val["student_mse"] <= 0.5 * val["teacher_mse"], val
    out = tmp_path / "run"
    assert result["student_lora"] == str(out / "student_lora.safetensors")
    teacher_sd = read_state_dict(synvid / "teacher.safetensors")
    merged = read_state_dict(out / "student.safetensors")
    assert set(merged) == set(teacher_sd)
    changed = {k for k in teacher_sd if not torch.equal(merged[k], teacher_sd[k])}
    lora = load_lora(out / "student_lora.safetensors")
    assert changed == {f"{m}.weight" for m in lora.modules}  # only the adapted weights moved
    assert len(lora.modules) == 32 and all(p.rank == 8 for p in lora.modules.values())
    # our loader: the base + the LoRA at strength 1 predicts the merged student's velocity
    from accvideo_core.models.loading import load_transformer

    base = load_transformer(synvid / "teacher.safetensors")
    LoraStack(base).add(out / "student_lora.safetensors", 1.0)
    student = load_transformer(out / "student.safetensors")
    x = _inputs(base)
    with torch.no_grad():
        got, want = base(*x), student(*x)
    assert float((got - want).norm() / want.norm()) <= 1e-4


@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_lora_resume_after_kill_is_bit_exact(synvid, tmp_path, fmt):
    kw = dict(model={"lora_rank": 4}, optim={"steps": 4, "lr": LORA_LR, "segment_updates": "joint",
                                             "segments_per_iteration": 2},
              log={"ckpt_every": 2, "plot": False}, runtime={"checkpoint_format": fmt})
    Trainer(make_cfg(synvid, tmp_path / "a", **kw)).run()
    cfg_b = make_cfg(synvid, tmp_path / "b", **kw)
    assert Trainer(cfg_b).run(stop_after=3)["stopped"]  # killed after step 3, checkpoint of step 2
    resumed = Trainer(cfg_b, resume="auto")
    assert resumed.step == 2 and resumed.queues.size(1) == 2
    resumed.run()
    a, b = _states(tmp_path / "a"), _states(tmp_path / "b")
    assert set(a) == set(b) and sum(k.endswith("lora_up") for k in a) == 32
    assert all(k.endswith(("lora_up", "lora_down")) for k in a if k.startswith("student."))  # no copy of the base
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for name in ("student.safetensors", "student_lora.safetensors"):
        sa, sb = read_state_dict(tmp_path / "a" / name), read_state_dict(tmp_path / "b" / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # a LoRA checkpoint is not resumed as a full fine-tune, nor with another rank
    with pytest.raises(ConfigError, match="written with model.lora_rank = 4 .* not 0"):
        Trainer(make_cfg(synvid, tmp_path / "b", log={"plot": False}), resume="auto")
    with pytest.raises(ConfigError, match="resume it with the run's own model.lora_rank, not 2"):
        Trainer(make_cfg(synvid, tmp_path / "b", model={"lora_rank": 2}), resume="auto")
    with pytest.raises(ConfigError, match="trained on another base .* model.fp8_base setting"):   # fp8-rounded
        Trainer(make_cfg(synvid, tmp_path / "b", model={"lora_rank": 4, "fp8_base": True}), resume="auto")


def test_torchrun_lora_with_sequence_parallel_lora_init_and_resume(synvid, tmp_path):
    """LoRA mode under torchrun + FSDP2 (2 ranks, all in ONE launch), every run started from model.lora_init:
    sp 2 ends like one process (adapters, optimizer, heads, exports; <= 1e-4); an sp-2 run killed after step 3
    and resumed on its ranks ends bit-identical to the uninterrupted one; the one-process checkpoint of step 2
    resumed on 2 data-parallel ranks, and the sp-2 one in one process, end like the uninterrupted process."""
    model, adapters = _adapted(rank=2, alpha=2.0)  # the first 2 of the 4 directions start from the file
    init = _save(model, adapters, tmp_path / "init.safetensors")
    common = dict(model={"lora_rank": 4, "lora_init": str(init), "gradient_checkpointing": True},
                  optim={"steps": 4, "total_batch": 2, "lr": LORA_LR, "segments_per_iteration": 2},
                  data={"val_samples": 2}, log={"plot": False, "ckpt_every": 2, "val_every": 2, "keep_checkpoints": 0})
    sp2 = {"runtime": {"sequence_parallel": 2}}

    def cfg(name: str, **extra):
        return make_cfg(synvid, tmp_path / name, **common, **extra)

    r1 = Trainer(cfg("one")).run()
    half = tmp_path / "one/checkpoints/step_0000002"
    run_torchrun([(cfg("sp2", **sp2), None, None), (cfg("killed", **sp2), None, 3),
                  (cfg("killed", **sp2), "auto", None), (cfg("to_dp2"), str(half), None)], tmp_path / "jobs.json")
    one, sp = _states(tmp_path / "one"), _states(tmp_path / "sp2")
    _assert_close_states(sp, one)
    assert max(float(v.abs().max()) for k, v in one.items() if k.endswith("lora_up")) > 0.03  # init + training
    for name in ("student.safetensors", "student_lora.safetensors"):
        assert max_abs_diff(read_state_dict(tmp_path / "sp2" / name), read_state_dict(tmp_path / "one" / name)) <= 1e-4
    val = [json.loads(x) for x in (tmp_path / "sp2/metrics.jsonl").read_text().splitlines()]
    assert val[-1]["student_mse"] == pytest.approx(r1["val"]["student_mse"], rel=1e-4)
    assert val[-1]["teacher_mse"] == pytest.approx(r1["val"]["teacher_mse"], rel=1e-6)
    killed = _states(tmp_path / "killed")  # killed after step 3, resumed from step 2 on the same 2 ranks
    assert set(killed) == set(sp) and all(torch.equal(killed[k], sp[k]) for k in sp), [
        k for k in sp if not torch.equal(killed[k], sp[k])][:5]
    _assert_close_states(_states(tmp_path / "to_dp2"), one)  # 1 process -> 2 ranks (dp 2)
    Trainer(cfg("to_one"), resume=str(tmp_path / "sp2/checkpoints/step_0000002")).run()  # sp 2 -> 1 process
    _assert_close_states(_states(tmp_path / "to_one"), one)


def test_bad_lora_settings_fail_before_training(synvid, tmp_path, capsys):
    from accvideo_core.models.loading import load_transformer, save_transformer
    from accvideo_core.train.__main__ import main

    fp8 = load_transformer(synvid / "teacher.safetensors", storage_dtype=torch.float8_e4m3fn)
    save_transformer(fp8, tmp_path / "fp8.safetensors")
    cases = {
        "fp8": ({"model": {"teacher": str(tmp_path / "fp8.safetensors")}}, "Train a LoRA instead"),
        "rank": ({"model": {"lora_rank": 40}}, "rank 40 exceeds the smaller dimension"),
        "target": ({"model": {"lora_rank": 4, "lora_targets": ["blocks.*"]}}, "'blocks.*' matches no linear layer"),
        "init": ({"model": {"lora_rank": 4, "lora_init": str(tmp_path / "missing.safetensors")}}, "not found"),
        "ema": ({"model": {"lora_rank": 4}, "optim": {"ema_decay": 0.9}}, "optim.ema_decay > 0 is not supported"),
    }
    for name, (sections, message) in cases.items():
        cfg = make_cfg(synvid, tmp_path / name, **sections)
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg.to_dict()))
        assert main(["--config", str(tmp_path / f"{name}.json")]) == 2, name
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / name).exists(), name  # nothing written: refused before training


def test_print_config_shows_the_lora_fields(capsys):
    from accvideo_core.train.__main__ import main

    import tomllib

    assert main(["--print-config", "--set", "model.lora_rank=16", "--set", "optim.betas=[0.8, 0.9]"]) == 0
    text = capsys.readouterr().out
    cfg = config_from_dict(tomllib.loads(text))  # the printed config loads again, to the same values
    assert cfg == config_from_dict({"model": {"lora_rank": 16}, "optim": {"betas": [0.8, 0.9]}})
    assert cfg.model.lora_targets == list(LORA_TARGETS) and cfg.model.lora_alpha == 0.0
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if "=" in line}
    assert "# 0 = full fine-tune; r > 0 = rank-r adapters" in lines["lora_rank"]
    assert "alpha equal to the rank" in lines["lora_alpha"] and "(fnmatch)" in lines["lora_targets"]
    assert "LoRA file" in lines["lora_init"] and "the adapters' learning rate" in lines["lr"]
    assert "# feature_layers = (unset)" in text


_COMFY_LORA_PROBE = r'''
base_path, lora_path, inputs_path, out_path = ARGS
model = comfy.sd.load_diffusion_model(base_path, model_options={"dtype": torch.float32})
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)   # what LoraLoaderModelOnly calls
patched.patch_model(device_to=torch.device("cpu"))
velocity(patched, inputs_path, out_path)
not_loaded = [m for m in messages if "not loaded" in m.lower()]
print("PROBE", len(patched.patches), "NOT_LOADED", not_loaded)
'''


@pytest.mark.integration
def test_student_lora_in_native_comfyui_equals_the_merged_student(tmp_path, comfyui_path):
    """Native ComfyUI (LoraLoaderModelOnly's code path) loads the trained student_lora.safetensors on the base with
    no "lora key not loaded" line, and at strength 1 predicts the merged student's velocity (<= 1e-4 relative)."""
    comfy = str(comfyui_path)
    from safetensors.torch import load_file, save_file

    from accvideo_core.models.loading import load_transformer, save_transformer

    teacher, emb, g = comfy_compatible_teacher_and_data(tmp_path / "data")
    save_transformer(teacher, tmp_path / "base.safetensors")
    cfg = config_from_dict({
        "model": {"teacher": str(tmp_path / "base.safetensors"), "lora_rank": 4},
        "data": {"root": str(tmp_path / "data"), "val_samples": 1},
        "optim": {"steps": 2, "total_batch": 2, "lr": 1e-2}, "loss": {"head_width": 32, "head_groups": 8},
        "log": {"out_dir": str(tmp_path / "run"), "plot": False, "save_dtype": "fp32"}})
    Trainer(cfg).run()
    x = {"latents": torch.randn(1, 16, 1, 2, 2, generator=g), "timestep": torch.tensor([636.3636]),
         "text_states": emb["text_states"][:1], "pooled": emb["pooled"][:1], "guidance": torch.tensor([6.0])}
    save_file(x, str(tmp_path / "inputs.safetensors"))
    run = run_probe(_COMFY_LORA_PROBE, comfy, tmp_path / "base.safetensors", tmp_path / "run/student_lora.safetensors",
                    tmp_path / "inputs.safetensors", tmp_path / "out.safetensors", folder=tmp_path)
    modules = len(load_lora(tmp_path / "run/student_lora.safetensors").modules)  # 10 + 3 block layers, 6 embedders
    assert modules == 19 and f"PROBE {modules} NOT_LOADED []" in run.stdout, run.stdout[-2000:]  # every key loaded
    theirs = load_file(tmp_path / "out.safetensors")["velocity"]
    merged = load_transformer(tmp_path / "run/student.safetensors", dtype=torch.float32)
    with torch.no_grad():
        want = merged(x["latents"], x["timestep"], x["text_states"], torch.ones(1, 6), x["pooled"], 6.0)
        base = teacher(x["latents"], x["timestep"], x["text_states"], torch.ones(1, 6), x["pooled"], 6.0)
    assert float((want - base).norm() / base.norm()) > 1e-3  # the LoRA changes the prediction
    assert float((theirs - want).norm() / want.norm()) <= 1e-4


def test_torchrun_trains_on_an_fp8_base_like_one_process(synvid, tmp_path):
    """Under torchrun + FSDP2 (2 ranks, one launch) the fp8 base is read on rank 0, sent exactly and sharded in
    fp8: a ComfyUI fp8_scaled teacher (adapters from ``lora_init``) on 2 data-parallel ranks and
    ``model.fp8_base`` with sequence parallelism 2 and offloaded checkpoints end like one process (<= 1e-4), and
    a one-process fp8_base checkpoint resumes on 2 ranks (same base fingerprint) to the same end."""
    fp8_file, _ = _fp8_rounded_copy(synvid / "teacher.safetensors", tmp_path, scaled=True)
    common = dict(optim={"steps": 4, "total_batch": 2, "lr": LORA_LR, "segments_per_iteration": 2},
                  data={"val_samples": 2}, log={"plot": False, "ckpt_every": 2, "keep_checkpoints": 0})

    def cfg(name: str, model: dict, **extra):
        return make_cfg(synvid, tmp_path / name, model={"lora_rank": 4, "gradient_checkpointing": True, **model},
                        **common, **extra)

    model, adapters = _adapted(rank=2, alpha=2.0)   # the scaled runs start from a LoRA file (rank 0 builds it)
    scaled = {"teacher": str(fp8_file), "lora_init": str(_save(model, adapters, tmp_path / "init.safetensors"))}
    base = {"fp8_base": True}
    Trainer(cfg("one_scaled", scaled)).run()
    Trainer(cfg("one_base", base)).run()
    run_torchrun([(cfg("dp2_scaled", scaled), None, None),
                  (cfg("sp2_base", {**base, "offload_checkpoints": True}, runtime={"sequence_parallel": 2}), None,
                   None),
                  (cfg("to_dp2", base), str(tmp_path / "one_base/checkpoints/step_0000002"), None)],
                 tmp_path / "jobs.json")
    for run, one in (("dp2_scaled", "one_scaled"), ("sp2_base", "one_base"), ("to_dp2", "one_base")):
        _assert_close_states(_states(tmp_path / run), _states(tmp_path / one))
        for name in ("student.safetensors", "student_lora.safetensors"):
            assert max_abs_diff(read_state_dict(tmp_path / run / name), read_state_dict(tmp_path / one / name)) \
                <= 1e-4, (run, name)


def test_memory_advice_names_the_settings_that_fit(synvid, tmp_path, monkeypatch):
    """On CUDA the trainer compares train.estimate's peak for its own run with the device and, when it does not
    fit, says which settings would (also inside an out-of-memory error)."""
    from accvideo_core.models.transformer_hunyuan_video import TransformerConfig
    from accvideo_core.train.estimate import estimate, memory_advice

    video = dict(frames=93, height=544, width=960, gpus=1)
    peak, text = memory_advice(TransformerConfig(), 24, lora_rank=16, **video)
    assert peak == pytest.approx(70.03, abs=0.01) and "more than the device's 24.0 GB" in text
    assert text.endswith("it fits with model.offload_checkpoints = true and model.fp8_base = true (22.5 GB, 36 GB "
                         "of host memory per GPU)")
    _, text = memory_advice(TransformerConfig(), 48, lora_rank=16, **video)
    assert "it fits with model.offload_checkpoints = true (35.0 GB" in text and "or with model.offload" in text
    _, text = memory_advice(TransformerConfig(), 80, lora_rank=16, **video)
    assert text.endswith("the device has 80.0 GB")
    _, text = memory_advice(TransformerConfig(), 24, **video)   # a full fine-tune on one card: nothing fits
    assert "brings it under that" in text and "a LoRA (model.lora_rank > 0)" in text
    from accvideo_core.train.from_model import HostedTrainer   # the AccVideo Train node names its own inputs

    _, text = memory_advice(TransformerConfig(), 24, HostedTrainer.SETTING_NAMES, lora_rank=16, **video)
    assert text.endswith("it fits with offload_activations on and the teacher loaded in fp8 (UNETLoader "
                         "weight_dtype fp8_e4m3fn) (22.5 GB, 36 GB of host memory per GPU)")
    # the trainer's own run: its model, the SynVid's latent grid and text length, its micro-batch and mode
    trainer = Trainer(make_cfg(synvid, tmp_path / "run", model={"lora_rank": 4}, optim={"micro_batch": 2}))
    peak, text = trainer.memory_advice(1e-6)
    want = estimate(trainer.teacher.config, latent=(2, 4, 6), text_tokens=7, gpus=1, lora_rank=4, micro_batch=2,
                    head_width=32)
    assert trainer.latent_grid == (2, 4, 6) and peak == pytest.approx(want.peak) and "it fits with" not in text
    fp8 = Trainer(make_cfg(synvid, tmp_path / "fp8", model={"lora_rank": 4, "fp8_base": True}))
    assert fp8.memory_advice(1e-6)[0] == pytest.approx(estimate(
        trainer.teacher.config, latent=(2, 4, 6), text_tokens=7, gpus=1, lora_rank=4, head_width=32,
        fp8_base=True).peak)   # the base the trainer holds decides, here model.fp8_base
    trainer.memory_note = text
    monkeypatch.setattr(trainer, "train_step", lambda step: (_ for _ in ()).throw(torch.OutOfMemoryError("OOM")))
    monkeypatch.setattr(trainer, "validate", lambda: {})
    with pytest.raises(torch.OutOfMemoryError, match="OOM\nby python -m accvideo_core.train.estimate this run"):
        trainer.run()


def test_estimate_of_a_config_file_reads_only_headers(synvid, tmp_path, capsys):
    """``train.estimate --config run.json [--set ...] [--device-gb G]``: the run's memory before anything is
    loaded (the teacher's architecture from its header, the size from the SynVid's first sample), as the trainer
    itself computes it; an fp8 teacher file counts as an fp8 base; unreadable inputs exit 2 with one line."""
    from accvideo_core.models.loading import load_transformer
    from accvideo_core.train.estimate import estimate, main

    cfg = make_cfg(synvid, tmp_path / "run", model={"lora_rank": 4, "offload_checkpoints": True,
                                                    "gradient_checkpointing": True}, optim={"micro_batch": 2})
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["--config", str(tmp_path / "run.json"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate(load_transformer(synvid / "teacher.safetensors").config, latent=(2, 4, 6), text_tokens=7, gpus=1,
                    lora_rank=4, offload=True, micro_batch=2, head_width=32)
    assert got["peak_gb"] == pytest.approx(want.peak) and got["host_gb"] == pytest.approx(want.host_gb) and want.host_gb > 0
    trainer = Trainer(cfg)   # the trainer's own figure for the same run
    assert trainer.memory_advice(1.0)[0] == pytest.approx(want.peak)
    assert main(["--config", str(tmp_path / "run.json"), "--set", "model.offload_checkpoints=false",
                 "--device-gb", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "latent (2, 4, 6)" in out and "LoRA rank 4" in out and "offloaded" not in out.splitlines()[0]
    assert "more than the device's 0.0 GB" in out
    fp8_file, _ = _fp8_rounded_copy(synvid / "teacher.safetensors", tmp_path)
    assert main(["--config", str(tmp_path / "run.json"), "--set", f"model.teacher={json.dumps(str(fp8_file))}"]) == 0
    assert "fp8 base" in capsys.readouterr().out.splitlines()[0]
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: config file not found")

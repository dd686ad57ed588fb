"""The miniature family's training scripts: the VAE's output-norm initialisation, the shape-pixel loss weights,
and both CLIs end to end at a tiny budget (the shipped weights come from these same commands)."""
from __future__ import annotations

import json

import torch

from accvideo_core.mini.data import MiniVideoDataset, parse_caption, render_clip
from accvideo_core.mini.train_teacher import latent_foreground
from accvideo_core.mini.train_teacher import main as teacher_main
from accvideo_core.latents import VAE_SCALING_FACTOR
from accvideo_core.mini.train_vae import (MINI_VAE, anchor_group_statistics_, foreground_weights, jitter_latents,
                                          output_norm_inputs)
from accvideo_core.mini.train_vae import main as vae_main
from accvideo_core.models.loading import load_transformer
from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, norm_silu
from accvideo_core.models.vae_loading import load_vae


@torch.no_grad()
def test_anchored_output_norm_starts_as_the_identity_on_the_signal():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = MiniVideoDataset(6)
    sample = torch.stack([ds[i]["video"][:, :5, :32, :32] for i in range(4)])
    vae = HunyuanVideoVAE(MINI_VAE).eval()
    anchor_group_statistics_(vae, 100.0, sample)
    other = torch.stack([ds[i]["video"][:, :5, :32, :32] for i in (4, 5)])  # clips the statistics never saw
    h = output_norm_inputs(vae, other)["decoder"]
    out = norm_silu(vae.decoder.conv_norm_out, h, silu=False)
    per_group = h.shape[1] // MINI_VAE.norm_num_groups
    anchor = torch.zeros(h.shape[1], dtype=torch.bool)
    anchor[::per_group] = True
    assert float(h[:, anchor].mean()) > 50  # the anchor is in the stream ...
    assert float(out[:, anchor].abs().max()) == 0.0  # ... and removed by the norm
    signal = h[:, ~anchor]
    rel = float((out[:, ~anchor] - signal).norm() / signal.norm())
    assert rel < 0.3, rel  # the signal passes at its own scale (it would be ~1/40 of it without the affine)
    # without step 2 (plain anchor) the same norm shrinks the signal by more than 10x
    plain = HunyuanVideoVAE(MINI_VAE).eval()
    plain.load_state_dict(vae.state_dict())
    torch.nn.init.ones_(plain.decoder.conv_norm_out.weight)
    torch.nn.init.zeros_(plain.decoder.conv_norm_out.bias)
    shrunk = norm_silu(plain.decoder.conv_norm_out, h, silu=False)[:, ~anchor]
    assert float((shrunk - shrunk.mean()).norm()) < 0.1 * float((signal - signal.mean()).norm())


def test_foreground_weights_mark_the_shape_pixels():
    caption = "a yellow circle moving down on a blue background"
    video = render_clip(parse_caption(caption), 5, 32, 32)[None]
    w = foreground_weights(video, 4.0)
    assert w.shape == (1, 1, 5, 32, 32)
    assert set(torch.unique(w).tolist()) == {1.0, 5.0}
    bg = torch.tensor([0.10, 0.18, 0.55]) * 2 - 1
    far = (video[0] - bg[:, None, None, None]).abs().amax(0) > 0.5  # clearly inside the yellow circle
    near = (video[0] - bg[:, None, None, None]).abs().amax(0) < 0.01  # clearly background
    assert bool((w[0, 0][far] == 5.0).all()) and bool((w[0, 0][near] == 1.0).all())
    assert 0.02 < float((w > 1).float().mean()) < 0.3


def test_latent_foreground_follows_the_causal_latent_grid():
    """Latent frame 0 covers pixel frame 0 only, latent frame t pixel frames 4t-3 .. 4t; each latent cell 8 x 8."""
    video = render_clip(parse_caption("a white square moving right on a black background"), 9, 32, 32)[None]
    mask = latent_foreground(video)
    assert mask.shape == (1, 1, 3, 4, 4)
    pixels = foreground_weights(video, 1.0)[0, 0] > 1.5  # [9, 32, 32]
    cells = pixels.unflatten(1, (4, 8)).unflatten(3, (4, 8)).any(dim=(2, 4))  # [9, 4, 4]
    assert torch.equal(mask[0, 0, 0].bool(), cells[0])
    assert torch.equal(mask[0, 0, 1].bool(), cells[1:5].any(0))
    assert torch.equal(mask[0, 0, 2].bool(), cells[5:9].any(0))
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 2])  # the shape moved


def test_jitter_latents_scales_about_each_clip_mean_and_adds_noise():
    torch.manual_seed(0)
    z = torch.randn(64, 16, 3, 4, 4) * 2 + 1
    assert jitter_latents(z, 0.0, 0.0) is z
    scaled = jitter_latents(z, 0.0, 0.5)
    centre = z.mean(dim=(2, 3, 4), keepdim=True)
    w = ((scaled - centre) * (z - centre)).sum(dim=(1, 2, 3, 4)) / (z - centre).square().sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(scaled, centre + w.view(-1, 1, 1, 1, 1) * (z - centre))  # a pure per-clip scaling
    assert float(w.min()) >= 1.0 and float(w.max()) <= 1.5
    unscaled = (w == 1.0).float().mean()
    assert 0.25 < unscaled < 0.75 and float(w.max()) > 1.3  # about half the clips kept, the others spread
    noisy = jitter_latents(z, 0.4, 0.0) - z
    per_clip = noisy.std(dim=(1, 2, 3, 4)) * VAE_SCALING_FACTOR  # model-space noise std, U(0, 0.4) per clip
    assert float(per_clip.max()) <= 0.45 and float(per_clip.max()) > 0.3 and float(per_clip.min()) < 0.1


def test_vae_and_teacher_training_clis_run_at_a_tiny_budget(tmp_path):
    vae_out = tmp_path / "vae.safetensors"
    assert vae_main(["--out", str(vae_out), "--steps", "2", "--batch", "1", "--crop", "32", "--window", "5",
                     "--clips", "4", "--fg-weight", "4", "--warmup", "1"]) == 0
    vae = load_vae(vae_out, dtype=torch.float32)
    assert vae.config.block_out_channels == MINI_VAE.block_out_channels
    log = json.loads((tmp_path / "train_vae.json").read_text())
    result = log["runs"][-1]["result"]
    assert result["steps"] == 2 and "heldout_shape_psnr_db" in result
    assert log["commands"][-1].startswith("python -m accvideo_core.mini.train_vae --steps 2")
    # --decoder-only keeps every latent (encoder + quant_conv) bit-identical and trains the decoder
    tuned = tmp_path / "tuned" / "vae.safetensors"
    assert vae_main(["--init", str(vae_out), "--out", str(tuned), "--decoder-only", "--steps", "2", "--batch", "1",
                     "--crop", "32", "--window", "5", "--clips", "4", "--warmup", "1", "--lr", "1e-3",
                     "--latent-scale", "0.5", "--latent-noise", "0.3"]) == 0
    before, after = vae.state_dict(), load_vae(tuned, dtype=torch.float32).state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    teacher_out = tmp_path / "teacher.safetensors"
    assert teacher_main(["--vae", str(vae_out), "--out", str(teacher_out), "--clips", "8", "--batch", "2",
                         "--stage1-steps", "2", "--stage2-steps", "2", "--warmup", "1", "--fg-weight", "4"]) == 0
    teacher = load_transformer(teacher_out, dtype=torch.float32)
    assert teacher.config.guidance_embed
    assert (tmp_path / "text_encoder.safetensors").is_file()
    summary = json.loads((tmp_path / "train_teacher.json").read_text())
    run = summary["runs"][-1]
    assert run["config"]["stage1_steps"] == 2 and run["result"]["parameters"] > 0 and run["init"] is None
    # continuing a teacher (--init) appends a run and its command
    assert teacher_main(["--vae", str(vae_out), "--init", str(teacher_out), "--out", str(teacher_out), "--clips", "8",
                         "--batch", "2", "--stage1-steps", "1", "--stage2-steps", "1", "--warmup", "1"]) == 0
    summary = json.loads((tmp_path / "train_teacher.json").read_text())
    assert len(summary["runs"]) == 2
    assert summary["commands"][1].startswith(
        f"python -m accvideo_core.mini.train_teacher --vae {vae_out} --init {teacher_out} --clips 8")
    assert summary["runs"][1]["result"]["vae_encoder_sha256"] == summary["runs"][0]["result"]["vae_encoder_sha256"]

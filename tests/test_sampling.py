"""AccVideo / HunyuanVideo flow-matching schedule and Euler sampler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accvideo_core import euler_flow, flow_sigmas, sample_flow
from accvideo_core.sampling import (
    ACCVIDEO_STUDENT, HUNYUAN_TEACHER, PRESETS, NonFiniteLatentError, check_settings, sampling_min_bytes, seeded_noise,
)
from accvideo_core.testing import tiny_inputs, tiny_transformer

# The official schedule's sigmas and timesteps (provenance: tests/data/README.md).
SCHEDULE = json.loads((Path(__file__).parent / "data" / "accvideo_schedule.json").read_text())
TEACHER_TIMESTEPS = SCHEDULE["teacher_timesteps_50_steps"]


def test_student_sigmas():
    expected = torch.tensor(SCHEDULE["student_sigmas_5_steps"])
    got = flow_sigmas(5, 7.0)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-6
    assert torch.equal(got[:-1] * 1000, torch.tensor(SCHEDULE["student_timesteps_5_steps"]))


def test_student_sigmas_are_every_tenth_teacher_sigma():
    assert torch.equal(flow_sigmas(50, 7.0)[::10], flow_sigmas(5, 7.0))


def test_teacher_timesteps_match_the_reference_list():
    timesteps = flow_sigmas(50, 7.0)[:-1] * 1000
    assert len(TEACHER_TIMESTEPS) == 50
    assert torch.equal(timesteps, torch.tensor(TEACHER_TIMESTEPS))  # bit-exact fp32 (the list has 9 digits)


def test_presets():
    assert PRESETS["accvideo_student"] is ACCVIDEO_STUDENT
    assert (ACCVIDEO_STUDENT.steps, ACCVIDEO_STUDENT.shift, ACCVIDEO_STUDENT.guidance,
            ACCVIDEO_STUDENT.cfg_scale) == (5, 7.0, 6.0, 1.0)
    assert (HUNYUAN_TEACHER.steps, HUNYUAN_TEACHER.shift, HUNYUAN_TEACHER.guidance) == (50, 7.0, 6.0)
    assert torch.equal(ACCVIDEO_STUDENT.sigmas(), flow_sigmas(5, 7.0))
    with pytest.raises(ValueError, match="steps must be"):
        flow_sigmas(0)


def test_euler_follows_straight_flow_paths_exactly():
    """With the exact velocity of a straight path x_s = (1 - s) data + s noise, Euler hits every point of it."""
    data, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    sigmas = flow_sigmas(5)
    seen = []

    def callback(info):
        seen.append(info)
        expected = (1 - info["sigma_next"]) * data.float() + info["sigma_next"] * noise.float()
        torch.testing.assert_close(info["x"], expected, atol=1e-5, rtol=0)

    calls = []
    out = euler_flow(lambda x, s: calls.append(s) or (noise - data), noise, sigmas, callback=callback)
    assert out.dtype == torch.float32  # latents are fp32 between and after steps
    torch.testing.assert_close(out, data.float(), atol=1e-5, rtol=0)
    assert [i["i"] for i in seen] == list(range(5)) and calls == [float(s) for s in sigmas[:-1]]
    assert all(isinstance(s, float) for s in calls)
    assert [i["sigma_next"] for i in seen] == [float(s) for s in sigmas[1:]]


def test_euler_update_rule_on_a_nonlinear_field():
    x0 = torch.tensor([0.5, -1.0])
    sigmas = [1.0, 0.7, 0.2, 0.0]
    expected = x0.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        expected = expected + (s_next - s) * torch.sin(expected * s)
    torch.testing.assert_close(euler_flow(lambda x, s: torch.sin(x * s), x0, sigmas), expected)


def test_sample_flow_with_the_transformer():
    model = tiny_transformer(seed=31)
    inp = tiny_inputs(model.config, batch=2, valid=[7, 3], seed=32)
    noise = torch.randn_like(inp["latents"])
    cond = dict(text_states=inp["text_states"], text_mask=inp["text_mask"], pooled=inp["pooled"])
    sigmas = flow_sigmas(3)
    steps = []
    out = sample_flow(model, noise, sigmas, **cond, guidance=6.0, callback=steps.append)
    x = noise.clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + (s_next - s) * model(x, torch.full((2,), s * 1000), **cond, guidance=6.0)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)
    assert len(steps) == 3 and torch.equal(steps[-1]["x"], out)


def test_sample_flow_keeps_fp32_latents_with_a_bf16_model():
    model = tiny_transformer(seed=33).to(torch.bfloat16)
    inp = tiny_inputs(model.config, batch=1, seed=34)
    dtypes = []
    out = sample_flow(model, inp["latents"], flow_sigmas(2), text_states=inp["text_states"],
                      text_mask=inp["text_mask"], pooled=inp["pooled"], callback=lambda i: dtypes.append(i["x"].dtype))
    assert out.dtype == torch.float32 and dtypes == [torch.float32, torch.float32] and torch.isfinite(out).all()


def test_sample_flow_real_cfg():
    model = tiny_transformer(seed=35)
    inp = tiny_inputs(model.config, batch=1, valid=[6], seed=36)
    neg = tiny_inputs(model.config, batch=1, valid=[2], seed=37)
    neg_cond = dict(text_states=neg["text_states"], text_mask=neg["text_mask"], pooled=neg["pooled"])
    cond = dict(text_states=inp["text_states"], text_mask=inp["text_mask"], pooled=inp["pooled"])
    sigmas = [1.0, 0.5]
    out = sample_flow(model, inp["latents"], sigmas, **cond, cfg_scale=4.0, negative=neg_cond)
    with torch.no_grad():
        t = torch.tensor([1000.0])
        v_pos = model(inp["latents"], t, **cond, guidance=6.0)
        v_neg = model(inp["latents"], t, **neg_cond, guidance=6.0)
    torch.testing.assert_close(out, inp["latents"] - 0.5 * (v_neg + 4.0 * (v_pos - v_neg)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a negative"):
        sample_flow(model, inp["latents"], sigmas, **cond, cfg_scale=4.0)


def test_seeded_noise_is_per_seed_cpu_randn_in_any_batch():
    """The one seeded-noise formula: row i = randn(shape, manual_seed(seed_i)), independent of the batch."""
    noise = seeded_noise((16, 2, 4, 4), [7, 8, 9])
    assert noise.shape == (3, 16, 2, 4, 4)
    for row, seed in zip(noise, [7, 8, 9]):
        assert torch.equal(row, torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(seeded_noise((16, 2, 4, 4), [8])[0], noise[1])
    # ComfyUI's prepare_noise for a batch of one: torch.randn(latent.size(), generator=manual_seed(seed))
    assert torch.equal(seeded_noise((16, 2, 4, 4), [8]), torch.randn(1, 16, 2, 4, 4, generator=torch.manual_seed(8)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_settings_are_refused_up_front(bad):
    with pytest.raises(ValueError, match="shift must be a finite number"):
        flow_sigmas(5, bad)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        check_settings(guidance=bad)
    check_settings(shift=7.0, guidance=6.0)


def test_a_non_finite_latent_stops_sampling_at_its_step():
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return x * (float("nan") if len(calls) == 3 else 1.0)

    x0 = torch.randn(1, 4)
    with pytest.raises(NonFiniteLatentError, match="after step 3 of 5"):
        euler_flow(velocity, x0, flow_sigmas(5), check_finite=True)
    assert len(calls) == 3
    calls.clear()
    assert torch.isnan(euler_flow(velocity, x0, flow_sigmas(5))).all()  # unchecked: the caller's choice


def test_sampling_memory_lower_bound():
    """The bound counts tokens x hidden x (2 + mlp ratio) and the fp32 latents; it grows with the video."""
    small = sampling_min_bytes((1, 16, 3, 6, 8), 256, compute_bytes=4)
    assert small == 3 * 3 * 4 * 256 * 6 * 4 + 3 * 16 * 3 * 6 * 8 * 4
    official = sampling_min_bytes((1, 16, 24, 68, 120), 3072)        # 544x960, 93 frames: fits an 80 GB GPU
    huge = sampling_min_bytes((1, 16, 24, 1024, 1024), 3072)         # 8192x8192, 93 frames: fits nothing
    assert official < 80 * 2**30 < huge

"""Ulysses sequence parallelism: 2 gloo processes with sp = 2 equal one process (outputs, image features, parameter
and input gradients) with padded text, mixed valid lengths and a token count that 2 does not divide."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accvideo_core.testing import tiny_inputs, tiny_transformer

# (model overrides, input kwargs, gradient checkpointing)
CASES = {
    # two prompts with different valid lengths (key-mask path), 3x2x3 = 18 image tokens, checkpointed blocks
    "mixed_padding": (dict(num_single_blocks=3), dict(batch=2, valid=[5, 2], frames=3, height=4, width=6), True),
    # equal valid lengths (padding dropped), 4 heads, 3x1x3 = 9 image tokens: padded to 10 over 2 ranks
    "odd_tokens": (dict(num_heads=4, hidden_size=64, rope_axes=(4, 4, 8)),
                   dict(batch=1, valid=[4], frames=3, height=2, width=6), False),
}
FEATURE_LAYER = 3


def _run(model, inp: dict, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Inference output, then a training forward + backward (output, image features, latents gradient and
    parameter gradients) of a loss that uses both the velocity and the features (as the trainer does)."""
    model.enable_gradient_checkpointing(checkpointing)
    with torch.no_grad():
        result = {"inference": model(**inp)}
    latents = inp["latents"].clone().requires_grad_(True)
    out = model(**{**inp, "latents": latents})
    feats = model.image_features(**{**inp, "latents": latents}, layer=FEATURE_LAYER)
    (out.square().mean() + (feats * torch.linspace(-1, 1, feats.shape[1])[:, None, None, None]).mean()).backward()
    result.update(out=out.detach(), features=feats.detach(), latents_grad=latents.grad)
    result.update({f"grad/{n}": p.grad for n, p in model.named_parameters()})
    return result


def _case(name: str) -> dict[str, torch.Tensor]:
    overrides, kwargs, checkpointing = CASES[name]
    model = tiny_transformer(seed=3, **overrides)
    return _run(model, tiny_inputs(model.config, seed=4, **kwargs), checkpointing) | {"_model": model}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name in CASES:
            overrides, kwargs, checkpointing = CASES[name]
            model = tiny_transformer(seed=3, **overrides)
            model.enable_sequence_parallel(dist.group.WORLD)
            r = _run(model, tiny_inputs(model.config, seed=4, **kwargs), checkpointing)
            for key in [k for k in r if k.startswith("grad/")]:
                dist.all_reduce(r[key])  # each rank holds its share of the parameter gradients
            results[name] = r
        try:
            three = tiny_transformer(seed=0, num_heads=3, hidden_size=48, rope_axes=(4, 4, 8))
            three.enable_sequence_parallel(dist.group.WORLD)
            results["heads_error"] = ""
        except ValueError as err:
            results["heads_error"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp2(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sp2")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(CASES))
def test_sp2_equals_one_process(sp2, name):
    torch.set_num_threads(1)
    ref = _case(name)
    model = ref.pop("_model")
    n_params = len(list(model.parameters()))
    for rank, results in enumerate(sp2):
        got = results[name]
        assert set(got) == set(ref) and sum(k.startswith("grad/") for k in got) == n_params
        for key, value in ref.items():
            assert value is not None and value.abs().max() > 0, key  # every gradient reaches every parameter
            assert got[key].shape == value.shape, key
            err = _rel_err(got[key], value)
            assert err <= 1e-5, f"rank {rank} {name} {key}: relative error {err:.2e}"


def test_sp_degree_must_divide_the_heads(sp2):
    assert "sequence parallel degree 2 must divide the number of attention heads (3" in sp2[0]["heads_error"]
    assert "use one of [1, 3]" in sp2[0]["heads_error"]

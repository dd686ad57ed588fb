"""Ulysses sequence parallelism: 2 gloo processes with sp = 2 equal one process (outputs, image features, parameter
and input gradients) with padded text, mixed valid lengths and a token count that 2 does not divide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accvideo_core.models.sequence_parallel import lead_sequence_parallel
from accvideo_core.sampling import flow_sigmas, sample_flow
from accvideo_core.testing import tiny_inputs, tiny_transformer
from accvideo_core.train.config import ConfigError, TrainConfig, config_from_dict
from accvideo_core.train.loop import Trainer
from accvideo_core.utils.io import read_state_dict

from test_train import _assert_close_states, _env, _latest, _states, max_abs_diff, run_torchrun

# (model overrides, input kwargs, gradient checkpointing)
CASES = {
    # two prompts with different valid lengths (key-mask path), 3x2x3 = 18 image tokens, checkpointed blocks
    "mixed_padding": (dict(num_single_blocks=3), dict(batch=2, valid=[5, 2], frames=3, height=4, width=6), True),
    # equal valid lengths (padding dropped), 4 heads, 3x1x3 = 9 image tokens: padded to 10 over 2 ranks
    "odd_tokens": (dict(num_heads=4, hidden_size=64, rope_axes=(4, 4, 8)),
                   dict(batch=1, valid=[4], frames=3, height=2, width=6), False),
}
FEATURE_LAYER = 3
ROOT = Path(__file__).resolve().parents[1]


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
        results["led"] = _led_sampling(rank)
        try:
            three = tiny_transformer(seed=0, num_heads=3, hidden_size=48, rope_axes=(4, 4, 8))
            three.enable_sequence_parallel(dist.group.WORLD)
            results["heads_error"] = ""
        except ValueError as err:
            results["heads_error"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sampling_inputs():
    model = tiny_transformer(seed=5)
    inp = tiny_inputs(model.config, batch=2, valid=[6, 3], frames=2, height=4, width=6, seed=6)
    return model, inp


def _led_sampling(rank: int) -> torch.Tensor | None:
    """3 Euler steps run by rank 0 through lead_sequence_parallel; rank 1 only serves (returns None)."""
    model, inp = _sampling_inputs()
    with lead_sequence_parallel(model) as lead:
        if lead is None:
            assert rank != 0
            return None
        return sample_flow(lead, inp["latents"], flow_sigmas(3), text_states=inp["text_states"],
                           text_mask=inp["text_mask"], pooled=inp["pooled"], guidance=torch.tensor([6.0, 3.0]))


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


def test_lead_sequence_parallel_runs_one_process_calls_on_every_rank(sp2):
    """The dumper's mode: rank 0 samples, rank 1 serves its calls; rank 0's result equals one process."""
    model, inp = _sampling_inputs()
    with torch.no_grad():
        ref = sample_flow(model, inp["latents"], flow_sigmas(3), text_states=inp["text_states"],
                          text_mask=inp["text_mask"], pooled=inp["pooled"], guidance=torch.tensor([6.0, 3.0]))
    assert sp2[1]["led"] is None
    assert _rel_err(sp2[0]["led"], ref) <= 1e-5


def test_sp_degree_must_divide_the_heads(sp2):
    assert "sequence parallel degree 2 must divide the number of attention heads (3" in sp2[0]["heads_error"]
    assert "use one of [1, 3]" in sp2[0]["heads_error"]


def test_estimate_counts_the_flops_torch_counts():
    """The estimate's forward FLOPs equal torch's FLOP counter on a real forward (math SDPA, so attention counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from accvideo_core.train.estimate import forward_flops

    model = tiny_transformer(seed=0)
    inp = tiny_inputs(model.config, batch=1, frames=3, height=8, width=6, text_len=7)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inp)
    assert forward_flops(model, 3 * 4 * 3, 7) == counter.get_total_flops()


def test_estimate_with_sequence_parallel(capsys):
    from accvideo_core.models.transformer_hunyuan_video import TransformerConfig
    from accvideo_core.train.estimate import estimate, main

    one = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=8)
    eight = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=8, sp=8)
    local = (24 * 34 * 60 // 8 + 256) * 3072 * 2  # bf16 [1/8 of the image tokens + all text, hidden]
    assert eight.activations["trajectory phase"] == pytest.approx((60 + 20 + 6) * local / 1e9)
    assert eight.static == one.static  # FSDP2 shards over all 8 ranks in both layouts
    assert one.peak > 70 and eight.peak < 40
    assert eight.days(gpus=8) == one.days(gpus=8) == pytest.approx(2 * one.days(gpus=16))
    with pytest.raises(ValueError, match="sp 5 must divide the number of GPUs"):
        estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=10, sp=5)
    assert main(["--plan"]) == 0
    assert "| 1280x720x129 (119056) | 8 | 8 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def synvid_sp(tmp_path_factory) -> Path:
    """8 teacher trajectories, 10 steps, 5 frames at 32x48 (2x2x3 image tokens); prompts with 7, 5, 3, 6 valid
    tokens, so a micro-batch of two mixes valid lengths (the key-mask path). The last 2 are held out."""
    from accvideo_core.models.loading import save_transformer
    from accvideo_core.synvid.dump import dump_synvid

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synvid_sp")
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 7, dtype=torch.long)
    for i, n in enumerate((7, 5, 3, 6)):
        mask[i, n:] = 0
    emb = {"text_states": torch.randn(4, 7, 40, generator=g), "text_mask": mask,
           "pooled": torch.randn(4, 24, generator=g), "prompts": [f"prompt {i}" for i in range(4)]}
    save_transformer(tiny_transformer(seed=0), root / "teacher.safetensors")
    dump_synvid(tiny_transformer(seed=0), emb, root / "data", num=8, frames=5, height=32, width=48, steps=10,
                dtype="float32", batch_size=4, source_model="tiny", progress=lambda msg: None)
    return root


def _train_config(root: Path, out: Path, micro_batch: int, sp: int = 1) -> TrainConfig:
    """4 iterations of 2 of the 5 segments (the queues carry fakes across iterations), EMA, checkpoints at 2 and
    4; 6 training samples, so the last iteration starts the next epoch."""
    return config_from_dict({
        "model": {"teacher": str(root / "teacher.safetensors"), "gradient_checkpointing": True},
        "data": {"root": str(root / "data"), "val_samples": 2},
        "optim": {"steps": 4, "total_batch": 2, "micro_batch": micro_batch, "lr": 1e-3, "head_lr": 1e-3,
                  "segments_per_iteration": 2, "ema_decay": 0.9},
        "loss": {"head_width": 16, "head_groups": 4}, "runtime": {"sequence_parallel": sp},
        "log": {"out_dir": str(out), "val_every": 2, "ckpt_every": 2, "keep_checkpoints": 0, "save_dtype": "fp32",
                "plot": False}})


def _val_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "val"]


@pytest.mark.parametrize("nproc, micro_batch", [
    (2, 2),   # one SP group of 2 ranks; a micro-batch of two prompts with different valid lengths (key mask)
    (4, 1),   # dp 2 x sp 2: two groups, one sample each
])
def test_torchrun_sequence_parallel_matches_one_process_and_resumes_on_any_layout(synvid_sp, tmp_path, nproc,
                                                                                  micro_batch):
    """Iterations with trajectory + adversarial losses through the teacher's features and validation sampling,
    runtime.sequence_parallel = 2 (FSDP2 over all ranks), end like one process: student, EMA, optimizer, heads,
    validation MSE. Checkpoints move between the layouts (one launch for both sp runs): the one-process
    checkpoint of step 2 resumed with sp 2 and the sp-2 one resumed in one process end like the uninterrupted
    process (queues with fakes, data position, EMA)."""
    torch.set_num_threads(1)
    one = Trainer(_train_config(synvid_sp, tmp_path / "one", micro_batch)).run()
    half = tmp_path / "one/checkpoints/step_0000002"
    stopped = _train_config(synvid_sp, tmp_path / "stopped", micro_batch, sp=2)
    stopped.log.val_every = 0   # its stop checks at step 2: after iteration 2, then before each of its 2 updates
    run_torchrun([(_train_config(synvid_sp, tmp_path / "sp2", micro_batch, sp=2), None, None),
                  (_train_config(synvid_sp, tmp_path / "to_sp2", micro_batch, sp=2), str(half), None),
                  (stopped, None, None, (2, 3))],   # a stop request on rank 0 only, inside iteration 3
                 tmp_path / "jobs.json", nproc)
    ref = _states(tmp_path / "one")
    moved = max(float((ref[f"student.{k}"] - v).abs().max()) for k, v in tiny_transformer(seed=0).state_dict().items())
    assert moved > 1e-3  # the student trained
    _assert_close_states(_states(tmp_path / "sp2"), ref)
    val = _val_rows(tmp_path / "sp2")
    assert len(val) == 3 and val[-1]["student_mse"] == pytest.approx(one["val"]["student_mse"], rel=1e-4)
    _assert_close_states(_states(tmp_path / "to_sp2"), ref)  # 1 process -> sp 2
    Trainer(_train_config(synvid_sp, tmp_path / "to_one", micro_batch),
            resume=str(tmp_path / "sp2/checkpoints/step_0000002")).run()  # sp 2 -> 1 process
    _assert_close_states(_states(tmp_path / "to_one"), ref)
    # every SP rank stopped after update 1 of iteration 3; that checkpoint resumed in one process ends like it too
    assert _latest(tmp_path / "stopped").name == "step_0000002_update1"
    stopped.log.val_every, stopped.runtime.sequence_parallel = 2, 1
    Trainer(stopped, resume="auto").run()
    _assert_close_states(_states(tmp_path / "stopped"), ref)
    for name in ("student", "student_ema"):  # the sp-2 exports, streamed from the shards
        got, want = (read_state_dict(tmp_path / run / f"{name}.safetensors") for run in ("to_sp2", "one"))
        assert max_abs_diff(got, want) <= 1e-4


def test_sequence_parallel_needs_a_multiple_of_its_degree_in_ranks(synvid_sp, tmp_path):
    with pytest.raises(ConfigError, match=r"runtime.sequence_parallel = 2 needs a multiple of 2 ranks .*got 1"):
        Trainer(_train_config(synvid_sp, tmp_path / "run", 1, sp=2))
    with pytest.raises(ConfigError, match="runtime.sequence_parallel must be >= 1"):
        _train_config(synvid_sp, tmp_path / "run", 1, sp=0)


# ---------------------------------------------------------------------------------------------------- dumper
def test_torchrun_dump_with_sequence_parallel_writes_the_same_trajectories(tmp_path):
    """``python -m accvideo_core.synvid.dump`` under torchrun (2 ranks, one SP group): rank 0 writes, rank 1 runs
    its model calls; the trajectories equal a single process's (two prompts of different valid lengths batched)."""
    from safetensors.torch import save_file

    from accvideo_core.models.loading import save_transformer
    from accvideo_core.synvid.format import SynVidDataset, read_sample

    save_transformer(tiny_transformer(seed=0), tmp_path / "teacher.safetensors")
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1] * 6 + [0], [1] * 3 + [0] * 4])
    save_file({"text_states": torch.randn(2, 7, 40, generator=g), "text_mask": mask,
               "pooled": torch.randn(2, 24, generator=g)}, tmp_path / "emb.safetensors",
              metadata={"prompts": json.dumps(["a red ball", "a blue cube"])})
    args = ["-m", "accvideo_core.synvid.dump", "--teacher", str(tmp_path / "teacher.safetensors"), "--embeddings",
            str(tmp_path / "emb.safetensors"), "--num-samples", "2", "--frames", "5", "--height", "32", "--width", "48",
            "--steps", "10", "--dtype", "float32", "--batch-size", "2", "--device", "cpu"]
    for out, launch in (("one", [sys.executable]), ("sp2", [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", "2"])):
        proc = subprocess.run(launch + args + ["--out", str(tmp_path / out)], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = SynVidDataset(tmp_path / "one"), SynVidDataset(tmp_path / "sp2")
    assert len(one) == len(two) == 2
    for i in range(2):
        a, b = read_sample(one.path(i)), read_sample(two.path(i))
        assert (a.seed, a.prompt) == (b.seed, b.prompt)
        assert _rel_err(b.latents, a.latents) <= 1e-5

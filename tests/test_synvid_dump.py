"""Core SynVid dumper: the CLI writes valid samples whose latents are the teacher's own Euler trajectory."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from accvideo_core.models.loading import save_transformer
from accvideo_core.sampling import flow_sigmas, sample_flow
from accvideo_core.synvid.dump import main
from accvideo_core.synvid.format import SynVidDataset, read_sample
from accvideo_core.testing import tiny_transformer


def test_dump_cli_records_teacher_trajectory_and_continues(tmp_path):
    teacher = tiny_transformer(seed=3)
    save_transformer(teacher, tmp_path / "teacher.safetensors")
    g = torch.Generator().manual_seed(0)
    emb = {"text_states": torch.randn(2, 6, 40, generator=g), "text_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
           "pooled": torch.randn(2, 24, generator=g)}
    save_file(emb, str(tmp_path / "emb.safetensors"), metadata={"prompts": json.dumps(["a cat", "a dog"])})
    args = ["--teacher", str(tmp_path / "teacher.safetensors"), "--embeddings", str(tmp_path / "emb.safetensors"),
            "--out", str(tmp_path / "syn"), "--frames", "5", "--height", "32", "--width", "32", "--steps", "10",
            "--dtype", "float32", "--seed", "7"]
    assert main(args + ["--num", "2", "--store", "all"]) == 0
    ds = SynVidDataset(tmp_path / "syn")
    assert len(ds) == 2 and ds.manifest["stored"] == "all" and ds.manifest["key_steps"] == [0, 2, 4, 6, 8, 10]
    s = read_sample(ds.path(1))
    assert (s.prompt, s.seed, s.frames, s.steps, s.latents.shape) == ("a dog", 8, 5, 10, (11, 16, 2, 4, 4))
    assert s.source_model == "teacher.safetensors" and s.source_model_hash.startswith("sha256:")
    # the stored trajectory is the teacher's: seeded CPU noise, then its Euler iterates
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s.latents[0], noise[0])
    final = sample_flow(teacher, noise, flow_sigmas(10, 7.0), text_states=emb["text_states"][1:],
                        text_mask=emb["text_mask"][1:], pooled=emb["pooled"][1:], guidance=6.0)
    torch.testing.assert_close(s.latents[-1], final[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(s.text_mask, emb["text_mask"][1].bool())
    # running again with more samples continues the folder (no duplicates)
    assert main(args + ["--num", "3", "--store", "all"]) == 0
    ds = SynVidDataset(tmp_path / "syn")
    assert [e["seed"] for e in ds.manifest["samples"]] == [7, 8, 9]
    # clear error for a bad embeddings file
    save_file({"text_states": torch.randn(2, 6, 40)}, str(tmp_path / "bad.safetensors"))
    bad = ["--embeddings" if a == "--embeddings" else a for a in args]
    bad[bad.index("--embeddings") + 1] = str(tmp_path / "bad.safetensors")
    assert main(bad) == 2

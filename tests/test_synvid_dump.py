"""Core SynVid dumper: the CLI writes valid samples whose latents are the teacher's own Euler trajectory."""
from __future__ import annotations

import json
import os
from pathlib import Path

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


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + str(BOOM_MARK),))


BOOM_MARK = Path("/tmp/accvideo_synvid_dump_pickle_ran")


def test_dump_cli_turns_unreadable_inputs_into_one_line_and_exit_2(tmp_path, capsys):
    """Issue 17.6: corrupt, malicious or wrong-family teachers and bad embeddings: one line naming the file, rc 2."""
    g = torch.Generator().manual_seed(0)
    emb = {"text_states": torch.randn(1, 6, 40, generator=g), "text_mask": torch.ones(1, 6),
           "pooled": torch.randn(1, 24, generator=g)}
    save_file(emb, str(tmp_path / "emb.safetensors"))
    save_transformer(tiny_transformer(seed=3), tmp_path / "teacher.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    torch.save({"weight": _Boom()}, tmp_path / "evil.pt")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "flux.safetensors"))
    truncated = (tmp_path / "teacher.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(truncated[: len(truncated) // 2])
    base = ["--out", str(tmp_path / "syn"), "--frames", "5", "--height", "32", "--width", "32", "--steps", "10"]
    cases = [("garbage.safetensors", "emb.safetensors"), ("evil.pt", "emb.safetensors"),
             ("flux.safetensors", "emb.safetensors"), ("cut.safetensors", "emb.safetensors"),
             ("missing.safetensors", "emb.safetensors"), ("teacher.safetensors", "cut.safetensors")]
    BOOM_MARK.unlink(missing_ok=True)
    for teacher, embeddings in cases:
        rc = main(["--teacher", str(tmp_path / teacher), "--embeddings", str(tmp_path / embeddings), *base])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (teacher, embeddings, err)
        named = teacher if embeddings == "emb.safetensors" else embeddings
        assert named in err[0], (named, err[0])
    assert not BOOM_MARK.exists(), "the pickle ran code"
    assert not (tmp_path / "syn").exists()


def test_dump_refuses_a_bad_folder_and_nan_before_sampling(tmp_path, capsys):
    teacher = tiny_transformer(seed=3)
    save_transformer(teacher, tmp_path / "teacher.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"text_states": torch.randn(1, 6, 40, generator=g), "text_mask": torch.ones(1, 6),
               "pooled": torch.randn(1, 24, generator=g)}, str(tmp_path / "emb.safetensors"))
    args = ["--teacher", str(tmp_path / "teacher.safetensors"), "--embeddings", str(tmp_path / "emb.safetensors"),
            "--frames", "5", "--height", "32", "--width", "32", "--steps", "10", "--dtype", "float32"]
    assert main(args + ["--out", str(tmp_path / "syn")]) == 0
    calls = []
    real_forward = type(teacher).forward
    type(teacher).forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    try:
        assert main(args + ["--out", str(tmp_path / "syn"), "--height", "48", "--num", "2"]) == 2
        assert "differs from the data set" in capsys.readouterr().err
        assert main(args + ["--out", str(tmp_path / "syn"), "--guidance", "nan"]) == 2
        assert "guidance must be a finite number" in capsys.readouterr().err
        (tmp_path / "afile").write_text("x")
        assert main(args + ["--out", str(tmp_path / "afile")]) == 2
        assert "is a file" in capsys.readouterr().err
    finally:
        type(teacher).forward = real_forward
    assert calls == [], "the teacher ran before the input was refused"
    assert len(SynVidDataset(tmp_path / "syn")) == 1


def test_build_cli_turns_unreadable_inputs_into_one_line_and_exit_2(tmp_path, capsys):
    from accvideo_core.synvid import build

    wf = Path(__file__).resolve().parents[1] / "workflows/api/accvideo_synvid_dump_api.json"
    (tmp_path / "latin1.txt").write_bytes(b"un caf\xe9\n")
    (tmp_path / "broken.json").write_text("{")
    cases = [(str(wf), str(tmp_path / "missing.txt"), "missing.txt"), (str(wf), str(tmp_path / "latin1.txt"),
             "latin1.txt"), (str(tmp_path / "broken.json"), str(tmp_path / "latin1.txt"), "broken.json")]
    for workflow, prompts, named in cases:
        rc = build.main(["--server", "http://127.0.0.1:9", "--workflow", workflow, "--prompts", prompts])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err

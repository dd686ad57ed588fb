"""SynVid format: round trip, selective reads, validation errors, manifest, corrupt-file reporting."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from accvideo_core.synvid.folder import SynVidWriter, main, rebuild_manifest
from accvideo_core.synvid.format import (
    SynVidDataset, SynVidError, SynVidSample, key_steps_for, read_sample, sample_metadata, write_sample,
)


def make_sample(seed: int = 0, *, steps: int = 10, all_steps: bool = False, frames: int = 5) -> SynVidSample:
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(1, 0, steps + 1)
    sigmas = 7 * s / (1 + 6 * s)
    stored = list(range(steps + 1)) if all_steps else key_steps_for(steps)
    T = (frames - 1) // 4 + 1
    return SynVidSample(
        latents=torch.randn(len(stored), 16, T, 4, 6, generator=g), stored_steps=stored, sigmas=sigmas,
        text_states=torch.randn(7, 12, generator=g), text_mask=torch.tensor([1, 1, 1, 1, 0, 0, 0], dtype=torch.bool),
        pooled=torch.randn(8, generator=g), guidance=6.0, prompt=f"prompt {seed}", seed=seed, shift=7.0,
        height=32, width=48, frames=frames, source_model="tiny", source_model_hash="sha256:00",
        key_steps=key_steps_for(steps))


def save_raw(sample: SynVidSample, path, **meta_changes) -> None:
    """Write a sample's tensors and metadata without the writer's checks (a damaged or foreign file)."""
    tensors = {"latents": sample.latents, "sigmas": sample.sigmas.float(), "text_states": sample.text_states,
               "text_mask": sample.text_mask, "pooled": sample.pooled,
               "guidance": torch.tensor([sample.guidance], dtype=torch.float32)}
    save_file(tensors, str(path), metadata={**sample_metadata(sample), **meta_changes})


def test_round_trip_dtypes_and_key_slices(tmp_path):
    full = make_sample(1, all_steps=True)
    write_sample(full, tmp_path / "a.safetensors", dtype="float32")
    got = read_sample(tmp_path / "a.safetensors")
    assert torch.equal(got.latents, full.latents) and got.stored_steps == list(range(11))
    assert got.prompt == "prompt 1" and got.seed == 1 and got.guidance == 6.0 and got.frames == 5
    assert torch.equal(got.text_mask, full.text_mask) and torch.allclose(got.sigmas, full.sigmas)
    keys = read_sample(tmp_path / "a.safetensors", steps=got.key_steps)  # reads 6 slices of 11
    assert keys.stored_steps == [0, 2, 4, 6, 8, 10]
    assert torch.equal(keys.key_latents(), full.latents[[0, 2, 4, 6, 8, 10]])
    write_sample(full, tmp_path / "b.safetensors", dtype="bf16")
    b = read_sample(tmp_path / "b.safetensors")
    assert b.latents.dtype == torch.bfloat16 and torch.allclose(b.latents.float(), full.latents, atol=0.05)


def test_validation_errors_name_the_problem(tmp_path):
    bad = make_sample()
    bad.latents = bad.latents[:, :, :, :3]
    with pytest.raises(SynVidError, match="latents must have shape"):
        write_sample(bad, tmp_path / "x.safetensors")
    bad = make_sample()
    bad.sigmas = bad.sigmas.flip(0)
    with pytest.raises(SynVidError, match="decrease strictly"):
        write_sample(bad, tmp_path / "x.safetensors")
    bad = make_sample()
    bad.frames = 6
    with pytest.raises(SynVidError, match="4k\\+1"):
        write_sample(bad, tmp_path / "x.safetensors")
    nan = make_sample()
    nan.latents[2, 0, 0, 0, 0] = float("nan")
    with pytest.raises(SynVidError, match="latents contains NaN"):  # never written (issue 17.4)
        write_sample(nan, tmp_path / "nan.safetensors", dtype="float32")
    assert not (tmp_path / "nan.safetensors").exists()
    save_raw(nan, tmp_path / "nan.safetensors")  # as another tool could have written it
    with pytest.raises(SynVidError, match="nan.safetensors: latents contains NaN"):
        read_sample(tmp_path / "nan.safetensors")
    with pytest.raises(SynVidError, match="steps \\[3\\] are not stored"):
        read_sample(tmp_path / "nan.safetensors", steps=[0, 3])
    with pytest.raises(SynVidError, match="multiple of the number of segments"):
        key_steps_for(12, 5)


def test_manifest_reader_skips_and_reports_corrupt_files(tmp_path):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        for i in range(4):
            w.write(make_sample(i))
        assert w.has(2, "prompt 2") and not w.has(9, "prompt 9")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["samples"]) == 4 and manifest["latent_shape"] == [16, 2, 4, 6]
    with pytest.raises(SynVidError, match="differs from the data set"):
        with SynVidWriter(tmp_path) as w:
            w.write(make_sample(5, frames=9))
    # truncate one file, make another one a different format
    p1 = tmp_path / "samples" / "000001.safetensors"
    p1.write_bytes(p1.read_bytes()[:-100])
    other = make_sample(3)
    other.text_states = torch.randn(7, 5)
    write_sample(other, tmp_path / "samples" / "000003.safetensors")
    ds = SynVidDataset(tmp_path)
    errors: list[tuple[int, str]] = []
    good = [i for i, _ in ds.iter_valid(on_error=lambda i, e: errors.append((i, str(e))))]
    assert good == [0, 2]
    assert errors[0][0] == 1 and "000001.safetensors" in errors[0][1] and "truncated or corrupt" in errors[0][1]
    assert errors[1][0] == 3 and "text_dim is 5" in errors[1][1]
    write_sample(make_sample(0, frames=9), tmp_path / "samples" / "000000.safetensors")  # the manifest's name
    with pytest.raises(SynVidError, match=r"latent_shape is \(16, 3, 4, 6\) but the data set's samples have"):
        ds.load(0)
    write_sample(make_sample(0), tmp_path / "samples" / "000000.safetensors")
    assert main(["verify", str(tmp_path)]) == 1
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(SynVidError, match="rebuild"):
        SynVidDataset(tmp_path)
    with pytest.warns(UserWarning, match="000001|000003"):
        rebuilt = rebuild_manifest(tmp_path)
    assert [e["file"] for e in rebuilt["samples"]] == ["samples/000000.safetensors", "samples/000002.safetensors"]


def test_a_data_set_holds_one_teachers_trajectories(tmp_path):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        w.write(make_sample(0))
    other = make_sample(1)
    other.source_model_hash = "sha256:11"
    with SynVidWriter(tmp_path, dtype="float32") as w:  # continuing the folder with another teacher
        with pytest.raises(SynVidError, match="source_model_hash=sha256:11 differs .* separate folder"):
            w.write(other)
    assert len(SynVidDataset(tmp_path)) == 1


def test_sigmas_and_guidance_stored_twice_must_agree(tmp_path):
    """Issue 16: the schedule and guidance are tensors and metadata; a file where they differ is refused."""
    s = make_sample(2)
    save_raw(s, tmp_path / "ok.safetensors")
    assert read_sample(tmp_path / "ok.safetensors").guidance == 6.0
    altered = s.sigmas.clone()
    altered[3] += 1e-3
    save_raw(s, tmp_path / "sig.safetensors", sigmas=json.dumps(altered.tolist()))
    with pytest.raises(SynVidError, match="sig.safetensors: the sigmas tensor and the metadata 'sigmas' differ"):
        read_sample(tmp_path / "sig.safetensors")
    save_raw(s, tmp_path / "g.safetensors", guidance="7.5")
    with pytest.raises(SynVidError, match="guidance tensor \\(6.0\\) and the metadata 'guidance' \\(7.5\\)"):
        read_sample(tmp_path / "g.safetensors")
    save_raw(s, tmp_path / "shift.safetensors", shift="3.0")  # the schedule is not the recorded shift's
    with pytest.raises(SynVidError, match="not the shift-3.0 flow schedule"):
        read_sample(tmp_path / "shift.safetensors")
    odd = make_sample(3)
    odd.guidance = 6.1  # not exact in float32: still consistent
    write_sample(odd, tmp_path / "odd.safetensors")
    assert abs(read_sample(tmp_path / "odd.safetensors").guidance - 6.1) < 1e-6


@pytest.mark.parametrize("key, value", [("seed", "12a"), ("shift", "seven"), ("height", "1.5"), ("frames", ""),
                                        ("steps", "ten")])
def test_malformed_number_metadata_is_a_synvid_error_naming_the_file(tmp_path, key, value):
    """Bad metadata numbers raise the format's own error (what the trainer's stream and verify skip and report),
    naming the file and the field, not a bare ValueError."""
    save_raw(make_sample(4), tmp_path / "bad.safetensors", **{key: value})
    with pytest.raises(SynVidError, match=f"bad.safetensors: .*{key}") as info:
        read_sample(tmp_path / "bad.safetensors")
    assert type(info.value) is SynVidError
    ds_root = tmp_path / "set"
    with SynVidWriter(ds_root, dtype="float32") as w:
        w.write(make_sample(5))
    save_raw(make_sample(4), ds_root / "samples" / "000000.safetensors", **{key: value})
    errors = []
    assert list(SynVidDataset(ds_root).iter_valid(on_error=lambda i, e: errors.append(str(e)))) == []
    assert len(errors) == 1 and key in errors[0]

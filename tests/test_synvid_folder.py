"""SynVid folders under stress (issue 17): several writer processes, rebuild-then-write, SIGKILLed writers, stale
temporary files, entries that disagree with their files, refused samples, command-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accvideo_core.synvid.folder import SynVidWriter, main, rebuild_manifest, verify
from accvideo_core.synvid.format import SynVidDataset, SynVidError, read_sample
from accvideo_core.utils.io import read_state_dict, save_safetensors
from tests.test_synvid_format import make_sample

ROOT = Path(__file__).resolve().parents[1]

# One writer process: waits for the start file, then writes its seeds (sys.argv: folder, start file, seeds...).
WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from accvideo_core.synvid import SynVidWriter
from tests.test_synvid_format import make_sample
root, start, seeds = sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3:]]
while not start.exists():
    time.sleep(0.002)
with SynVidWriter(root, dtype="float32") as w:
    for seed in seeds:
        w.write(make_sample(seed))
        print(seed, flush=True)
"""


def _writers(code_root: Path, folder: Path, tmp: Path, seed_groups: list[list[int]]) -> list[subprocess.Popen]:
    script = tmp / "writer.py"
    script.write_text(WRITER.format(root=str(code_root)))
    return [subprocess.Popen([sys.executable, str(script), str(folder), str(tmp / "go"), *map(str, seeds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
            for seeds in seed_groups]


def _entries_match_files(root: Path) -> list[int]:
    """Seeds of the manifest, after checking every entry names a distinct file holding that seed and prompt."""
    manifest = json.loads((root / "manifest.json").read_text())
    files = [e["file"] for e in manifest["samples"]]
    assert len(files) == len(set(files)), "a file is listed twice"
    for e in manifest["samples"]:
        s = read_sample(root / e["file"])
        assert (s.seed, s.prompt) == (e["seed"], e["prompt"]), e
    return sorted(e["seed"] for e in manifest["samples"])


def test_three_writer_processes_lose_nothing(tmp_path):
    groups = [list(range(k * 100, k * 100 + 8)) for k in range(3)]
    procs = _writers(ROOT, tmp_path / "syn", tmp_path, groups)
    time.sleep(1.0)  # all three are importing / waiting
    (tmp_path / "go").touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    assert _entries_match_files(tmp_path / "syn") == sorted(s for g in groups for s in g)
    assert len(list((tmp_path / "syn" / "samples").glob("*.safetensors"))) == 24
    good, bad = verify(tmp_path / "syn")
    assert (good, bad) == (24, [])


def test_rebuild_then_write_never_reuses_a_live_index(tmp_path):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        for seed in range(4):
            w.write(make_sample(seed))
    bad_file = tmp_path / "samples" / "000001.safetensors"
    bad_file.write_bytes(bad_file.read_bytes()[:-64])
    reports: list[str] = []
    assert len(rebuild_manifest(tmp_path, report=reports.append)["samples"]) == 3
    assert any("000001" in r for r in reports)
    with SynVidWriter(tmp_path, dtype="float32", report=reports.append) as w:
        path = w.write(make_sample(7))
    assert path.name == "000004.safetensors"  # index 3 = len(manifest) is a live sample; 1 still holds a file
    assert _entries_match_files(tmp_path) == [0, 2, 3, 7]
    good, bad = verify(tmp_path)
    assert good == 4 and len(bad) == 1 and "000001.safetensors: on disk but not in the manifest" in bad[0]


def test_verify_checks_every_entry_against_its_file(tmp_path):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        for seed in range(3):
            w.write(make_sample(seed))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["samples"][0]["seed"] = 99                          # says another seed than its file
    manifest["samples"].append(dict(manifest["samples"][1]))     # one file listed twice
    manifest["samples"][2]["bytes"] += 1                         # size differs
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    good, bad = verify(tmp_path)
    assert good == 1 and len(bad) == 3
    assert "manifest says seed 99" in bad[0] and "000000" in bad[0]
    assert "bytes" in bad[1] and "000002" in bad[1]
    assert "listed twice" in bad[2] and "000001" in bad[2]


def test_a_refused_sample_writes_nothing_and_fixes_no_shape(tmp_path):
    nan = make_sample(0)
    nan.latents[0, 0, 0, 0, 0] = float("inf")
    w = SynVidWriter(tmp_path / "syn", dtype="float32")
    with pytest.raises(SynVidError, match="NaN or Inf"):
        w.write(nan)
    assert not (tmp_path / "syn" / "manifest.json").exists()
    assert not list((tmp_path / "syn").glob("samples/*"))
    other_shape = make_sample(1, frames=9)                      # the folder's shape was not fixed by the refusal
    w.write(other_shape)
    assert json.loads((tmp_path / "syn" / "manifest.json").read_text())["latent_shape"] == [16, 3, 4, 6]
    with pytest.raises(SynVidError, match="differs from the data set"):
        w.check({"latent_shape": [16, 2, 4, 6]})                # checked before any sampling


def test_writer_refuses_bad_folders_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynVidError, match="is a file, not a SynVid folder"):
        SynVidWriter(tmp_path / "file")
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "manifest.json").write_text("{not json")
    with pytest.raises(SynVidError, match="unreadable manifest.*rebuild"):
        SynVidWriter(tmp_path / "syn")


def test_same_sample_twice_is_written_once(tmp_path):
    reports: list[str] = []
    with SynVidWriter(tmp_path, dtype="float32", report=reports.append) as w:
        first = w.write(make_sample(5))
        again = w.write(make_sample(5))
        assert w.has(5, "prompt 5") and not w.has(5, "prompt 5", batch_index=1)
    assert first == again and len(SynVidDataset(tmp_path)) == 1 and "not written twice" in reports[0]
    untitled = make_sample(6)
    untitled.prompt = ""  # no prompt text: nothing identifies it, so it is never taken for a duplicate
    with SynVidWriter(tmp_path, dtype="float32") as w:
        assert w.write(untitled) != w.write(untitled) and not w.has(6, "")
    assert len(SynVidDataset(tmp_path)) == 3


def test_stale_temp_files_are_reported_and_removed(tmp_path, capsys):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        w.write(make_sample(0))
    stale = [tmp_path / "samples" / ".000001.safetensors.k2j3.tmp", tmp_path / ".manifest.json.x8a.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert main(["verify", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert all(str(p) in err for p in stale) and not any(p.exists() for p in stale)
    stale[0].write_bytes(b"again")
    reports: list[str] = []
    with SynVidWriter(tmp_path, dtype="float32", report=reports.append) as w:
        w.write(make_sample(1))
    assert not stale[0].exists() and any(".000001.safetensors.k2j3.tmp" in r for r in reports)
    stale[1].write_bytes(b"again")
    assert main(["rebuild", str(tmp_path)]) == 0 and not stale[1].exists()


def test_sigkilled_writer_loses_no_written_sample(tmp_path):
    """SIGKILL a writer at random moments; every sample it reported is listed, no partial file has a sample name,
    the next writer finds the lock free, removes the temporary files and lists a file written just before the
    kill whose manifest update was lost."""
    folder = tmp_path / "syn"
    (tmp_path / "go").touch()
    for round_ in range(4):
        proc, = _writers(ROOT, folder, tmp_path, [list(range(1000 * round_, 1000 * round_ + 400))])
        reported = [int(proc.stdout.readline()) for _ in range(2 + 3 * round_)]
        time.sleep(0.013 * round_)  # kill at different moments of a write
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        reported += [int(s) for s in out.split()]
        with SynVidWriter(folder, dtype="float32", report=lambda msg: None) as w:
            seeds = {seed for seed, _, _ in w.done()}
        assert set(reported) <= seeds
        assert not list(folder.glob("**/.*.tmp"))
    good, bad = verify(folder)
    assert bad == [] and good == len(SynVidDataset(folder))


def test_format_cli_gives_one_line_and_exit_2_for_unusable_input(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    for args in (["verify", str(tmp_path / "afile")], ["verify", str(tmp_path / "empty")],
                 ["rebuild", str(tmp_path / "missing")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(tmp_path) in err


def test_the_documented_module_command_runs(tmp_path):
    with SynVidWriter(tmp_path, dtype="float32") as w:
        w.write(make_sample(0))
    out = subprocess.run([sys.executable, "-m", "accvideo_core.synvid.format", "verify", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "1 good, 0 bad" in out.stdout, out.stderr


def test_exclusive_atomic_write_never_replaces(tmp_path):
    target = save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(FileExistsError):
        save_safetensors({"x": torch.ones(2)}, target, overwrite=False)
    assert read_state_dict(target)["x"].sum() == 0 and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]

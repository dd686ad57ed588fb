"""CI tier for the node pack (no ComfyUI): import safety, schema conventions, published input order, and the core
helpers the nodes delegate to. Node execution inside ComfyUI is covered by tests/integration/."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from accvideo_core.flow_bridge import DenoiserVelocity
from accvideo_core.latents import to_model_space, to_vae_space, video_size_of_latent
from accvideo_core.sampling import euler_flow, flow_sigmas
from accvideo_core.synvid.format import STORE_MODES, SynVidDataset
from accvideo_core.synvid.record import TrajectoryRecorder
from accvideo_core.video import read_mp4_metadata, video_to_frames, write_mp4
from tests.helpers import count_frames
from tests.integration import comfy_standin

ROOT = Path(__file__).resolve().parents[1]

# The published contract: saved workflows store widget values by position. Append new inputs at the end only.
PUBLISHED_INPUTS = {
    "AccVideoSampler": ["model", "positive", "latent_image", "seed", "steps", "shift", "guidance",
                        "guidance_source"],
    "AccVideoSchedule": ["schedule", "steps", "shift"],
    "AccVideoLoraLoader": ["model", "lora_name", "strength"],
    "AccVideoLoraExtract": ["base_model", "distilled_model", "rank", "filename", "dtype"],
    "AccVideoVAEDecode": ["vae", "samples", "memory_budget", "mode"],
    "AccVideoTrajectoryDump": ["model", "positive", "latent_image", "seed", "steps", "shift", "guidance",
                               "guidance_source", "store", "filename_prefix", "model_name", "dtype", "prompt"],
    "AccVideoSaveVideo": ["images", "fps", "filename_prefix", "crf"],
    "AccVideoPromptList": ["prompts", "first_seed"],
    "AccVideoTrain": ["model", "synvid_folder", "steps", "lora_rank", "learning_rate", "lambda_adv",
                      "training_seed", "output_name", "offload_activations", "trajectories"],
}


def test_package_imports_outside_comfyui_without_registering():
    """ComfyUI imports the pack by file location; outside ComfyUI that must work and register nothing."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('accvideo_pack', {str(ROOT / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['accvideo_pack'] = m; spec.loader.exec_module(m)\n"
        "import accvideo_core, accvideo_core.sampling, accvideo_core.flow_bridge, accvideo_core.video\n"
        "assert not hasattr(m, 'comfy_entrypoint'), 'registered outside ComfyUI'\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_core_never_imports_comfyui():
    banned = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "node_helpers", "latent_preview", "nodes"}
    for path in (ROOT / "accvideo_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            hit = [n for n in names if n.split(".")[0] in banned]
            assert not hit, f"{path.relative_to(ROOT)} imports {hit}"


def test_nodes_import_comfy_api_only_through_the_pinned_version():
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comfy_api"):
                assert node.module == "comfy_api.v0_0_2", f"{path.name}: import {node.module}, pin v0_0_2"


@pytest.fixture(scope="module")
def schemas():
    return comfy_standin.schemas()


def test_schemas_follow_the_conventions(schemas):
    assert set(schemas) == set(PUBLISHED_INPUTS)
    for nid, s in schemas.items():
        assert nid.startswith("AccVideo") and s.kwargs["category"].startswith("AccVideo/"), nid
        assert s.kwargs["display_name"].startswith("AccVideo ") and len(s.kwargs["description"]) > 60, nid
        for inp in s.inputs:
            assert len(inp.kwargs.get("tooltip") or "") > 10, f"{nid}.{inp.id} has no tooltip"
        assert [i.id for i in s.inputs] == PUBLISHED_INPUTS[nid], f"{nid}: inputs were reordered or renamed"


def test_sampler_defaults_are_the_official_accvideo_settings(schemas):
    kw = {i.id: i.kwargs for i in schemas["AccVideoSampler"].inputs}
    assert (kw["steps"]["default"], kw["shift"]["default"], kw["guidance"]["default"]) == (5, 7.0, 6.0)
    assert kw["seed"]["control_after_generate"] is True
    dump = {i.id: i.kwargs for i in schemas["AccVideoTrajectoryDump"].inputs}
    assert (dump["steps"]["default"], dump["shift"]["default"], dump["guidance"]["default"]) == (50, 7.0, 6.0)
    assert dump["prompt"].get("optional") and dump["prompt"].get("force_input")
    assert "frame-causal" in schemas["AccVideoVAEDecode"].kwargs["description"]


def test_dump_rejects_prefixes_that_leave_the_output_folder(tmp_path):
    with comfy_standin.standin() as pkg:
        sys.modules["folder_paths"].get_output_directory = lambda: str(tmp_path / "output")
        from nodes.sampling import dataset_folder

        out_dir, root = dataset_folder("synvid/run1")
        assert root == (tmp_path / "output" / "synvid" / "run1").resolve() and out_dir in root.parents
        for bad in ("../escape", "/etc/synvid", "synvid/../../x", "", "."):
            with pytest.raises(ValueError, match="filename_prefix"):
                dataset_folder(bad)
        assert pkg.NODES


def test_vae_budget_choices_parse():
    with comfy_standin.standin():
        from nodes.vae import BUDGETS, budget_bytes

        assert budget_bytes("auto") == "auto" and budget_bytes("4GB") == 4 * 2**30
        assert all(isinstance(budget_bytes(b), (int, str)) for b in BUDGETS)
        with pytest.raises(ValueError, match="memory_budget"):
            budget_bytes("3TB")


def test_denoiser_velocity_recovers_the_flow_velocity_and_drives_euler():
    """A CONST denoiser (denoised = x - sigma * v) wrapped by DenoiserVelocity reproduces direct Euler sampling."""
    w = torch.randn(4, 4)

    def velocity(x, sigma):
        return torch.tanh(x @ w) * (1 + sigma)

    def denoise(x, sigma_batch):
        assert sigma_batch.shape == (x.shape[0],)
        return x - sigma_batch.view(-1, 1) * velocity(x, float(sigma_batch[0]))

    calls = []
    wrapped = DenoiserVelocity(denoise, before_call=lambda: calls.append(1))
    x0 = torch.randn(3, 4)
    sigmas = flow_sigmas(5, 7.0)
    direct = euler_flow(velocity, x0, sigmas)
    via = euler_flow(wrapped, x0, sigmas)
    torch.testing.assert_close(via, direct, atol=1e-5, rtol=1e-5)
    assert len(calls) == 5 and wrapped.last_denoised is not None
    with pytest.raises(ValueError, match="sigma"):
        wrapped(x0, 0.0)


def test_trajectory_recorder_keeps_the_requested_steps():
    sigmas = flow_sigmas(10, 7.0)
    rec = TrajectoryRecorder([0, 5, 10])
    x0 = torch.randn(2, 16, 1, 2, 2)
    rec.start(x0)
    xs = []
    out = euler_flow(lambda x, s: -x, x0, sigmas, callback=lambda info: (rec.on_step(info), xs.append(info["x"])))
    stacked = rec.stacked()
    assert stacked.shape == (3, 2, 16, 1, 2, 2)
    torch.testing.assert_close(stacked[0], x0)
    torch.testing.assert_close(stacked[1], xs[4])
    torch.testing.assert_close(stacked[2], out)
    partial = TrajectoryRecorder([0, 3])
    partial.start(x0)
    with pytest.raises(RuntimeError, match="missing steps"):
        partial.stacked()


def test_latent_validation_messages():
    assert video_size_of_latent(torch.zeros(1, 16, 24, 68, 120)) == (93, 544, 960)
    with pytest.raises(ValueError, match="multiple of 16"):
        video_size_of_latent(torch.zeros(1, 16, 3, 67, 120))
    with pytest.raises(ValueError, match="16 latent channels"):
        video_size_of_latent(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="EmptyHunyuanLatentVideo"):
        video_size_of_latent(torch.zeros(1, 16, 8, 8))


def test_check_video_latent_reads_the_empty_latent_widgets():
    with comfy_standin.standin():
        from nodes._comfy import check_video_latent

        latent = {"samples": torch.zeros(1, 16, 8, 4, 4)}
        prompt = {"1": {"class_type": "EmptyHunyuanLatentVideo",
                        "inputs": {"width": 32, "height": 32, "length": 30, "batch_size": 1}},
                  "2": {"class_type": "AccVideoSampler", "inputs": {"latent_image": ["1", 0]}}}
        with pytest.raises(ValueError, match=r"latent_image: frames must be 4k\+1.*got 30, try 29 or 33"):
            check_video_latent(latent, prompt, "2", "latent_image")
        prompt["1"]["inputs"]["length"] = 29
        check_video_latent(latent, prompt, "2", "latent_image")
        check_video_latent(latent, None, None, "latent_image")


def test_video_to_frames_matches_comfyui_image_convention():
    video = torch.rand(2, 3, 5, 4, 6) * 2.4 - 1.2
    frames = video_to_frames(video)
    assert frames.shape == (10, 4, 6, 3)
    torch.testing.assert_close(frames[7], ((video[1, :, 2] + 1) / 2).clamp(0, 1).permute(1, 2, 0))


def test_mp4_has_all_frames_and_the_metadata(tmp_path):
    prompt = {"3": {"class_type": "AccVideoSampler", "inputs": {"seed": 1, "text": "a=b; c\nd\\e"}}}
    workflow = {"nodes": [{"id": 1, "widgets_values": ["x;y=z#"]}], "version": 0.4}
    path = write_mp4(torch.rand(13, 32, 48, 3), tmp_path / "v.mp4", fps=24,
                     metadata={"prompt": json.dumps(prompt), "workflow": json.dumps(workflow)})
    assert count_frames(path) == 13
    meta = read_mp4_metadata(path)
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == workflow
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_mp4_keeps_a_workflow_larger_than_one_command_line_argument(tmp_path, monkeypatch):
    """Issue 17: a workflow over 128 KiB (Linux's limit for one argv string) failed with 'Argument list too long'
    and the metadata was visible in ``ps``. It now goes through an ffmetadata file, whole."""
    import subprocess as sp

    secret = "unique-prompt-text-4711"
    workflow = {"nodes": [{"id": i, "widgets_values": [f"{secret} node {i} =;#\\ " + "x" * 200]}
                          for i in range(1200)]}
    text = json.dumps(workflow)
    assert len(text.encode()) > 200 * 1024
    commands = []
    real_run = sp.run
    monkeypatch.setattr(sp, "run", lambda cmd, *a, **k: commands.append(cmd) or real_run(cmd, *a, **k))
    path = write_mp4(torch.rand(5, 16, 16, 3), tmp_path / "big.mp4", metadata={"workflow": text, "prompt": secret})
    monkeypatch.setattr(sp, "run", real_run)
    assert commands and not any(secret in arg for cmd in commands for arg in cmd), "metadata on the command line"
    meta = read_mp4_metadata(path)
    assert meta["workflow"] == text and meta["prompt"] == secret
    assert count_frames(path) == 5


def test_schedule_node_gives_the_official_sigmas():
    """AccVideo Schedule runs on the core only; its teacher steps 0, 10, ..., 50 are the AccVideo sigmas."""
    with comfy_standin.standin():
        from nodes.sampling import SCHEDULES, AccVideoSchedule

        student = AccVideoSchedule.execute(SCHEDULES[0], 123, 7.0).args[0]
        teacher = AccVideoSchedule.execute(SCHEDULES[1], 123, 7.0).args[0]
        custom = AccVideoSchedule.execute(SCHEDULES[2], 8, 3.0).args[0]
        with pytest.raises(ValueError, match="schedule must be one of"):
            AccVideoSchedule.execute("fast", 5, 7.0)
    want = torch.tensor([1.0, 0.965517, 0.913043, 0.823529, 0.636364, 0.0])
    torch.testing.assert_close(student, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher[::10], student, atol=1e-6, rtol=0)
    assert teacher.shape == (51,) and custom.shape == (9,)
    torch.testing.assert_close(custom, flow_sigmas(8, 3.0))


# ------------------------------------------------------------------------- node logic with ComfyUI's runtime faked
class _FakeModel:
    """What the nodes read from a ComfyUI MODEL outside sampling (hash, size estimate)."""

    def __init__(self, hidden: int = 64):
        net = torch.nn.Linear(2, 2)
        torch.nn.init.ones_(net.weight), torch.nn.init.zeros_(net.bias)  # the same teacher (hash) every time
        net.hidden_size, net.patch_size = hidden, [1, 2, 2]
        self.model = types.SimpleNamespace(diffusion_model=net, manual_cast_dtype=None,
                                           get_dtype=lambda: torch.float32)
        self.load_device = torch.device("cpu")


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """The node package with ComfyUI's sampling replaced by an Euler run of a simple velocity (calls counted)."""
    with comfy_standin.standin() as pkg:
        from nodes import _comfy

        fp = sys.modules["folder_paths"]
        fp.get_output_directory = lambda: str(tmp_path / "output")
        fp.get_full_path = lambda folder, name: None
        calls = []

        def sample(model, positive, latent, seed, sigmas, *, on_start=None, on_step=None):
            calls.append(float(sigmas[1]))
            x = torch.randn(latent["samples"].shape, generator=torch.manual_seed(seed))  # prepare_noise
            if on_start:
                on_start(x)
            x = euler_flow(lambda z, s: -0.5 * z, x, sigmas, callback=on_step, check_finite=True)
            return {"samples": to_vae_space(x)}

        monkeypatch.setattr(_comfy, "sample_with_comfy_model", sample)
        monkeypatch.setattr(_comfy, "with_guidance", lambda positive, g: positive)
        monkeypatch.setattr(_comfy, "check_fits", lambda *a, **k: None)
        sampling = importlib.import_module("nodes.sampling")
        for node in (sampling.AccVideoSampler, sampling.AccVideoTrajectoryDump):
            monkeypatch.setattr(node, "hidden", types.SimpleNamespace(prompt=None, unique_id=None), raising=False)
        yield types.SimpleNamespace(nodes=sampling, calls=calls, output=tmp_path / "output", pkg=pkg)


def _positive():
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 7, 32, generator=g), {"pooled_output": torch.randn(1, 24, generator=g)}]]


def _dump(env, *, seed=3, steps=10, shift=7.0, guidance=6.0, prefix="synvid/run", frames=5, batch=1, **kw):
    latent = {"samples": torch.zeros(batch, 16, (frames - 1) // 4 + 1, 4, 6)}
    return env.nodes.AccVideoTrajectoryDump.execute(
        _FakeModel(), _positive(), latent, seed, steps, shift, guidance, "widget", kw.get("store", "key latents"),
        prefix, "teacher.safetensors", "float32", kw.get("prompt", "a fox"))


def test_dump_node_writes_samples_once_even_when_rerun(fake_comfy):
    env = fake_comfy
    out = _dump(env, batch=2)
    files = out.ui["text"]
    assert len(env.calls) == 1 and len(files) == 2
    ds = SynVidDataset(env.output / "synvid/run")
    samples = [ds.load(i) for i in range(2)]
    assert [s.extra["batch_index"] for s in samples] == ["0", "1"]
    torch.testing.assert_close(samples[1].latents[-1], to_model_space(out.args[0]["samples"][1]))
    again = _dump(env, batch=2)  # e.g. the builder re-queued it after the server died before answering
    assert len(env.calls) == 1, "sampled again although every sample is in the folder"
    assert again.ui["text"] == files and len(SynVidDataset(env.output / "synvid/run")) == 2
    torch.testing.assert_close(again.args[0]["samples"], out.args[0]["samples"])
    _dump(env, batch=2, prompt="another prompt")
    assert len(env.calls) == 2 and len(SynVidDataset(env.output / "synvid/run")) == 4


def test_weights_hash_is_never_served_for_another_model(fake_comfy, monkeypatch):
    """A loaded teacher's hash is cached per model object, not per id(): ComfyUI frees models and a new one may get
    a freed one's id (simulated here by an id() that gives every object the same number)."""
    import gc
    import weakref

    from accvideo_core.synvid.format import state_dict_sha256

    class Loaded:  # ComfyUI's MODEL: a patcher whose .model (a torch Module, like BaseModel) holds the network
        def __init__(self, value: float):
            self.model = torch.nn.Module()
            self.model.diffusion_model = torch.nn.Linear(2, 2)
            torch.nn.init.constant_(self.model.diffusion_model.weight, value)

    monkeypatch.setattr(fake_comfy.nodes, "id", lambda obj: 1, raising=False)
    first = Loaded(1.0)
    h1 = fake_comfy.nodes._source_model_hash(first, "")
    assert h1 == state_dict_sha256(first.model.diffusion_model.state_dict())
    assert fake_comfy.nodes._source_model_hash(first, "") == h1
    gone = weakref.ref(first.model)
    del first
    gc.collect()
    assert gone() is None, "the hash cache keeps a freed model alive"
    second = Loaded(2.0)
    assert fake_comfy.nodes._source_model_hash(second, "") == state_dict_sha256(
        second.model.diffusion_model.state_dict()) != h1


@pytest.mark.parametrize("setup,kwargs,message", [
    (lambda out: (out / "synvid").mkdir(parents=True) or (out / "synvid/run").write_text("x"), {}, "is a file"),
    (lambda out: (out / "synvid/run").mkdir(parents=True) or (out / "synvid/run/manifest.json").write_text("{"), {},
     "unreadable manifest"),
    (None, {"frames": 9}, "latent_shape=.* differs from the data set"),
    (None, {"steps": 20}, "steps=20 differs from the data set"),
    (None, {"guidance": float("nan")}, "guidance must be a finite number"),
    (None, {"shift": float("inf")}, "shift must be a finite number"),
])
def test_dump_node_refuses_before_sampling(fake_comfy, setup, kwargs, message):
    env = fake_comfy
    if setup is None:
        _dump(env)  # a data set of 5-frame, 10-step samples
    else:
        setup(env.output)
    before = len(env.calls)
    with pytest.raises(ValueError, match=message):
        _dump(env, seed=11, **kwargs)
    assert len(env.calls) == before, "the teacher ran before the input was refused"


def test_sampler_and_schedule_refuse_non_finite_values(fake_comfy):
    env = fake_comfy
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    for shift, guidance, message in ((float("nan"), 6.0, "shift"), (7.0, float("inf"), "guidance")):
        with pytest.raises(ValueError, match=f"{message} must be a finite number"):
            env.nodes.AccVideoSampler.execute(_FakeModel(), _positive(), latent, 1, 5, shift, guidance, "widget")
        with pytest.raises(ValueError, match="shift must be a finite number"):
            env.nodes.AccVideoSchedule.execute(env.nodes.SCHEDULES[2], 5, float("nan"))
    assert env.calls == []
    env.nodes.AccVideoSampler.execute(_FakeModel(), _positive(), latent, 1, 5, 7.0, 6.0, "widget")
    assert len(env.calls) == 1


def test_size_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    """8192x8192 at 93 frames needs more than any device holds: a clear error, nothing allocated."""
    mm = types.ModuleType("comfy.model_management")
    mm.get_total_memory = lambda device: 80 * 2**30
    mm.get_free_memory = lambda device: 16 * 2**30
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    with comfy_standin.standin():
        from nodes._comfy import check_fits

        huge = {"samples": torch.empty(1, 16, 24, 1024, 1024, device="meta")}
        with pytest.raises(ValueError, match=r"latent_image 1x16x24x1024x1024 is too large.*GiB"):
            check_fits(_FakeModel(hidden=3072), huge)
        check_fits(_FakeModel(hidden=3072), {"samples": torch.empty(1, 16, 24, 68, 120, device="meta")})
        with pytest.raises(ValueError, match="recording the trajectory"):
            check_fits(_FakeModel(hidden=64), {"samples": torch.empty(1, 16, 2, 4, 6, device="meta")},
                       host_bytes=1 << 60)


def test_store_modes_have_one_vocabulary(schemas):
    """The node shows the core's store modes by their published labels; the CLI and manifest use the keys."""
    dump = {i.id: i.kwargs for i in schemas["AccVideoTrajectoryDump"].inputs}
    assert dump["store"]["options"] == list(STORE_MODES.values()) == ["key latents", "full trajectory"]
    assert list(STORE_MODES) == ["key", "all"]


def test_save_video_never_replaces_a_video_another_server_wrote(tmp_path):
    """Two servers sharing output/ can pick the same counter: the second video takes the next name."""
    with comfy_standin.standin():
        fp = sys.modules["folder_paths"]
        fp.get_output_directory = lambda: str(tmp_path)
        fp.get_save_image_path = lambda prefix, out, w, h: (str(tmp_path), "clip", 1, "", prefix)
        cli_args = types.ModuleType("comfy.cli_args")
        cli_args.args = types.SimpleNamespace(disable_metadata=True)
        comfy = types.ModuleType("comfy")
        comfy.cli_args = cli_args
        saved = {k: sys.modules.get(k) for k in ("comfy", "comfy.cli_args")}
        sys.modules.update({"comfy": comfy, "comfy.cli_args": cli_args})
        try:
            from nodes.video import AccVideoSaveVideo

            first = AccVideoSaveVideo.execute(torch.zeros(3, 16, 16, 3), 24.0, "clip", 19)
            second = AccVideoSaveVideo.execute(torch.ones(3, 16, 16, 3), 24.0, "clip", 19)
        finally:
            for k, v in saved.items():
                sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v)
    names = [r.ui["images"][0]["filename"] for r in (first, second)]
    assert names == ["clip_00001_.mp4", "clip_00002_.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names

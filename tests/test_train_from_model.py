"""CI tier for ``accvideo_core.train.from_model`` (the AccVideo Train node's core glue) and the train nodes'
schemas through the stand-in; no ComfyUI. The node inside a real ComfyUI: tests/integration/test_comfyui_train.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from accvideo_core.models.key_maps import comfy_to_original_key, original_to_comfy_key
from accvideo_core.models.loading import save_transformer
from accvideo_core.synvid.dump import dump_synvid
from accvideo_core.testing import tiny_inputs, tiny_transformer
from accvideo_core.train.from_model import (comfy_model_weights, node_config, run_folder, run_key, shared_tensor,
                                            train_in_process, transformer_from_state_dict)
from accvideo_core.train.loop import Interrupted, Trainer
from accvideo_core.utils.io import read_state_dict
from tests.integration import comfy_standin


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _comfy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as ComfyUI holds them: internal key names, tensors made in inference mode."""
    with torch.inference_mode():
        return {original_to_comfy_key(k): v.clone() for k, v in model.state_dict().items()}


def test_shared_tensor_aliases_inference_tensors_for_autograd():
    with torch.inference_mode():
        w = torch.randn(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        torch.nn.functional.linear(x, w).sum().backward()  # why the alias is needed
    alias = shared_tensor(w)
    assert not torch.is_inference(alias) and alias.data_ptr() == w.data_ptr() and torch.equal(alias, w)
    torch.nn.functional.linear(x, alias).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 3))


def test_transformer_from_comfy_state_shares_every_tensor_and_computes_the_same():
    reference = tiny_transformer(seed=3)
    sd = _comfy_state(reference)
    ours = transformer_from_state_dict(sd, device="cpu")
    pointers = {v.data_ptr() for v in sd.values()}
    assert all(p.data_ptr() in pointers for p in ours.parameters()), "a weight was copied"
    inputs = tiny_inputs(reference.config)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs, guidance=6.0), reference(**inputs, guidance=6.0), rtol=0, atol=0)
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert next(transformer_from_state_dict(half, device="cpu").parameters()).dtype == torch.bfloat16


def test_fp8_weights_of_the_host_stay_fp8_and_shared():
    """ComfyUI's weight_dtype fp8_e4m3fn: the LoRA mode trains on those weights as they are (no copy); the full
    mode refuses them (tests/test_train_lora.py)."""
    sd = _comfy_state(tiny_transformer(seed=3))
    key = next(k for k in sd if k.endswith("img_attn.qkv.weight"))
    sd[key] = sd[key].to(torch.float8_e4m3fn)
    model = transformer_from_state_dict(sd, device="cpu")
    weight = model.get_submodule("double_blocks.0.img_attn_qkv").weight
    assert weight.dtype == torch.float8_e4m3fn and weight.data_ptr() == sd[key].data_ptr()


def test_student_file_maps_to_comfy_model_keys(tmp_path):
    model = tiny_transformer(seed=4)
    save_transformer(model, tmp_path / "student.safetensors", dtype=torch.float32)
    weights = comfy_model_weights(tmp_path / "student.safetensors")
    original = model.state_dict()
    assert {comfy_to_original_key(k.removeprefix("diffusion_model.")) for k in weights} == set(original)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.weight" in weights
    for key, value in weights.items():
        assert torch.equal(value, original[comfy_to_original_key(key.removeprefix("diffusion_model."))])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """7 trajectories (10 steps, 1 frame at 16x16) of the tiny teacher: 3 for training, 4 held out."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("from_model") / "synvid"
    g = torch.Generator().manual_seed(1)
    emb = {"text_states": torch.randn(3, 5, 40, generator=g), "text_mask": torch.ones(3, 5, dtype=torch.long),
           "pooled": torch.randn(3, 24, generator=g), "prompts": ["a", "b", "c"]}
    dump_synvid(tiny_transformer(seed=0), emb, root, num=7, frames=1, height=16, width=16, steps=10,
                dtype="float32", progress=lambda msg: None)
    return root


def _cfg(data: Path, **kw):
    cfg = node_config(data_root=data, steps=kw.pop("steps", 3), lora_rank=kw.pop("lora_rank", 4), lr=3e-3,
                      lambda_adv=0.1, seed=0, device="cpu", samples=7, offload=kw.pop("offload", False))
    cfg.loss.head_width, cfg.loss.head_groups, cfg.log.plot = 16, 8, False
    return cfg


def test_node_config_takes_the_inputs_and_batches_all_training_samples(data):
    cfg = _cfg(data)
    assert (cfg.optim.steps, cfg.model.lora_rank, cfg.optim.lr, cfg.loss.lambda_adv) == (3, 4, 3e-3, 0.1)
    assert cfg.optim.total_batch == 3 and cfg.data.val_samples == 4 and cfg.runtime.fsdp == "off"
    assert not node_config(data_root=data, steps=1, lora_rank=0, lr=1e-5, lambda_adv=0.0, seed=0, device="cpu",
                           samples=100).loss.adversarial
    assert node_config(data_root=data, steps=1, lora_rank=0, lr=1e-5, lambda_adv=0.0, seed=0, device="cpu",
                       samples=100).optim.total_batch == 32


def test_run_key_changes_with_every_input_but_not_the_folder(data, tmp_path):
    teacher = tiny_transformer(seed=0)
    base = run_folder(tmp_path, "n", _cfg(data), teacher)
    moved = _cfg(data)
    moved.log.out_dir = "elsewhere"
    assert run_folder(tmp_path, "n", moved, teacher) == base
    assert run_folder(tmp_path, "n", _cfg(data, steps=4), teacher) != base
    assert run_folder(tmp_path, "n", _cfg(data), tiny_transformer(seed=1)) != base
    assert run_key(_cfg(data), "teacher", "data a") != run_key(_cfg(data), "teacher", "data b")
    # offloading the checkpoints does not change the result (tests/test_train_lora.py): switching it on to get an
    # interrupted run through resumes that run
    offloaded = _cfg(data, offload=True)
    assert offloaded.model.offload_checkpoints and run_folder(tmp_path, "n", offloaded, teacher) == base
    merged = _cfg(data)   # the node's LoRA runs skip the merged export; a run that wrote it is still reused
    assert not merged.log.export_merged and _cfg(data, lora_rank=0).log.export_merged
    merged.log.export_merged = True
    assert run_folder(tmp_path, "n", merged, teacher) == base


def test_interrupt_checkpoints_and_a_rerun_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch):
    """An interrupt inside iteration 2 stops at the next micro-batch: the checkpoint holds the trainer after the
    segment updates that iteration had finished; the rerun makes the rest of it and ends like an uninterrupted run.
    Inside iterations the host gets notes of where they are (here after every micro-batch)."""
    from accvideo_core.train.from_model import HostedTrainer

    monkeypatch.setattr(HostedTrainer, "NOTE_SECONDS", 0.0)
    teacher = tiny_transformer(seed=0)
    lines, polls, notes = [], [], []

    def stop_inside_iteration_2() -> bool:
        # polled after iteration 1, then before each of the 3 micro-batches of each of the 5 segment updates:
        # the 9th poll while one progress line is out is update 3's second micro-batch (updates 1 and 2 are done)
        polls.append(len(lines))
        return polls.count(1) == 9

    with pytest.raises(Interrupted, match="interrupted in iteration 2 after 2 of its segment updates"):
        train_in_process(_cfg(data), teacher, tmp_path / "run", should_stop=stop_inside_iteration_2,
                         on_progress=lambda step, total, line: lines.append((step, total, line)),
                         on_note=notes.append)
    assert [(s, t) for s, t, _ in lines] == [(1, 3)] and "ETA" in lines[0][2] and "traj" in lines[0][2]
    assert notes[0] == "iteration 1/3: segment k=4 done for micro-batch 1/3"
    assert notes[-1] == f"{lines[0][2]} | iteration 2/3: segment k=2 done for micro-batch 1/3"  # then the stop
    latest = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert latest == {"step": 1, "path": "step_0000001_update2"}
    resumed = train_in_process(_cfg(data), teacher, tmp_path / "run")
    assert resumed.trained and resumed.resumed_from == 1
    # the same trainer as `python -m accvideo_core.train`: one uninterrupted plain Trainer run, same config
    plain = _cfg(data)
    plain.log.out_dir = str(tmp_path / "plain")
    Trainer(plain, teacher=tiny_transformer(seed=0)).run()
    got, want = read_state_dict(resumed.files["student_lora"]), read_state_dict(tmp_path / "plain/student_lora"
                                                                                              ".safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    rows = [[{k: v for k, v in json.loads(x).items() if k != "time"} for x in (folder / "metrics.jsonl").open()]
            for folder in (tmp_path / "run", tmp_path / "plain")]
    assert rows[0] == rows[1]  # iteration 2's losses include those of its two updates made before the interrupt
    # a finished run with the same key is reused, not retrained
    calls = []
    again = train_in_process(_cfg(data), teacher, tmp_path / "run", should_stop=lambda: calls.append(1) or False)
    assert not again.trained and again.files == resumed.files and not calls and again.val == resumed.val


# ------------------------------------------------------------------------------------- node schemas (stand-in)
def test_a_run_larger_than_the_gpu_warns_in_the_console_and_the_node(data, tmp_path, monkeypatch, capsys):
    """On a GPU the trainer compares the estimate of its run with the device's memory (here a CPU run told its
    device holds 1 kB): a warning naming what would fit, printed and shown in the node's text before the first
    iteration; the same text goes into an out-of-memory error. A run that fits warns nothing."""
    from accvideo_core.train import loop
    from accvideo_core.train.from_model import HostedTrainer

    notes: list[str] = []

    def cfg(name: str):
        c = _cfg(data, steps=1)
        c.log.out_dir = str(tmp_path / name)
        return c

    monkeypatch.setattr(loop, "device_memory_gb", lambda device: 1e-6)
    trainer = HostedTrainer(cfg("small"), teacher=tiny_transformer(seed=0), on_progress=lambda *a: None,
                            should_stop=lambda: False, on_note=notes.append)
    assert trainer.memory_warning == trainer.memory_note and "more than the device's 0.0 GB" in trainer.memory_note
    assert notes == [f"warning: {trainer.memory_warning}"] and "offload_activations on" in notes[0]
    assert f"warning: {trainer.memory_warning}" in capsys.readouterr().err
    monkeypatch.setattr(loop, "device_memory_gb", lambda device: 1000.0)
    notes.clear()
    roomy = HostedTrainer(cfg("roomy"), teacher=tiny_transformer(seed=0), on_progress=lambda *a: None,
                          should_stop=lambda: False, on_note=notes.append)
    assert roomy.memory_warning == "" and "the device has 1000.0 GB" in roomy.memory_note and notes == []


def test_train_node_lists_synvid_folders_and_refuses_paths_leaving_the_output(tmp_path):
    out = tmp_path / "output"
    for folder in ("synvid/a", "synvid/deep/b", "accvideo_runs/x_1"):
        (out / folder).mkdir(parents=True)
        (out / folder / "manifest.json").write_text("{}")
    (out / "not_synvid").mkdir()
    with comfy_standin.standin():
        sys.modules["folder_paths"].get_output_directory = lambda: str(out)
        from nodes.train import AccVideoPromptList, AccVideoTrain, synvid_folders

        assert synvid_folders() == ["synvid/a", "synvid/deep/b"]
        options = next(i for i in AccVideoTrain.define_schema().inputs if i.id == "synvid_folder").kwargs["options"]
        assert options == ["synvid/a", "synvid/deep/b"]
        assert AccVideoTrain.validate_inputs(["synvid/not_yet_written"]) is True  # the dump may write it later
        assert "leaves the output folder" in AccVideoTrain.validate_inputs(["../elsewhere"])
        out_list = AccVideoPromptList.execute("a fox\n\n  a whale  \n", 10)
        assert out_list.args == (["a fox", "a whale"], [10, 11])
        with pytest.raises(ValueError, match="one prompt per line"):
            AccVideoPromptList.execute(" \n", 0)


def test_saved_files_are_numbered_never_overwritten(tmp_path):
    with comfy_standin.standin():
        from nodes.lora import save_numbered

        def write(path: str) -> None:
            with open(path, "x") as fh:   # exclusive creation, like atomic_path(overwrite=False)
                fh.write("new")

        (tmp_path / "s.safetensors").write_text("old")
        assert save_numbered(write, str(tmp_path), "s.safetensors") == "s_00001.safetensors"
        assert save_numbered(write, str(tmp_path), "s.safetensors") == "s_00002.safetensors"
        assert (tmp_path / "s.safetensors").read_text() == "old"


def test_node_interrupt_consumed_by_comfys_progress_hook_still_checkpoints(data, tmp_path, monkeypatch):
    """ComfyUI's progress hook raises (and clears) a pending interrupt; the node hands it back to the trainer, which
    finishes the iteration and writes its checkpoint before the node raises ComfyUI's interrupt."""
    import types

    state = {"flag": False}

    class InterruptProcessingException(Exception):
        pass

    def throw_if_interrupted() -> None:   # comfy.model_management's: raise and clear
        if state["flag"]:
            state["flag"] = False
            raise InterruptProcessingException()

    class ProgressBar:   # comfy.utils.ProgressBar with ComfyUI's hook (main.py) behind update_absolute
        def __init__(self, total: int):
            self.total = total

        def update_absolute(self, value: int, total: int | None = None) -> None:
            if value == 1:
                state["flag"] = True   # the user cancels during iteration 1
            throw_if_interrupted()

    mm = types.SimpleNamespace(InterruptProcessingException=InterruptProcessingException,
                               processing_interrupted=lambda: state["flag"],
                               interrupt_current_processing=lambda value=True: state.update(flag=value),
                               throw_exception_if_processing_interrupted=throw_if_interrupted,
                               soft_empty_cache=lambda: None)
    comfy = types.SimpleNamespace(model_management=mm, utils=types.SimpleNamespace(ProgressBar=ProgressBar))
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", comfy.utils),
                         ("server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=None)))):
        monkeypatch.setitem(sys.modules, name, module)
    with comfy_standin.standin():
        from nodes.train import _train

        with pytest.raises(InterruptProcessingException):
            _train(_cfg(data), tiny_transformer(seed=0), tmp_path / "run", "7")
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 1
    assert not state["flag"], "ComfyUI's interrupt flag was left set"


def test_a_reused_run_returns_the_file_it_saved_instead_of_a_second_copy(tmp_path):
    from accvideo_core.train.from_model import TrainResult

    run, loras = tmp_path / "run", tmp_path / "loras"
    run.mkdir(), loras.mkdir()
    (run / "student_lora.safetensors").write_bytes(b"lora")
    (loras / "mine.safetensors").write_bytes(b"someone else's")
    result = TrainResult(run, {"student_lora": str(run / "student_lora.safetensors")}, {}, trained=True)
    with comfy_standin.standin():
        sys.modules["folder_paths"].get_folder_paths = lambda kind: [str(loras)] if kind == "loras" else []
        from nodes.train import _save

        assert _save(result, "mine", lora=True) == "mine_00001.safetensors"
        assert _save(result, "mine", lora=True) == "mine_00001.safetensors"   # e.g. after a restart
        assert sorted(p.name for p in loras.iterdir()) == ["mine.safetensors", "mine_00001.safetensors"]
        (loras / "mine_00001.safetensors").unlink()   # the user deleted it: saved again
        assert _save(result, "mine", lora=True) == "mine_00001.safetensors"
        assert (loras / "mine_00001.safetensors").read_bytes() == b"lora"
        assert (loras / "mine.safetensors").read_bytes() == b"someone else's"

"""The LoRA nodes run against the ComfyUI stand-in and fakes of the few ComfyUI objects they touch (ModelPatcher's
``clone`` / ``add_patches`` with ComfyUI's behaviour: a patch is taken when its key exists, whatever its shape).
Their real-ComfyUI counterparts are in tests/integration/test_comfyui_api.py."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from accvideo_core.lora import LoraFormatError, comfy_patches, extract, load_lora
from accvideo_core.models import key_maps
from accvideo_core.testing import tiny_transformer
from accvideo_core.utils.io import CheckpointError, save_safetensors
from tests.integration import comfy_standin


class FakeModelPatcher:
    """ComfyUI's ModelPatcher as the LoRA loader uses it."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.model = types.SimpleNamespace(state_dict=lambda: dict(state_dict))
        self.patches: dict[str, list] = {}

    def clone(self) -> "FakeModelPatcher":
        other = FakeModelPatcher(self.model.state_dict())
        other.patches = {k: list(v) for k, v in self.patches.items()}
        return other

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list[str]:
        present = self.model.state_dict()
        applied = [k for k in patches if k in present]  # ComfyUI checks names only
        for k in applied:
            self.patches.setdefault(k, []).append((strength_patch, patches[k]))
        return applied


def comfy_model(seed: int = 0, **config) -> FakeModelPatcher:
    sd = tiny_transformer(seed=seed, **config).state_dict()
    return FakeModelPatcher({f"diffusion_model.{key_maps.original_to_comfy_key(k)}": v for k, v in sd.items()})


@pytest.fixture
def lora_nodes(tmp_path, monkeypatch):
    """``nodes.lora`` imported against the stand-in, with folders in ``tmp_path`` and fake comfy modules."""
    fakes = {"comfy": types.ModuleType("comfy"), "comfy.weight_adapter": types.ModuleType("comfy.weight_adapter"),
             "comfy.model_management": types.ModuleType("comfy.model_management"),
             "comfy.utils": types.ModuleType("comfy.utils")}
    for kind, adapter in (("lora", "LoRAAdapter"), ("loha", "LoHaAdapter"), ("lokr", "LoKrAdapter")):
        setattr(fakes["comfy.weight_adapter"], adapter, lambda loaded_keys, weights, kind=kind: (kind, weights))
    fakes["comfy.model_management"].throw_exception_if_processing_interrupted = lambda: None
    fakes["comfy.utils"].ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda *a: None)
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(fakes[parent], child, module)
    for folder in ("loras", "diffusion_models"):
        (tmp_path / folder).mkdir()
    with comfy_standin.standin():
        folder_paths = sys.modules["folder_paths"]
        folder_paths.get_full_path_or_raise = lambda folder, name: str(tmp_path / folder / name)
        folder_paths.get_folder_paths = lambda folder: [str(tmp_path / folder)]
        yield importlib.import_module("nodes.lora")


def test_loader_patches_a_clone_with_the_cores_patches(lora_nodes, tmp_path):
    base, tuned = tiny_transformer(seed=0).state_dict(), tiny_transformer(seed=1).state_dict()
    path = extract(base, tuned, rank=2, out=tmp_path / "loras" / "ok.safetensors", dtype=torch.float32).path
    model = comfy_model(seed=0)
    patched = lora_nodes.AccVideoLoraLoader.execute(model, "ok.safetensors", 0.5).args[0]
    assert not model.patches and patched is not model
    want = comfy_patches(load_lora(path))
    assert set(patched.patches) == set(want) and all(v[0][0] == 0.5 for v in patched.patches.values())
    # a LyCORIS LoKr goes to ComfyUI's own LoKrAdapter with its factors
    lokr = {"lycoris_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(4, 4),
            "lycoris_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(24, 8)}
    save_safetensors(lokr, tmp_path / "loras" / "lokr.safetensors")
    patched = lora_nodes.AccVideoLoraLoader.execute(model, "lokr.safetensors", 1.0).args[0]
    (_, (kind, weights)), = patched.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert kind == "lokr" and torch.equal(weights[0], lokr["lycoris_double_blocks_0_img_attn_qkv.lokr_w1"])


def test_loader_refuses_a_lora_for_another_model_size(lora_nodes, tmp_path):
    """Regression (issue 17): a LoRA for another hidden size was 'applied' with no error (ComfyUI checks names)."""
    base, tuned = (tiny_transformer(seed=s, hidden_size=64, num_heads=4).state_dict() for s in (0, 1))
    extract(base, tuned, rank=2, out=tmp_path / "loras" / "wide.safetensors")
    with pytest.raises(LoraFormatError, match="the LoRA was made for a different model"):
        lora_nodes.AccVideoLoraLoader.execute(comfy_model(seed=0), "wide.safetensors", 1.0)


def test_loader_refuses_flux_and_factorless_loras(lora_nodes, tmp_path):
    pair = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(1, 32),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 1)}
    flux = {**pair, "diffusion_model.img_in.lora_A.weight": torch.zeros(1, 64),
            "diffusion_model.img_in.lora_B.weight": torch.zeros(32, 1)}
    save_safetensors(flux, tmp_path / "loras" / "flux.safetensors")
    with pytest.raises(LoraFormatError, match="Flux LoRA"):
        lora_nodes.AccVideoLoraLoader.execute(comfy_model(), "flux.safetensors", 1.0)
    save_safetensors({k: v for k, v in pair.items() if "lora_A" in k}, tmp_path / "loras" / "no_up.safetensors")
    with pytest.raises(LoraFormatError, match="qkv.lora_B.weight"):
        lora_nodes.AccVideoLoraLoader.execute(comfy_model(), "no_up.safetensors", 1.0)


def test_extract_node_never_overwrites_and_refuses_identical_models(lora_nodes, tmp_path):
    """Regression (issue 17): the node replaced an existing LoRA with a 0-tensor file (identical models)."""
    models = tmp_path / "diffusion_models"
    save_safetensors(tiny_transformer(seed=0).state_dict(), models / "base.safetensors")
    save_safetensors(tiny_transformer(seed=1).state_dict(), models / "tuned.safetensors")
    loras = tmp_path / "loras"
    existing = save_safetensors({"x": torch.ones(1)}, loras / "mine.safetensors")
    before = existing.read_bytes()
    node = lora_nodes.AccVideoLoraExtract
    with pytest.raises(CheckpointError, match="do not differ"):
        node.execute("base.safetensors", "base.safetensors", 2, "mine.safetensors", "float32")
    assert existing.read_bytes() == before
    names = [node.execute("base.safetensors", "tuned.safetensors", 2, "mine.safetensors", "float32").args[0]
             for _ in range(2)]
    assert names == ["mine_00001.safetensors", "mine_00002.safetensors"] and existing.read_bytes() == before
    assert sorted(p.name for p in loras.iterdir()) == ["mine.safetensors", *names]
    assert load_lora(loras / names[1]).modules
    assert node.execute("base.safetensors", "tuned.safetensors", 2, "new.safetensors", "float32").args[0] == \
        "new.safetensors"

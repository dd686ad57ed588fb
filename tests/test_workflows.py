"""CI tier for the workflows (no ComfyUI needed).

What is checked, and against what:
- every file parses; every UI workflow (format 0.4) has an API twin and vice versa; example_workflows/ holds exact
  copies of the UI files; the files equal what ``python -m workflows.generate`` writes;
- every ``class_type`` is one of our nodes (schemas read through ``tests/integration/comfy_standin.py``) or a native
  node of the ``/object_info`` snapshot of the ComfyUI version we test against
  (``tests/data/native_nodes.json``; the integration tier checks both against a live ComfyUI);
- widgets: each UI node stores exactly one value per widget (+ one per control_after_generate) in schema order,
  of the right type, inside min/max, and in the options of static combos;
- twins: an independent UI->API conversion written here (not the generator's) equals the API file: same nodes,
  links and widget values; link types match the source output and target input types.
Not checked here (integration tier): that ComfyUI's front end accepts the files and converts them the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration import comfy_standin
from workflows import generate

ROOT = Path(__file__).resolve().parents[1]
UI_DIR, API_DIR = ROOT / "workflows" / "ui", ROOT / "workflows" / "api"
UI_FILES = sorted(UI_DIR.glob("*.json"))
NATIVE = json.loads((ROOT / "tests/data/native_nodes.json").read_text())
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "vae", "loras", "checkpoints", "clip"}


@pytest.fixture(scope="module")
def defs() -> dict:
    ours = {nid: comfy_standin.object_info(s) for nid, s in comfy_standin.schemas().items()}
    assert not set(ours) & set(NATIVE["nodes"]), "our node ids must not shadow native ones"
    return {**NATIVE["nodes"], **ours}


def api_twin_path(ui: Path) -> Path:
    return API_DIR / f"{ui.stem}_api.json"


def test_every_workflow_has_its_twin_and_parses():
    assert len(UI_FILES) == 6, [p.name for p in UI_FILES]
    assert not list((ROOT / "workflows").glob("*.json")), \
        "no JSON directly in workflows/: ComfyUI would list it in the template browser next to example_workflows/"
    for ui in UI_FILES:
        api = api_twin_path(ui)
        assert api.is_file(), f"{ui.name} has no API twin"
        data = json.loads(ui.read_text())
        assert data["version"] == 0.4 and isinstance(data["nodes"], list) and isinstance(data["links"], list)
        assert isinstance(json.loads(api.read_text()), dict)
    assert {p.name for p in API_DIR.glob("*.json")} == {p.stem + "_api.json" for p in UI_FILES}


def test_files_are_what_the_generator_writes():
    for path, text in generate.render().items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m workflows.generate"


def test_example_workflows_are_copies_of_the_ui_files():
    """The template browser's folder holds the UI files (generated copies: its static handler refuses symlinks)."""
    examples = sorted((ROOT / "example_workflows").iterdir())
    assert [p.name for p in examples] == [p.name for p in UI_FILES]
    for p in examples:
        assert not p.is_symlink() and p.read_bytes() == (UI_DIR / p.name).read_bytes()


def _widget_specs(definition: dict) -> list[tuple[str, list]]:
    out = []
    for section in ("required", "optional"):
        for name in definition["input_order"].get(section, []):
            spec = definition["input"][section][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(typ, list) or typ in comfy_standin.WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, spec))
    return out


def _check_value(where: str, name: str, spec: list, value) -> None:
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    options = typ if isinstance(typ, list) else opts.get("options")
    if options:  # static combo (file lists are empty in the snapshot: machine-dependent)
        assert value in options, f"{where}: {name}={value!r} not in {options}"
    elif isinstance(typ, list) or typ in ("STRING", "COMBO"):
        assert isinstance(value, str), f"{where}: {name} must be a string, got {value!r}"
    elif typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name} must be an int"
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name} must be a number"
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name} must be a boolean"
    if typ in ("INT", "FLOAT"):
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {name}={value} out of range"


def ui_to_api(ui: dict, defs: dict) -> dict:
    """Independent UI -> API conversion (widget values by position, links by slot)."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in generate.FRONTEND_ONLY:
            continue
        d = defs[node["type"]]
        inputs = {}
        values = list(node["widgets_values"])
        for name, spec in _widget_specs(d):
            inputs[name] = values.pop(0)
            if (spec[1] if len(spec) > 1 else {}).get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"node {node['id']} ({node['type']}) stores extra widget values {values}"
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, origin, origin_slot, target, _, _ = links[slot["link"]]
                assert target == node["id"]
                inputs[slot["name"]] = [str(origin), origin_slot]
        order = [n for s in ("required", "optional") for n in d["input_order"].get(s, [])]
        prompt[str(node["id"])] = {"class_type": node["type"],
                                   "inputs": {k: inputs[k] for k in order if k in inputs}}
    return prompt


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_matches_schemas_and_api_twin(ui_path: Path, defs: dict):
    ui = json.loads(ui_path.read_text())
    api = json.loads(api_twin_path(ui_path).read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert len(by_id) == len(ui["nodes"]) and ui["last_node_id"] >= max(by_id)
    assert ui["last_link_id"] >= max(l[0] for l in ui["links"])
    for node in ui["nodes"]:
        if node["type"] in generate.FRONTEND_ONLY:
            continue
        assert node["type"] in defs, f"{ui_path.name}: unknown node type {node['type']}"
        d = defs[node["type"]]
        specs = _widget_specs(d)
        n_values = len(specs) + sum(bool((s[1] if len(s) > 1 else {}).get("control_after_generate"))
                                    for _, s in specs)
        assert len(node["widgets_values"]) == n_values, (
            f"{ui_path.name} node {node['id']} ({node['type']}): {len(node['widgets_values'])} widget values, "
            f"schema has {n_values} ({[n for n, _ in specs]})")
        values = list(node["widgets_values"])
        for name, spec in specs:
            _check_value(f"{ui_path.name} node {node['id']} ({node['type']})", name, spec, values.pop(0))
            if (spec[1] if len(spec) > 1 else {}).get("control_after_generate"):
                values.pop(0)
        for i, out in enumerate(node["outputs"]):
            assert out["type"] == d["output"][i]
            for link_id in out["links"]:
                assert ui_links(ui)[link_id][1:3] == [node["id"], i]
    for link_id, origin, origin_slot, target, target_slot, typ in ui["links"]:
        source_type = defs[by_id[origin]["type"]]["output"][origin_slot]
        slot = by_id[target]["inputs"][target_slot]
        assert slot["link"] == link_id and typ == source_type
        d = defs[by_id[target]["type"]]
        section = "required" if slot["name"] in d["input"]["required"] else "optional"
        want = d["input"][section][slot["name"]][0]
        assert want == source_type or (isinstance(want, list) and source_type == "COMBO") or \
            (want == "STRING" and source_type == "STRING"), f"{ui_path.name}: link {link_id} {source_type}->{want}"
    converted = ui_to_api(ui, defs)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def ui_links(ui: dict) -> dict:
    return {l[0]: l for l in ui["links"]}


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_models_entries_name_files_and_folders(ui_path: Path):
    ui = json.loads(ui_path.read_text())
    widget_strings = {v for n in ui["nodes"] for v in n["widgets_values"] if isinstance(v, str)}
    assert ui["models"], f"{ui_path.name} lists no models"
    for m in ui["models"]:
        assert set(m) == {"name", "url", "directory"}
        assert m["directory"] in MODEL_FOLDERS and m["url"].startswith("https://")
        assert m["name"] in widget_strings, f"{m['name']} is listed but no node uses it"


def test_workflows_use_native_nodes_for_text_models_and_latents():
    for ui_path in UI_FILES:
        types = {n["type"] for n in json.loads(ui_path.read_text())["nodes"]}
        assert {"DualCLIPLoader", "CLIPTextEncode", "UNETLoader", "VAELoader", "EmptyHunyuanLatentVideo"} <= types
        assert types & {"AccVideoSampler", "AccVideoTrajectoryDump"}, ui_path.name

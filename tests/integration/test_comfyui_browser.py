"""Integration tier, browser level: every UI workflow dropped on ComfyUI's own web page in headless Chromium.

Needs Debian's ``chromium`` (``ACCVIDEO_CHROMIUM``, default /usr/bin/chromium) and Playwright's Python package in
the test environment (``playwright install`` is never used: it downloads browsers). The server serves the front
end that ComfyUI's requirements pin (comfyui-frontend-package). Placeholder files carry the workflows' model
names (and a SynVid folder the one AccVideo Train picks), so combos hold real choices and the missing-models
dialog stays away; no model is loaded. Requests to
anything but the loopback server are aborted.

Per workflow: the file is dropped on the canvas (a DataTransfer drop event, as a user's drag-and-drop), then
- the front end reports no schema error and no missing node type, and builds every node of the file;
- every widget holds the value stored in the file (none was reset), and every combo value is one of the
  page's choices for it (the front end keeps unknown combo values on load, so this is checked explicitly);
- the page's own graph-to-prompt conversion equals the API twin (class_type and inputs of every node).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.integration.conftest import start_server, stop_server
from workflows.generate import DISTILL_FOLDER, LORA_NAME, STYLE_LORA_NAME, TRAINED_LORA_NAME

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = sorted((ROOT / "workflows" / "ui").glob("*.json"))
CHROMIUM = os.environ.get("ACCVIDEO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory, comfyui_path):
    pytest.importorskip("playwright", reason="browser test: pip install playwright (never `playwright install`)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"browser test: no Chromium at {CHROMIUM} (apt-get install chromium, or set ACCVIDEO_CHROMIUM)")
    base = tmp_path_factory.mktemp("comfyui_browser")
    for ui in UI_FILES:
        for m in json.loads(ui.read_text())["models"]:
            folder = base / "models" / m["directory"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / m["name"]).touch()  # placeholder: listed by the combos, never loaded
    lora_dir = base / "models" / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    for name in (LORA_NAME, STYLE_LORA_NAME, TRAINED_LORA_NAME):  # the names the LoRA workflows pick
        (lora_dir / name).touch()
    synvid = base / "output" / DISTILL_FOLDER  # the SynVid folder AccVideo Train lists (a manifest marks one)
    synvid.mkdir(parents=True, exist_ok=True)
    (synvid / "manifest.json").write_text("{}")
    settings = base / "user" / "default"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    server = start_server(comfyui_path, base, front_end=True)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1000})
        yield context
        context.close()


LOAD_CHECK = """async () => {
  const nodes = app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => [w.name, w.value]),
    badCombos: (n.widgets || []).filter(w => w.type === 'combo' && Array.isArray(w.options?.values) &&
                                            !w.options.values.includes(w.value)).map(w => [w.name, w.value])}));
  const prompt = await app.graphToPrompt();
  const text = document.body.innerText;
  return {nodes, output: prompt.output, workflowId: app.graph.id,
          missingNodes: /missing node types|Some Nodes Are Missing/i.test(text),
          missingModels: /Missing Models/i.test(text),
          alert: Array.from(document.querySelectorAll('.p-toast-message')).map(e => e.innerText).join(' | ')};
}"""

DROP = """([text, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const target = document.querySelector('#graph-canvas') || document.querySelector('canvas');
  for (const t of ['dragenter', 'dragover', 'drop'])
    target.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_drops_onto_the_canvas_and_converts_to_its_api_twin(browser_server, browser, ui_path, tmp_path):
    text = ui_path.read_text()
    ui = json.loads(text)
    api = json.loads((ROOT / "workflows" / "api" / f"{ui_path.stem}_api.json").read_text())
    page = browser.new_page()
    console, blocked = [], []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    host = urlparse(browser_server.url).netloc

    def only_loopback(route):
        if urlparse(route.request.url).netloc == host:
            return route.continue_()
        blocked.append(route.request.url)
        return route.abort()

    page.route("**/*", only_loopback)
    try:
        page.goto(browser_server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && app.graph && window.LiteGraph && "
                               "LiteGraph.registered_node_types['AccVideoSampler']", timeout=120_000)
        page.wait_for_timeout(1000)
        page.evaluate(DROP, [text, ui_path.name])
        page.wait_for_function(f"() => app.graph.nodes.length === {len(ui['nodes'])} && "
                               f"app.graph.nodes.some(n => n.type === {json.dumps(ui['nodes'][-1]['type'])})",
                               timeout=60_000)
        page.wait_for_timeout(1500)
        state = page.evaluate(LOAD_CHECK)
        page.screenshot(path=str(tmp_path / f"{ui_path.stem}.png"))
    finally:
        page.close()

    schema_errors = [c for c in console if "zod" in c.lower() or "invalid workflow" in c.lower()]
    assert not schema_errors and "Invalid" not in state["alert"], (schema_errors, state["alert"])
    assert not state["missingNodes"] and all(n["registered"] for n in state["nodes"]), state["nodes"]
    assert not state["missingModels"], "placeholders should satisfy every models entry"
    assert sorted(n["id"] for n in state["nodes"]) == sorted(n["id"] for n in ui["nodes"])
    saved = {n["id"]: n for n in ui["nodes"]}
    for node in state["nodes"]:
        assert not node["badCombos"], f"{ui_path.name} node {node['id']}: values not among the choices {node['badCombos']}"
        values = [v for _, v in node["widgets"]]
        assert values == saved[node["id"]]["widgets_values"], (
            f"{ui_path.name} node {node['id']} ({node['type']}): page holds {node['widgets']}, "
            f"file stores {saved[node['id']]['widgets_values']}")
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in state["output"].items()} == \
        {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert state["workflowId"] == ui["id"]

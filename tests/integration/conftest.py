"""Integration tier: a real ComfyUI checkout (``COMFYUI_PATH``) started headless on loopback with this pack loaded.

Run it with the Python environment ComfyUI runs in (it must also import ``accvideo_core``: torch, safetensors,
einops, numpy, imageio-ffmpeg; the browser test also needs ``playwright`` and Debian's ``chromium``)::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -m integration tests/integration

``COMFYUI_PYTHON`` selects another interpreter for the server (default: the one running pytest). Test models are
made on the fly and cached in ``ACCVIDEO_INTEGRATION_CACHE`` (default: a folder in the system temp dir): a tiny
random HunyuanVideo in the original layout that native ComfyUI loads (hidden 256 = 2 heads of 128, vec 768, text
dim 32), a second one for LoRA extraction, a LoRA extracted between them, and a full-size random HunyuanVideo VAE
(native ComfyUI builds the VAE with hard-coded widths, so a small one cannot be loaded).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ASSET_VERSION = "v1"
TINY_MODEL = "accvideo_test_tiny.safetensors"
TINY_TUNED = "accvideo_test_tiny_tuned.safetensors"
TINY_LORA = "accvideo_test_tiny_lora.safetensors"
RANDOM_VAE = "accvideo_test_random_full_vae.safetensors"
TEXT_DIM = 32


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _cache_dir() -> Path:
    base = Path(os.environ.get("ACCVIDEO_INTEGRATION_CACHE", Path(tempfile.gettempdir()) / "accvideo-integration"))
    d = base / ASSET_VERSION
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_assets() -> dict[str, Path]:
    """Create (once, cached) the test model files; returns name -> path."""
    import torch

    from accvideo_core.lora.extract import extract
    from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig
    from accvideo_core.models.vae_loading import save_vae
    from accvideo_core.testing import randomize_, tiny_transformer
    from accvideo_core.utils.io import save_safetensors

    d = _cache_dir()
    paths = {n: d / n for n in (TINY_MODEL, TINY_TUNED, TINY_LORA, RANDOM_VAE)}
    if not paths[TINY_MODEL].is_file():
        save_safetensors(tiny_transformer(0, comfy_compatible=True, text_dim=TEXT_DIM).state_dict(),
                         paths[TINY_MODEL])
    if not paths[TINY_TUNED].is_file():
        save_safetensors(tiny_transformer(1, comfy_compatible=True, text_dim=TEXT_DIM).state_dict(),
                         paths[TINY_TUNED])
    if not paths[TINY_LORA].is_file():
        extract(paths[TINY_MODEL], paths[TINY_TUNED], 8, out=paths[TINY_LORA], dtype=torch.float32)
    if not paths[RANDOM_VAE].is_file():
        vae = HunyuanVideoVAE(VAEConfig())
        randomize_(vae, seed=3)
        with torch.no_grad():  # keep decoded values mostly inside [-1, 1] so IMAGE comparisons are not clamped
            vae.decoder.conv_out.conv.weight.mul_(0.05)
        save_vae(vae.to(torch.bfloat16), paths[RANDOM_VAE])
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    base: Path  # models/, output/, input/, custom_nodes/
    log: Path
    proc: subprocess.Popen

    @property
    def output(self) -> Path:
        return self.base / "output"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def run(self, prompt: dict, *, timeout: float = 600.0, workflow: dict | None = None) -> dict:
        """Queue an API prompt and wait for its history entry (raises on rejection)."""
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, answer = self.post("/prompt", body)
        if status != 200:
            raise AssertionError(f"prompt rejected: HTTP {status}: {json.dumps(answer)[:2000]}")
        return self.history(answer["prompt_id"], timeout=timeout)

    def history(self, pid: str, *, timeout: float = 600.0) -> dict:
        """The history entry of prompt ``pid`` once it is complete. ComfyUI stores it after the execution's last
        websocket message (``execution_success`` is sent before ``task_done``), so a client that saw that message
        must still wait for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited; log tail:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")

    async def messages(self, prompt: dict):
        """Queue an API prompt over a websocket session and yield ``(prompt_id, message)`` for every message the
        server sends that client: ``bytes`` for binary frames (previews, progress text), a parsed dict otherwise.
        The caller stops iterating when it has seen what it waits for."""
        import aiohttp

        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
                status, answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
                assert status == 200, answer
                async for msg in ws:
                    binary = msg.type == aiohttp.WSMsgType.BINARY
                    yield answer["prompt_id"], msg.data if binary else json.loads(msg.data)


def error_of(entry: dict) -> str | None:
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return data.get("exception_message", "")
    return None


def start_server(comfy: Path, base: Path, *, front_end: bool) -> Server:
    """Start the ComfyUI checkout ``comfy`` (the ``comfyui_path`` fixture of tests/conftest.py) on a free loopback
    port with the pack and the test pack in ``base/custom_nodes``."""
    assets = make_assets()
    for sub in ("models/diffusion_models", "models/vae", "models/loras", "models/text_encoders", "output", "input",
                "custom_nodes", "user", "empty_front_end"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {base / "custom_nodes" / "ComfyUI-AccVideo": ROOT,
             base / "custom_nodes" / "accvideo_test_pack": HERE / "test_pack",
             base / "models/diffusion_models" / TINY_MODEL: assets[TINY_MODEL],
             base / "models/diffusion_models" / TINY_TUNED: assets[TINY_TUNED],
             base / "models/loras" / TINY_LORA: assets[TINY_LORA],
             base / "models/vae" / RANDOM_VAE: assets[RANDOM_VAE]}
    for link, target in links.items():
        if not link.exists():
            link.symlink_to(target)
    config = base / "extra_model_paths.yaml"
    config.write_text("accvideo_integration:\n"
                      f"  base_path: {base}\n"
                      "  is_default: true\n"
                      "  custom_nodes: custom_nodes/\n"
                      "  diffusion_models: models/diffusion_models/\n"
                      "  vae: models/vae/\n"
                      "  loras: models/loras/\n"
                      "  text_encoders: models/text_encoders/\n")
    log = base / "comfyui.log"
    for attempt in range(1, BIND_ATTEMPTS + 1):
        server = _launch(comfy, base, config, log, front_end=front_end)
        if server is not None:
            return server
        print(f"ComfyUI could not bind its port (attempt {attempt} of {BIND_ATTEMPTS}); retrying on another one")
    raise AssertionError(f"ComfyUI could not bind a free port in {BIND_ATTEMPTS} attempts; log tail:\n"
                         f"{log.read_text()[-3000:]}")


BIND_ATTEMPTS = 5
BIND_FAILED = ("address already in use", "errno 98", "error while attempting to bind")


def _launch(comfy: Path, base: Path, config: Path, log: Path, *, front_end: bool) -> Server | None:
    """Start ComfyUI on a port free a moment ago. ``None`` when another process took the port first (the pick
    races with everything else on the machine): the caller retries on a new port. A server answering on the
    port is only taken for ours when its command line names our output folder."""
    port = free_port()
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--extra-model-paths-config", str(config), "--output-directory",
           str(base / "output"), "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
           "--disable-api-nodes", "--disable-auto-launch", "--preview-method", "latent2rgb"]
    if not front_end:
        cmd += ["--front-end-root", str(base / "empty_front_end")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.Popen(cmd, cwd=comfy, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", base, log, proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if any(marker in log.read_text().lower() for marker in BIND_FAILED):
                return None
            raise AssertionError(f"ComfyUI exited with {proc.returncode}; log tail:\n{log.read_text()[-3000:]}")
        try:
            argv = server.get("/system_stats")["system"]["argv"]
        except (urllib.error.URLError, ConnectionError, OSError, KeyError):
            time.sleep(0.5)
            continue
        if str(base / "output") in argv:
            return server
        stop_server(server)  # another server answers on the port: ours cannot bind it
        return None
    proc.terminate()
    raise AssertionError(f"ComfyUI did not answer within 180 s; log tail:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def comfy_api(tmp_path_factory, comfyui_path):
    """API-only ComfyUI (empty front end) with the pack loaded; shared by the API tests."""
    server = start_server(comfyui_path, tmp_path_factory.mktemp("comfyui_api"), front_end=False)
    yield server
    stop_server(server)
    shutil.copy(server.log, tmp_path_factory.getbasetemp() / "comfyui_api.log")

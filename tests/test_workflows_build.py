"""CI tier for the headless SynVid builder, against a fake ComfyUI HTTP API on loopback (stdlib http.server).

The fake answers like ComfyUI 0.3.64: POST /prompt -> {prompt_id, number, node_errors} or HTTP 400 with
node_errors; GET /history/<id> -> {} while running, then the entry with status and execution_error messages.
The real server is exercised by tests/integration/test_comfyui_api.py.
"""
from __future__ import annotations

import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from accvideo_core.synvid import build

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = json.loads((ROOT / "workflows/api/accvideo_synvid_dump_api.json").read_text())


class FakeComfy:
    def __init__(self):
        self.submitted: list[dict] = []
        self.polls: dict[str, int] = {}
        self.deleted: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/queue":
                    fake.deleted += body.get("delete", [])
                    return self._send(200, {})
                prompt = body["prompt"]
                text = prompt["3"]["inputs"]["value"]
                if "BAD" in text:
                    return self._send(400, {"error": {"type": "prompt_outputs_failed_validation",
                                                      "message": "Prompt outputs failed validation", "details": ""},
                                            "node_errors": {"7": {"class_type": "AccVideoTrajectoryDump", "errors": [
                                                {"message": "Value not in list", "details": "dtype: 'fp4'"}]}}})
                pid = uuid.uuid4().hex
                fake.submitted.append({"id": pid, "prompt": prompt})
                return self._send(200, {"prompt_id": pid, "number": len(fake.submitted), "node_errors": {}})

            def do_GET(self):
                pid = self.path.rsplit("/", 1)[-1]
                entry = next(s for s in fake.submitted if s["id"] == pid)
                fake.polls[pid] = fake.polls.get(pid, 0) + 1
                if fake.polls[pid] < 2:
                    return self._send(200, {})
                text = entry["prompt"]["3"]["inputs"]["value"]
                if "BOOM" in text:
                    status = {"status_str": "error", "completed": False, "messages": [
                        ["execution_start", {}],
                        ["execution_error", {"node_id": "7", "node_type": "AccVideoTrajectoryDump",
                                             "exception_type": "ValueError", "exception_message": "boom\n"}]]}
                    return self._send(200, {pid: {"status": status, "outputs": {}}})
                status = {"status_str": "success", "completed": True, "messages": []}
                return self._send(200, {pid: {"status": status, "outputs": {"7": {"text": [f"synvid/{pid}.st"]}}}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _run(fake: FakeComfy, jobs, state: Path) -> tuple[dict, str]:
    log = io.StringIO()
    counts = build.build(build.ComfyClient(fake.url, timeout=5), WORKFLOW, jobs, state, poll=0.0, log=log,
                         sleep=lambda s: None)
    return counts, log.getvalue()


def test_builder_reports_errors_per_prompt_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n\nthis is BAD\na BOOM happens\na blue whale\n")
    jobs = build.read_jobs(prompts, seed=100, fixed_seed=False)
    assert [(j.line, j.seed) for j in jobs] == [(1, 100), (3, 102), (4, 103), (5, 104)]
    state = tmp_path / "state.jsonl"
    with FakeComfy() as fake:
        counts, log = _run(fake, jobs, state)
        assert counts == {"done": 2, "skipped": 0, "failed": 2}
        assert "Value not in list: dtype: 'fp4'" in log and "ValueError: boom" in log
        sent = {s["prompt"]["3"]["inputs"]["value"]: s["prompt"]["7"]["inputs"]["seed"] for s in fake.submitted}
        assert sent == {"a red fox in snow": 100, "a BOOM happens": 103, "a blue whale": 104}
        assert all(s["prompt"]["7"]["inputs"]["prompt"] == ["3", 0] for s in fake.submitted)
        records = build.read_state(state)
        assert {r["line"]: r["status"] for r in records.values()} == {1: "done", 3: "error", 4: "error", 5: "done"}
        assert records[jobs[0].key]["outputs"][0].startswith("synvid/")

        n_before = len(fake.submitted)
        counts, _ = _run(fake, jobs, state)  # resume: done lines are skipped, failed ones retried
        assert counts == {"done": 0, "skipped": 2, "failed": 2}
        assert len(fake.submitted) == n_before + 1  # only the BOOM line reached the queue again


def test_builder_rejects_unusable_workflows(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text((ROOT / "workflows/ui/accvideo_synvid_dump.json").read_text())
    with pytest.raises(build.BuildError, match="UI-format"):
        build.load_workflow(ui)
    t2v = json.loads((ROOT / "workflows/api/accvideo_t2v_api.json").read_text())
    with pytest.raises(build.BuildError, match="exactly one AccVideoTrajectoryDump"):
        build.find_targets(t2v)
    unlinked = json.loads(json.dumps(WORKFLOW))
    unlinked["7"]["inputs"].pop("prompt")
    with pytest.raises(build.BuildError, match="'prompt' input must be connected"):
        build.find_targets(unlinked)
    with pytest.raises(build.BuildError, match="cannot reach ComfyUI"):
        build.ComfyClient("http://127.0.0.1:9", timeout=2).submit({})


def test_cli_exit_codes(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    with FakeComfy() as fake:
        assert build.main(["--server", fake.url, "--workflow", str(wf), "--prompts", str(prompts),
                           "--poll", "0"]) == 0
        assert (tmp_path / "p.build.jsonl").is_file()
        assert "done 1, skipped (already done) 0, failed 0" in capsys.readouterr().err
    assert build.main(["--server", "localhost:1", "--workflow", str(wf), "--prompts", str(prompts)]) == 2

"""Headless SynVid building: drive a running ComfyUI with the trajectory-dump workflow, one prompt per line.

    python -m accvideo_core.synvid.build --server http://127.0.0.1:8188 \\
        --workflow workflows/api/accvideo_synvid_dump_api.json --prompts prompts.txt

For every non-empty line of the prompts file the API workflow is copied, the line is written into the text that
feeds the AccVideo Trajectory Dump node (its ``prompt`` input's source, e.g. PrimitiveStringMultiline, which also
feeds CLIPTextEncode) and the dump's seed is set (``--seed`` plus the line number, or the same seed for every line
with ``--fixed-seed``); the prompt is queued with ``POST /prompt`` and followed through ``GET /history``. Results go
to a JSON-lines state file (default ``<prompts>.build.jsonl``): a rerun skips what is done and retries the rest.
Rejected prompts (HTTP 400 with ``node_errors``) and execution errors are reported per prompt and do not stop the
batch. One ComfyUI per GPU: run one client per server, each on its own prompts file. Pure standard library.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

DUMP_NODE = "AccVideoTrajectoryDump"
TEXT_INPUTS = ("value", "text", "string")


class BuildError(RuntimeError):
    """The workflow or the server cannot be used for building (stops the whole run)."""


@dataclass
class Job:
    line: int  # 1-based line number in the prompts file
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.line}:{self.seed}:{self.prompt}"


# ----------------------------------------------------------------------------------------------------------- HTTP
class ComfyClient:
    """Minimal ComfyUI HTTP API client (urllib)."""

    def __init__(self, server: str, *, timeout: float = 30.0):
        self.base = server.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise BuildError(f"--server must be an http(s) URL such as http://127.0.0.1:8188, got {server!r}")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
        except (urllib.error.URLError, OSError) as err:
            raise BuildError(f"cannot reach ComfyUI at {self.base}: {err}; is it running (python main.py "
                             f"--listen ... --port ...)?") from err

    def submit(self, prompt: dict) -> tuple[str | None, str | None]:
        """Queue a prompt: (prompt_id, None) or (None, error text from the server's 400 answer)."""
        status, answer = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status == 200 and isinstance(answer, dict) and answer.get("prompt_id"):
            return answer["prompt_id"], None
        return None, describe_rejection(status, answer)

    def history(self, prompt_id: str) -> dict | None:
        status, answer = self._request(f"/history/{urllib.parse.quote(prompt_id)}")
        if status != 200 or not isinstance(answer, dict):
            raise BuildError(f"GET /history/{prompt_id} answered HTTP {status}")
        return answer.get(prompt_id)

    def delete_queued(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            self._request("/queue", {"delete": prompt_ids})


def describe_rejection(status: int, answer: Any) -> str:
    """One readable line from ComfyUI's ``/prompt`` error answer (``error`` + per-node ``node_errors``)."""
    if not isinstance(answer, dict):
        return f"HTTP {status}: {answer!r}"
    err = answer.get("error") or {}
    parts = [f"HTTP {status}: {err.get('message', err) if isinstance(err, dict) else err}"]
    if isinstance(err, dict) and err.get("details"):
        parts.append(str(err["details"]))
    for node_id, info in (answer.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(parts)


def describe_history_error(entry: dict) -> str | None:
    """The execution error of a finished prompt, or None when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str") == "success":
        return None
    for event, data in status.get("messages", []):
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
        if event == "execution_interrupted":
            return "interrupted on the server"
    return f"failed with status {status.get('status_str')!r}"


# ------------------------------------------------------------------------------------------------------ workflow
def load_workflow(path: str | Path) -> dict:
    """An API-format workflow (the ``*_api.json`` twin), with a clear error for the UI format."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BuildError(f"cannot read the workflow {path}: {err}") from err
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise BuildError(f"{path} is a UI-format workflow; use its API twin (workflows/api/*_api.json, or 'Export "
                         "(API)' in ComfyUI)")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise BuildError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}})")
    return data


def find_targets(workflow: dict) -> tuple[str, str, str]:
    """(dump node id, id of the node holding the prompt text, name of its text input)."""
    dumps = [nid for nid, n in workflow.items() if n["class_type"] == DUMP_NODE]
    if len(dumps) != 1:
        raise BuildError(f"the workflow must contain exactly one {DUMP_NODE} node, found {len(dumps)}")
    dump = dumps[0]
    link = workflow[dump]["inputs"].get("prompt")
    if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in workflow):
        raise BuildError(f"the {DUMP_NODE} node's 'prompt' input must be connected to the node holding the prompt "
                         "text (e.g. PrimitiveStringMultiline feeding CLIPTextEncode too)")
    source = str(link[0])
    inputs = workflow[source]["inputs"]
    name = next((k for k in TEXT_INPUTS if isinstance(inputs.get(k), str)), None)
    if name is None:
        raise BuildError(f"node {source} ({workflow[source]['class_type']}) feeding the prompt has no text input "
                         f"({'/'.join(TEXT_INPUTS)}) to write the prompt into")
    return dump, source, name


def make_prompt(workflow: dict, targets: tuple[str, str, str], job: Job) -> dict:
    dump, source, name = targets
    prompt = copy.deepcopy(workflow)
    prompt[source]["inputs"][name] = job.prompt
    prompt[dump]["inputs"]["seed"] = job.seed
    return prompt


def read_jobs(path: str | Path, seed: int, fixed_seed: bool) -> list[Job]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BuildError(f"cannot read the prompts file {path}: {err}") from err
    return [Job(i + 1, text.strip(), seed if fixed_seed else seed + i) for i, text in enumerate(lines)
            if text.strip()]


def read_state(path: Path) -> dict[str, dict]:
    """Last record per job key from the JSON-lines state file (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                records[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return records


def _append_state(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


# ---------------------------------------------------------------------------------------------------------- run
def build(client: ComfyClient, workflow: dict, jobs: Iterable[Job], state_path: Path, *, max_queued: int = 2,
          poll: float = 0.5, job_timeout: float = 24 * 3600.0, log: TextIO = sys.stderr,
          sleep: Callable[[float], None] = time.sleep) -> dict[str, int]:
    """Run every job not yet done; returns counts ``done``, ``skipped``, ``failed``."""
    targets = find_targets(workflow)
    state = read_state(state_path)
    jobs = list(jobs)
    todo = [j for j in jobs if state.get(j.key, {}).get("status") != "done"]
    counts = {"done": 0, "skipped": len(jobs) - len(todo), "failed": 0}
    total = len(todo)
    in_flight: list[tuple[Job, str, float]] = []
    finished = 0
    last_note = 0.0

    def record(job: Job, status: str, **extra: Any) -> None:
        nonlocal finished, last_note
        finished += 1
        last_note = 0.0
        counts["done" if status == "done" else "failed"] += 1
        _append_state(state_path, {"key": job.key, "line": job.line, "seed": job.seed, "prompt": job.prompt,
                                   "status": status, "time": time.time(), **extra})
        msg = "done" if status == "done" else f"ERROR {extra.get('error')}"
        print(f"[{finished}/{total}] line {job.line} seed {job.seed}: {msg}", file=log, flush=True)

    queue = list(todo)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < max(1, max_queued):
                job = queue.pop(0)
                prompt_id, error = client.submit(make_prompt(workflow, targets, job))
                if error is not None:
                    record(job, "error", error=error)
                else:
                    in_flight.append((job, prompt_id, time.monotonic()))
            if not in_flight:
                continue
            job, prompt_id, started = in_flight[0]
            entry = client.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                in_flight.pop(0)
                error = describe_history_error(entry)
                if error is None:
                    record(job, "done", prompt_id=prompt_id, outputs=_output_texts(entry))
                else:
                    record(job, "error", prompt_id=prompt_id, error=error)
                continue
            if time.monotonic() - started > job_timeout:
                in_flight.pop(0)
                record(job, "error", prompt_id=prompt_id, error=f"no result after {job_timeout:.0f} s")
                continue
            elapsed = time.monotonic() - started
            if log.isatty():
                print(f"\r[{finished}/{total}] line {job.line}: running {elapsed:6.0f} s", end="", file=log,
                      flush=True)
            elif elapsed - last_note >= 60:  # logs: one line a minute
                last_note = elapsed
                print(f"[{finished}/{total}] line {job.line}: running {elapsed:.0f} s", file=log, flush=True)
            sleep(poll)
    except KeyboardInterrupt:
        client.delete_queued([pid for _, pid, _ in in_flight[1:]])
        print(f"\nstopped after {finished} of {total}; run the same command again to resume", file=log)
        raise
    return counts


def _output_texts(entry: dict) -> list[str]:
    """File names the dump node reported in its UI output (SynVid sample paths)."""
    texts = []
    for out in (entry.get("outputs") or {}).values():
        texts += [t for t in out.get("text", []) if isinstance(t, str)]
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.synvid.build", description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="ComfyUI URL, e.g. http://127.0.0.1:8188")
    parser.add_argument("--workflow", required=True, help="API-format dump workflow (workflows/api/*_api.json)")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--state", help="JSON-lines progress file (default: <prompts>.build.jsonl)")
    parser.add_argument("--seed", type=int, default=1024, help="seed of line 1; line n gets seed + n - 1")
    parser.add_argument("--fixed-seed", action="store_true", help="use --seed for every line")
    parser.add_argument("--max-queued", type=int, default=2, help="prompts queued on the server at once (2)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between /history polls")
    args = parser.parse_args(argv)
    try:
        workflow = load_workflow(args.workflow)
        find_targets(workflow)
        jobs = read_jobs(args.prompts, args.seed, args.fixed_seed)
        state = Path(args.state) if args.state else Path(args.prompts).with_suffix(".build.jsonl")
        counts = build(ComfyClient(args.server), workflow, jobs, state, max_queued=args.max_queued, poll=args.poll)
    except (BuildError, OSError) as err:  # OSError: the state file cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"done {counts['done']}, skipped (already done) {counts['skipped']}, failed {counts['failed']}",
          file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

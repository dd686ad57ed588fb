"""What the miniature training scripts share: CLI options from a config dataclass, and the run log
(``train_*.json``) that records every run of a shipped file with the command that reproduces it."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path


def add_config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--field-name`` option per dataclass field (``--x/--no-x`` for bools), defaulting to the field's."""
    for f in fields(config_cls):
        default, flag = f.default, "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def command_line(prog: str, run: dict, leading: tuple[str, ...] = ()) -> str:
    """The command that reproduces one recorded run: ``leading`` run keys (e.g. ``vae``), ``--init`` when it
    continued a file, then every config value."""
    args = [f"--{k} {run[k]}" for k in leading]
    if run.get("init"):
        args.append(f"--init {run['init']}")
    for k, v in run["config"].items():
        flag = "--" + k.replace("_", "-")
        args.append((flag if v else "--no-" + flag[2:]) if isinstance(v, bool) else f"{flag} {v}")
    return " ".join([f"python -m {prog}", *args])


def append_run(log_path: Path, config, result: dict, *, init: str | None, **inputs: str) -> list[dict]:
    """The runs of ``log_path`` plus this one. A run from scratch starts a new history; a continuation (``init``)
    extends the recorded one."""
    runs = json.loads(log_path.read_text()).get("runs", []) if init and log_path.is_file() else []
    runs.append({"config": asdict(config), **{k: str(v) for k, v in inputs.items()},
                 "init": str(init) if init else None, "result": result})
    return runs

"""A SynVid data-set folder: the writer, its folder lock, repair (``rebuild``) and checking (``verify``).

Several writers may share one folder (two ComfyUI servers on one ``output/``, two CLI dumpers): every change of
the folder happens under an exclusive lock on ``ROOT/.lock`` (``fcntl.flock``; ``msvcrt.locking`` on Windows),
released by the kernel when the holder dies. Under the lock a writer re-reads the manifest, picks a sample index
above every index on disk or in the manifest, creates the sample file exclusively (it never replaces a file),
then rewrites the manifest. So indices never collide, an index dropped by ``rebuild`` is never reused, and no
writer's manifest update hides another's. Readers need no lock (every file is replaced atomically).

While a process holds the lock nobody else writes, so temporary files found then were left by a killed writer:
they are reported and removed. Sample files on disk that the manifest does not list (a writer killed between
the sample and the manifest) are validated and listed again by the next writer, ``rebuild`` or ``verify``.

    python -m accvideo_core.synvid.format verify ROOT    # check every entry against its file; exit 1 if bad
    python -m accvideo_core.synvid.format rebuild ROOT   # recreate manifest.json from the sample files
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from accvideo_core.synvid.format import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SAMPLES_DIR, SynVidDataset, SynVidError, SynVidSample, check_facts,
    check_sample, dataset_facts, expected_shapes, identity_of, load_manifest, parse_dtype, read_sample,
    sample_identity, write_sample,
)
from accvideo_core.utils.dtypes import dtype_name
from accvideo_core.utils.io import write_json

LOCK_NAME = ".lock"
SAMPLE_NAME = re.compile(r"^(\d{6,})\.safetensors$")
Report = Callable[[str], None]


def sample_filename(index: int) -> str:
    return f"{SAMPLES_DIR}/{index:06d}.safetensors"


@contextlib.contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock (blocks until free; released on exit or when the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if sys.platform == "win32":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_folder(root: str | os.PathLike) -> Path:
    """The folder as a Path, refusing a path that is a file (e.g. a ComfyUI prefix naming an existing file)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SynVidError(f"{root} is a file, not a SynVid folder; choose another folder name (filename_prefix)")
    return root


def remove_stale_temp_files(root: Path) -> list[str]:
    """Remove the temporary files a killed writer left (call only under the folder lock); return their names."""
    removed = []
    for folder in (root, root / SAMPLES_DIR):
        for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _sample_indices(root: Path) -> dict[int, str]:
    """``{index: relative file}`` of every sample-named file on disk."""
    folder = root / SAMPLES_DIR
    found = {}
    for entry in os.scandir(folder) if folder.is_dir() else []:
        m = SAMPLE_NAME.match(entry.name)
        if m:
            found[int(m.group(1))] = f"{SAMPLES_DIR}/{entry.name}"
    return found


def _entry(sample: SynVidSample, rel: str, path: Path) -> dict:
    entry = {"file": rel, "prompt": sample.prompt, "seed": int(sample.seed), "bytes": path.stat().st_size}
    if "batch_index" in sample.extra:
        entry["batch_index"] = int(sample.extra["batch_index"])
    return entry


def _entry_identity(entry: Mapping) -> tuple[int, str, int]:
    return sample_identity(entry["seed"], entry["prompt"], entry.get("batch_index", 0))


class SynVidWriter:
    """Adds samples to a data-set folder, safely shared with other writers (see the module docstring).

    ``info``: extra manifest keys (e.g. ``created_by``). ``report`` receives one line per repaired problem
    (stale temporary files removed, unlisted files listed again or skipped); default: ``warnings.warn``.
    Opening checks the folder (a file, an unreadable manifest: :class:`SynVidError`) without writing anything.
    """

    def __init__(self, root: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                 info: Mapping[str, object] | None = None, report: Report | None = None):
        self.root = check_folder(root)
        self.dtype = parse_dtype(dtype)
        self.info = {k: v for k, v in (info or {}).items() if k not in ("samples", "format", "format_version")}
        self.report = report or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._skipped: set[str] = set()  # unlisted files found bad once (reported once)
        self.manifest = self._read_manifest() if (self.root / MANIFEST_NAME).exists() else self._new_manifest()

    def __enter__(self) -> "SynVidWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __len__(self) -> int:
        return len(self.manifest["samples"])

    # -- state under the lock ----------------------------------------------------------------------------------
    def _new_manifest(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": dtype_name(self.dtype),
                **self.info, "samples": []}

    def _read_manifest(self) -> dict:
        manifest = load_manifest(self.root)
        for key, value in self.info.items():
            manifest.setdefault(key, value)
        return manifest

    def _sync(self) -> dict[int, str]:
        """Under the lock: remove stale temp files, re-read the manifest, list unlisted good files again.
        Returns the sample files on disk by index."""
        for name in remove_stale_temp_files(self.root):
            self.report(f"removed a temporary file left by an interrupted writer: {name}")
        exists = (self.root / MANIFEST_NAME).exists()
        self.manifest = self._read_manifest() if exists else self._new_manifest()
        on_disk = _sample_indices(self.root)
        listed = {e["file"] for e in self.manifest["samples"]}
        adopted = False
        for index in sorted(on_disk):
            rel = on_disk[index]
            if rel in listed or rel in self._skipped:
                continue
            try:
                sample = read_sample(self.root / rel, expect=expected_shapes(self.manifest))
                check_facts(self.manifest, dataset_facts(sample), self.root)
            except SynVidError as err:
                self._skipped.add(rel)
                self.report(f"SynVid: unlisted file not added to the manifest: {err}")
                continue
            self._add(sample, rel)
            adopted = True
            self.report(f"SynVid: listed {rel} again (written by a writer that stopped before its manifest update)")
        if adopted:
            write_json(self.manifest, self.root / MANIFEST_NAME)
        return on_disk

    def _add(self, sample: SynVidSample, rel: str) -> None:
        for key, value in dataset_facts(sample).items():
            self.manifest.setdefault(key, value)
        self.manifest["samples"].append(_entry(sample, rel, self.root / rel))

    # -- public API ----------------------------------------------------------------------------------------------
    def done(self) -> set[tuple[int, str, int]]:
        """Identities ``(seed, prompt, batch_index)`` of the samples in the folder now (all writers')."""
        if not self.root.is_dir():
            return set()
        with folder_lock(self.root):
            self._sync()
        return {_entry_identity(e) for e in self.manifest["samples"]}

    def has(self, seed: int, prompt: str, batch_index: int = 0) -> bool:
        """Whether this sample is in the folder; never true without prompt text (nothing to identify it by)."""
        return bool(prompt) and sample_identity(seed, prompt, batch_index) in self.done()

    def check(self, facts: Mapping[str, object]) -> None:
        """Refuse, before any sampling, facts (``dataset_facts`` keys) that differ from the data set's."""
        if self.root.is_dir():
            with folder_lock(self.root):
                self._sync()
        check_facts(self.manifest, facts, self.root)

    def entry(self, seed: int, prompt: str, batch_index: int = 0) -> dict | None:
        """The manifest entry of a sample identity, or None (always None without prompt text)."""
        if not prompt:
            return None
        want = sample_identity(seed, prompt, batch_index)
        return next((e for e in self.manifest["samples"] if _entry_identity(e) == want), None)

    def write(self, sample: SynVidSample) -> Path:
        """Validate and add one sample; returns its file. A sample whose identity (seed, prompt text, batch
        index) is already in the folder is not written again (its existing file is returned, with a report);
        samples without prompt text are always written. A refused sample changes nothing."""
        check_sample(sample, source=str(self.root), check_finite=True)  # a refused sample never takes the lock
        with folder_lock(self.root):
            on_disk = self._sync()
            check_facts(self.manifest, dataset_facts(sample), self.root)
            existing = self.entry(*identity_of(sample))
            if existing is not None:
                self.report(f"SynVid: seed {sample.seed} with this prompt is already in {self.root} "
                            f"({existing['file']}); not written twice")
                return self.root / existing["file"]
            listed = [m.group(1) for e in self.manifest["samples"] if (m := SAMPLE_NAME.match(Path(e["file"]).name))]
            index = max([*on_disk, *map(int, listed)], default=-1) + 1  # above every index ever used
            while True:
                rel = sample_filename(index)
                try:
                    path = write_sample(sample, self.root / rel, dtype=self.dtype, exclusive=True)
                    break
                except FileExistsError:  # a writer that ignores the lock took it
                    index += 1
            self._add(sample, rel)
            write_json(self.manifest, self.root / MANIFEST_NAME)
        return path

    def close(self) -> None:
        """Nothing to flush: every write updates the manifest (kept for ``with`` and old callers)."""


# ---------------------------------------------------------------------------------------------------------------
# Repair and checks


def rebuild_manifest(root: str | os.PathLike, report: Report | None = None) -> dict:
    """Recreate ``manifest.json`` from the sample files (under the lock; stale temp files are removed).

    Bad files are reported and left out, but stay on disk, so their index is never given to a new sample.
    """
    root = check_folder(root)
    if not root.is_dir():
        raise SynVidError(f"SynVid folder not found: {root}")
    say = report or (lambda msg: warnings.warn(msg, stacklevel=3))
    with folder_lock(root):
        for name in remove_stale_temp_files(root):
            say(f"removed a temporary file left by an interrupted writer: {name}")
        manifest: dict = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "samples": []}
        on_disk = _sample_indices(root)
        for index in sorted(on_disk):
            path = root / on_disk[index]
            try:
                s = read_sample(path, check_finite=False, expect=expected_shapes(manifest))
                check_facts(manifest, dataset_facts(s), root)
            except SynVidError as err:
                say(f"SynVid rebuild skipped a bad file: {err}")
                continue
            manifest.setdefault("dtype", dtype_name(s.latents.dtype))
            for key, value in dataset_facts(s).items():
                manifest.setdefault(key, value)
            manifest["samples"].append(_entry(s, on_disk[index], path))
        write_json(manifest, root / MANIFEST_NAME)
    return manifest


def verify(root: str | os.PathLike, report: Report | None = None) -> tuple[int, list[str]]:
    """Check every manifest entry against its file (readable, valid, same seed, prompt, batch index, size and
    shapes), duplicates and unlisted files. Stale temp files are reported (``report``) and removed.
    Returns (number of good samples, one message per problem)."""
    root = check_folder(root)
    say = report or (lambda msg: warnings.warn(msg, stacklevel=3))
    if root.is_dir():
        with folder_lock(root):
            for name in remove_stale_temp_files(root):
                say(f"removed a temporary file left by an interrupted writer: {name}")
    ds = SynVidDataset(root)
    bad: list[str] = []
    seen_files: set[str] = set()
    seen_ids: dict[tuple, str] = {}
    good = 0
    for i, entry in enumerate(ds.entries):
        problems = []
        if entry["file"] in seen_files:
            problems.append("listed twice in the manifest")
        seen_files.add(entry["file"])
        ident = _entry_identity(entry)
        if entry["prompt"] and ident in seen_ids:
            problems.append(f"same seed, prompt and batch index as {seen_ids[ident]} (a duplicate)")
        seen_ids.setdefault(ident, entry["file"])
        try:
            s = ds.load(i)
            if _entry_identity({"seed": s.seed, "prompt": s.prompt,
                                "batch_index": s.extra.get("batch_index", 0)}) != ident:
                problems.append(f"the manifest says seed {entry['seed']} prompt {entry['prompt']!r}, the file holds "
                                f"seed {s.seed} prompt {s.prompt!r}")
            if entry.get("bytes") not in (None, ds.path(i).stat().st_size):
                problems.append(f"size {ds.path(i).stat().st_size} bytes, the manifest says {entry['bytes']}")
            check_facts(ds.manifest, dataset_facts(s), root)
        except SynVidError as err:
            problems.append(str(err))
        if problems:
            bad.append(f"{root / entry['file']}: " + "; ".join(problems))
        else:
            good += 1
    unlisted = sorted(set(_sample_indices(root).values()) - seen_files)
    bad += [f"{root / rel}: on disk but not in the manifest (run rebuild, or the next write lists it)"
            for rel in unlisted]
    return good, bad


def main(argv: Sequence[str] | None = None) -> int:
    """``verify`` / ``rebuild`` command line: problems one per line, exit 1 if any; unusable input exit 2."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m accvideo_core.synvid.format",
                                     description="Check or repair a SynVid data-set folder.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="check every sample against the manifest and report the bad ones").add_argument(
        "root")
    sub.add_parser("rebuild", help="recreate manifest.json from the sample files").add_argument("root")
    args = parser.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        if args.cmd == "rebuild":
            manifest = rebuild_manifest(args.root, report=say)
            print(f"{args.root}: manifest lists {len(manifest['samples'])} samples")
            return 0
        good, bad = verify(args.root, report=say)
    except SynVidError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for msg in bad:
        print(f"BAD  {msg}")
    print(f"{args.root}: {good} good, {len(bad)} bad")
    return 1 if bad else 0

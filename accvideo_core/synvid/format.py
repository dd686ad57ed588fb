"""SynVid: teacher denoising trajectories on disk (one safetensors file per sample + a JSON manifest).

A data set is a folder::

    ROOT/manifest.json                 data-set wide facts + one entry per sample (rewritten atomically)
    ROOT/samples/000000.safetensors    one sample: latents, conditioning, metadata

Tensors of a sample (all latents in MODEL space, i.e. VAE latents x 0.476986, see ``accvideo_core.latents``):

| name | shape | dtype |
|---|---|---|
| ``latents`` | ``[S, 16, T, H, W]``: the trajectory latents at the teacher steps ``stored_steps`` | selectable |
| ``sigmas`` | ``[steps + 1]``: the teacher's whole sigma schedule (1 ... 0) | float32 |
| ``text_states`` | ``[L, D]`` | selectable |
| ``text_mask`` | ``[L]`` (1 = valid token) | bool |
| ``pooled`` | ``[P]`` | selectable |
| ``guidance`` | ``[1]``: the embedded guidance scale (6.0) | float32 |

String metadata: see ``REQUIRED_METADATA``. ``stored_steps`` is ``key_steps`` (0, 10, ..., 50: the 6 latents the
method uses) or every step 0..steps. The trajectory latent at step ``i`` is the teacher's Euler iterate at
``sigmas[i]`` (step 0 = the initial noise, step ``steps`` = the final latent).

Names (the same in the trainer): ``latents`` = a sample's stored trajectory latents ``[S, 16, T, H, W]`` (the file's
tensor); ``key_latents`` = the ``segments + 1`` latents at the key steps, sigma 1 first (what the trainer loads and
batches); ``latent`` = one latent ``[16, T, H, W]`` (``latent_at``, an entry of the trainer's queues);
``latent_shape`` = the shape of one latent (manifest field and ``expect`` key).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from accvideo_core.latents import LATENT_CHANNELS, latent_shape
from accvideo_core.sampling import flow_sigmas
from accvideo_core.utils import dtypes
from accvideo_core.utils.io import LazyCheckpoint, save_safetensors

FORMAT_NAME = "synvid"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLES_DIR = "samples"
TENSOR_NAMES = ("latents", "sigmas", "text_states", "text_mask", "pooled", "guidance")
REQUIRED_METADATA = (
    "format", "format_version", "prompt", "seed", "steps", "shift", "guidance", "sigmas", "key_steps",
    "stored_steps", "height", "width", "frames", "latent_space", "source_model", "source_model_hash",
)
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


class SynVidError(ValueError):
    """A SynVid file or data set is unreadable or does not hold what the format requires."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"fp32"``... -> torch dtype, with a clear error otherwise."""
    try:
        return dtypes.parse_dtype(name, allowed=STORAGE_DTYPES)
    except ValueError as err:
        raise SynVidError(str(err)) from None


def key_steps_for(steps: int, segments: int = 5) -> list[int]:
    """Teacher step indices of the ``segments + 1`` key latents: 0, 10, ..., 50 for 50 steps and 5 segments."""
    if steps % segments:
        raise SynVidError(f"teacher steps ({steps}) must be a multiple of the number of segments ({segments}) "
                          "so that the key sigmas are teacher sigmas")
    return list(range(0, steps + 1, steps // segments))


# What a sample stores: the one vocabulary of the CLI (``--store``), the manifest (``stored``), the core dumper and
# the ComfyUI node, whose combo shows the labels (published in saved workflows, so they never change).
STORE_MODES = {"key": "key latents", "all": "full trajectory"}


def stored_steps_for(steps: int, store: str, segments: int = 5) -> list[int]:
    """Teacher steps a sample stores: the key steps (``"key"``) or every step 0..steps (``"all"``)."""
    if store not in STORE_MODES:
        raise SynVidError(f"store must be one of {list(STORE_MODES)} (the {segments + 1} key latents or all "
                          f"{steps + 1}), got {store!r}")
    return key_steps_for(steps, segments) if store == "key" else list(range(steps + 1))


@dataclass
class SynVidSample:
    """One teacher trajectory and its conditioning (tensors without a batch dimension)."""

    latents: torch.Tensor            # [S, 16, T, H, W], model space: the stored trajectory latents
    stored_steps: list[int]          # teacher step index of each stored latent
    sigmas: torch.Tensor             # [steps + 1] float32
    text_states: torch.Tensor        # [L, D]
    text_mask: torch.Tensor          # [L] bool
    pooled: torch.Tensor             # [P]
    guidance: float
    prompt: str
    seed: int
    shift: float
    height: int
    width: int
    frames: int
    source_model: str
    source_model_hash: str
    key_steps: list[int] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def latent_at(self, step: int) -> torch.Tensor:
        """The trajectory latent at teacher step ``step`` (must be stored)."""
        if step not in self.stored_steps:
            raise SynVidError(f"step {step} is not stored in this sample (stored: {self.stored_steps})")
        return self.latents[self.stored_steps.index(step)]

    def key_latents(self) -> torch.Tensor:
        """``[len(key_steps), 16, T, H, W]`` latents at the key steps (sigma 1 first)."""
        return torch.stack([self.latent_at(s) for s in self.key_steps])


def sample_identity(seed: int, prompt: str, batch_index: int | str = 0) -> tuple[int, str, int]:
    """What makes a sample unique in a data set: (seed, prompt, index in the sampled batch)."""
    return int(seed), prompt, int(batch_index)


def identity_of(sample: SynVidSample) -> tuple[int, str, int]:
    return sample_identity(sample.seed, sample.prompt, sample.extra.get("batch_index", 0))


def dataset_facts(sample: SynVidSample) -> dict[str, object]:
    """The manifest's data-set wide facts this sample implies (every sample of a data set shares them)."""
    return {"steps": sample.steps, "shift": float(sample.shift), "key_steps": list(sample.key_steps),
            "stored": "all" if len(sample.stored_steps) == sample.steps + 1 else "key",
            "latent_shape": list(sample.latents.shape[1:]), "text_dim": int(sample.text_states.shape[1]),
            "pooled": list(sample.pooled.shape), "source_model": sample.source_model,
            "source_model_hash": sample.source_model_hash}


SHARED_FACTS = ("latent_shape", "text_dim", "pooled", "steps", "key_steps", "source_model_hash")
SHAPE_FACTS = ("latent_shape", "text_dim", "pooled")  # checked on every read (``read_sample(expect=...)``)


def expected_shapes(manifest: Mapping[str, object]) -> dict[str, object]:
    """The manifest's shape facts every sample of the data set must match (``read_sample``'s ``expect``)."""
    return {k: manifest[k] for k in SHAPE_FACTS if k in manifest}


def check_facts(manifest: Mapping[str, object], facts: Mapping[str, object], root: str | os.PathLike) -> None:
    """Refuse facts that differ from the data set's (one teacher's trajectories of one shape per folder)."""
    for key in SHARED_FACTS:
        if key in manifest and key in facts and _norm(manifest[key]) != _norm(facts[key]):
            raise SynVidError(f"{root}: sample {key}={facts[key]} differs from the data set's {key}={manifest[key]} "
                              "(one data set holds one teacher's trajectories of one shape); write it into a "
                              "separate folder")


def sample_metadata(sample: SynVidSample) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "prompt": sample.prompt,
        "seed": str(int(sample.seed)), "steps": str(sample.steps), "shift": repr(float(sample.shift)),
        "guidance": repr(float(sample.guidance)), "sigmas": json.dumps([float(s) for s in sample.sigmas.tolist()]),
        "key_steps": json.dumps(list(sample.key_steps)), "stored_steps": json.dumps(list(sample.stored_steps)),
        "height": str(sample.height), "width": str(sample.width), "frames": str(sample.frames),
        "latent_space": "model", "source_model": sample.source_model, "source_model_hash": sample.source_model_hash,
    }
    for k, v in sample.extra.items():
        if k in meta:
            raise SynVidError(f"extra metadata key {k!r} collides with a format field")
        meta[k] = str(v)
    return meta


def write_sample(sample: SynVidSample, path: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                 exclusive: bool = False) -> Path:
    """Validate and atomically write one sample; latents, text states and pooled are stored in ``dtype``.

    A sample with NaN or Inf values is refused (:class:`SynVidError`), so it is never written. ``exclusive``:
    fail with ``FileExistsError`` instead of replacing an existing file.
    """
    if not sample.key_steps:
        sample.key_steps = key_steps_for(sample.steps)
    check_sample(sample, source=str(path), check_finite=True)
    dt = parse_dtype(dtype)
    tensors = {
        "latents": sample.latents.to(dt), "sigmas": sample.sigmas.to(torch.float32),
        "text_states": sample.text_states.to(dt), "text_mask": sample.text_mask.to(torch.bool),
        "pooled": sample.pooled.to(dt), "guidance": torch.tensor([float(sample.guidance)], dtype=torch.float32),
    }
    return save_safetensors(tensors, path, metadata=sample_metadata(sample), overwrite=not exclusive)


def _meta_int_list(meta: Mapping[str, str], key: str, source: str) -> list[int]:
    try:
        value = json.loads(meta[key])
        assert isinstance(value, list) and all(isinstance(v, int) for v in value)
        return value
    except Exception as err:
        raise SynVidError(f"{source}: metadata {key!r} must be a JSON list of ints, got {meta.get(key)!r}") from err


def _meta_number(meta: Mapping[str, str], key: str, kind: type, source: str) -> int | float:
    try:
        return kind(meta[key])
    except ValueError as err:
        raise SynVidError(f"{source}: metadata {key!r} must be {'an integer' if kind is int else 'a number'}, got "
                          f"{meta[key]!r}") from err


def read_sample(path: str | os.PathLike, *, steps: Sequence[int] | None = None, check_finite: bool = True,
                expect: Mapping[str, tuple] | None = None) -> SynVidSample:
    """Read and validate one sample file.

    ``steps``: load only the latents at these teacher steps (e.g. the 6 key steps of a 51-latent file), reading
    just those slices. ``expect``: optional shapes every sample of a data set must share (the manifest's
    :data:`SHAPE_FACTS`, see :func:`expected_shapes`). Raises :class:`SynVidError` naming the file for every problem.
    """
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise SynVidError(f"{src}: file not found")
    try:
        with LazyCheckpoint(path) as fh:
            meta = fh.metadata
            names = set(fh.keys())
            missing = [n for n in TENSOR_NAMES if n not in names]
            if missing:
                raise SynVidError(f"{src}: missing tensors {missing}; a SynVid sample holds {list(TENSOR_NAMES)}")
            _check_metadata(meta, src)
            stored = _meta_int_list(meta, "stored_steps", src)
            if steps is None:
                latents = fh.get("latents")
                kept = stored
            else:
                absent = [s for s in steps if s not in stored]
                if absent:
                    raise SynVidError(f"{src}: teacher steps {absent} are not stored (stored: {stored})")
                latents = fh.get_rows("latents", [stored.index(s) for s in steps])
                kept = list(steps)
            t = {n: fh.get(n) for n in TENSOR_NAMES if n != "latents"}
    except SynVidError:
        raise
    except (OSError, ValueError, RuntimeError) as err:  # CheckpointError is a ValueError
        raise SynVidError(f"{src}: not a readable safetensors file ({err}); it is probably truncated or corrupt: "
                          "delete it and dump it again") from err
    sample = SynVidSample(
        latents=latents, stored_steps=kept, sigmas=t["sigmas"].float(), text_states=t["text_states"],
        text_mask=t["text_mask"].bool(), pooled=t["pooled"], guidance=float(t["guidance"].reshape(-1)[0]),
        prompt=meta["prompt"], seed=_meta_number(meta, "seed", int, src), shift=_meta_number(meta, "shift", float, src),
        height=_meta_number(meta, "height", int, src), width=_meta_number(meta, "width", int, src),
        frames=_meta_number(meta, "frames", int, src), source_model=meta["source_model"],
        source_model_hash=meta["source_model_hash"], key_steps=_meta_int_list(meta, "key_steps", src),
        extra={k: v for k, v in meta.items() if k not in REQUIRED_METADATA},
    )
    check_sample(sample, source=src, expect=expect, check_finite=check_finite, n_stored=None if steps else len(stored))
    _check_recorded_twice(meta, sample, src)
    return sample


def _check_recorded_twice(meta: Mapping[str, str], sample: SynVidSample, src: str) -> None:
    """Sigmas and guidance are stored as tensors and as metadata: both must say the same."""
    try:
        meta_sigmas = torch.tensor(json.loads(meta["sigmas"]), dtype=torch.float32)
        meta_guidance = float(meta["guidance"])
        meta_steps = int(meta["steps"])
    except (ValueError, TypeError) as err:
        raise SynVidError(f"{src}: metadata sigmas/guidance/steps unreadable ({err})") from err
    if meta_sigmas.shape != sample.sigmas.shape or not torch.equal(meta_sigmas, sample.sigmas):
        raise SynVidError(f"{src}: the sigmas tensor and the metadata 'sigmas' differ; the file was altered or "
                          "written by another tool")
    if float(torch.tensor(meta_guidance, dtype=torch.float32)) != sample.guidance:  # the tensor is float32
        raise SynVidError(f"{src}: the guidance tensor ({sample.guidance}) and the metadata 'guidance' "
                          f"({meta_guidance}) differ")
    if meta_steps != sample.steps:
        raise SynVidError(f"{src}: metadata steps={meta_steps} but the sigmas tensor has {sample.steps} steps")


def _check_metadata(meta: Mapping[str, str], src: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise SynVidError(f"{src}: not a SynVid sample (metadata format={meta.get('format')!r}, "
                          f"expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise SynVidError(f"{src}: SynVid format version {meta.get('format_version')!r} is not supported "
                          f"(this code reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise SynVidError(f"{src}: metadata is missing {missing}")
    if meta["latent_space"] != "model":
        raise SynVidError(f"{src}: latents must be stored in model (scaled) space, metadata says "
                          f"{meta['latent_space']!r}")


def check_sample(sample: SynVidSample, *, source: str = "sample", expect: Mapping[str, tuple] | None = None,
                 check_finite: bool = False, n_stored: int | None = None) -> None:
    """Validate shapes, schedule and metadata of a sample; raise :class:`SynVidError` describing the problem."""
    def fail(msg: str) -> None:
        raise SynVidError(f"{source}: {msg}")

    sig = sample.sigmas
    if sig.ndim != 1 or sig.numel() < 2:
        fail(f"sigmas must be a 1-D schedule of steps+1 values, got shape {tuple(sig.shape)}")
    if abs(float(sig[0]) - 1.0) > 1e-6 or abs(float(sig[-1])) > 1e-6 or not bool((sig[1:] < sig[:-1]).all()):
        fail("sigmas must decrease strictly from 1 to 0")
    steps = sig.numel() - 1
    if not (math.isfinite(sample.shift) and sample.shift > 0):
        fail(f"shift must be a finite number > 0, got {sample.shift}")
    if not torch.allclose(sig.float(), flow_sigmas(steps, sample.shift), atol=1e-5, rtol=0):
        fail(f"sigmas are not the shift-{sample.shift} flow schedule of {steps} steps that the teacher samples")
    if any(s < 0 or s > steps for s in sample.stored_steps) or len(set(sample.stored_steps)) != len(
            sample.stored_steps):
        fail(f"stored_steps {sample.stored_steps} must be distinct teacher steps in 0..{steps}")
    if any(s < 0 or s > steps for s in sample.key_steps) or sorted(sample.key_steps) != list(sample.key_steps):
        fail(f"key_steps {sample.key_steps} must be increasing teacher steps in 0..{steps}")
    if n_stored is not None and n_stored not in (len(sample.key_steps), steps + 1):
        fail(f"a sample stores the {len(sample.key_steps)} key latents or all {steps + 1}, not {n_stored}")
    try:
        want = latent_shape(sample.frames, sample.height, sample.width)[1:]
    except ValueError as err:
        fail(f"invalid video size in metadata: {err}")
    lat = sample.latents
    if lat.ndim != 5 or tuple(lat.shape[1:]) != want or lat.shape[0] != len(sample.stored_steps):
        fail(f"latents must have shape [{len(sample.stored_steps)}, {LATENT_CHANNELS}, {want[1]}, {want[2]}, "
             f"{want[3]}] for {sample.frames} frames at {sample.height}x{sample.width}, got {tuple(lat.shape)}")
    ts, mask, pooled = sample.text_states, sample.text_mask, sample.pooled
    if ts.ndim != 2:
        fail(f"text_states must be [L, D], got {tuple(ts.shape)}")
    if mask.ndim != 1 or mask.shape[0] != ts.shape[0]:
        fail(f"text_mask must be [L={ts.shape[0]}], got {tuple(mask.shape)}")
    if not bool(mask.any()):
        fail("text_mask has no valid token")
    if pooled.ndim != 1:
        fail(f"pooled must be [P], got {tuple(pooled.shape)}")
    if not math.isfinite(sample.guidance):
        fail("guidance is not finite")
    if expect:
        got = {"latent_shape": tuple(lat.shape[1:]), "text_dim": int(ts.shape[1]), "pooled": tuple(pooled.shape)}
        for key, value in expect.items():
            if key in got and _norm(got[key]) != _norm(value):
                fail(f"{key} is {got[key]} but the data set's samples have {value}; "
                     "all samples of a data set must share latent shape and conditioning sizes")
    if check_finite:
        for name, t in (("latents", lat), ("text_states", ts), ("pooled", pooled)):
            if not bool(torch.isfinite(t).all()):
                fail(f"{name} contains NaN or Inf values")


def _norm(v: object) -> object:
    return tuple(v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------------------------------------------------------
# Reader


def load_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SynVidError(f"{path}: unreadable manifest ({err}); run `python -m accvideo_core.synvid.format "
                          f"rebuild {root}` to recreate it from the sample files") from err
    if manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("samples"), list):
        raise SynVidError(f"{path}: not a SynVid manifest (expected format {FORMAT_NAME!r} and a samples list)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SynVidError(f"{path}: manifest version {manifest.get('format_version')!r} is not supported "
                          f"(this code reads version {FORMAT_VERSION})")
    return manifest


class SynVidDataset:
    """Random access to a SynVid folder, validating every sample it loads.

    ``load(i)`` raises :class:`SynVidError` naming the file; :meth:`iter_valid` and the trainer's batch stream
    report such files (``on_error``) and skip them instead of stopping the epoch.
    """

    def __init__(self, root: str | os.PathLike, *, steps: Sequence[int] | None = None, check_finite: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SynVidError(f"SynVid folder not found: {self.root}")
        if (self.root / MANIFEST_NAME).is_file():
            self.manifest = load_manifest(self.root)
        else:
            raise SynVidError(f"{self.root}: no {MANIFEST_NAME}; if the folder holds sample files run "
                              f"`python -m accvideo_core.synvid.format rebuild {self.root}`")
        self.entries = list(self.manifest["samples"])
        if not self.entries:
            raise SynVidError(f"{self.root}: the manifest lists no samples")
        self.steps = list(steps) if steps is not None else None
        self.check_finite = check_finite
        self.expect = expected_shapes(self.manifest)

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, index: int) -> Path:
        return self.root / self.entries[index]["file"]

    def load(self, index: int) -> SynVidSample:
        return read_sample(self.path(index), steps=self.steps, check_finite=self.check_finite, expect=self.expect)

    def iter_valid(self, indices: Iterable[int] | None = None, *,
                   on_error=None) -> Iterator[tuple[int, SynVidSample]]:
        """Yield ``(index, sample)`` for every readable sample; report the others via ``on_error(index, err)``."""
        for i in (range(len(self)) if indices is None else indices):
            try:
                yield i, self.load(i)
            except SynVidError as err:
                (on_error or _warn_bad)(i, err)


def _warn_bad(index: int, err: SynVidError) -> None:
    warnings.warn(f"skipping corrupt SynVid sample: {err}", stacklevel=3)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """``sha256:<hex>`` of a file (the source-model hash recorded in every sample)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over names, shapes, dtypes and bytes of a state dict (for models not read from a file)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


if __name__ == "__main__":  # the documented command line; it lives with the folder tools
    from accvideo_core.synvid.folder import main

    raise SystemExit(main())

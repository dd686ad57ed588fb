"""CLI: ``python -m accvideo_core.lora extract --base A --tuned B --rank R --out F``,
``merge --base A --lora F[:strength] ... --out B`` and ``inspect FILE``. Exit codes: 0 done, 2 bad input (one
``error:`` line naming the file), 130 interrupted."""
from __future__ import annotations

import argparse
import json
import sys

from accvideo_core.utils.dtypes import names_for, parse_dtype

_FLOATS = ("float16", "bfloat16", "float32")


def _extract(args: argparse.Namespace) -> int:
    from .extract import extract, progress_printer

    try:
        result = extract(args.base, args.tuned, args.rank, out=args.out, dtype=parse_dtype(args.dtype),
                         qk_norms=args.qk_norms, svd=args.svd, device=args.device,
                         progress=progress_printer())
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    summary = result.summary()
    print(json.dumps({"out": str(result.path), **summary}, indent=2))
    if summary["skipped_qk_norms"]:
        print(f"note: {summary['skipped_qk_norms']} q/k norm scales changed (largest relative change "
              f"{summary['skipped_max_rel_change']:.3g}) but were left out (--qk-norms skip).", file=sys.stderr)
    return 0


def _lora_arg(text: str) -> tuple[str, float]:
    """``path`` or ``path:strength`` (a path containing ':' keeps it when the tail is not a number)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _merge(args: argparse.Namespace) -> int:
    from .extract import progress_printer
    from .merge import FP8, merge_checkpoint

    dtype = {"keep": None, "fp8": FP8}[args.dtype] if args.dtype in ("keep", "fp8") else parse_dtype(args.dtype)
    try:
        path = merge_checkpoint(args.base, [_lora_arg(x) for x in args.lora], args.out, dtype=dtype,
                                progress=progress_printer(label="merge"))
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    print(json.dumps({"out": str(path), "bytes": path.stat().st_size}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .formats import load_lora

    state = load_lora(args.file)
    ranks = sorted({p.rank for p in state.modules.values() if p.rank})
    print(json.dumps({
        "format": state.format, "keys": state.total_keys, "modules": len(state.modules), "ranks": ranks,
        "with_diff": sum(p.diff is not None for p in state.modules.values()),
        "with_loha": sum(any(t.kind == "loha" for t in p.factored) for p in state.modules.values()),
        "with_lokr": sum(any(t.kind == "lokr" for t in p.factored) for p in state.modules.values()),
        "with_diff_b": sum(p.diff_b is not None for p in state.modules.values()),
        "unused_keys": len(state.unused), "unused_examples": list(state.unused.items())[:5],
    }, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="LoRA of the difference tuned - base (streams both files tensor by tensor)")
    ex.add_argument("--base", required=True, help="base transformer checkpoint (.safetensors / .pt)")
    ex.add_argument("--tuned", required=True, help="fine-tuned transformer checkpoint, e.g. the AccVideo model")
    ex.add_argument("--rank", type=int, required=True, help="LoRA rank (e.g. 32, 64, 128)")
    ex.add_argument("--out", required=True, help="output .safetensors")
    ex.add_argument("--dtype", choices=names_for(*_FLOATS), default="fp16", help="dtype of the written tensors")
    ex.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto")
    ex.add_argument("--device", default="cpu", help="device for the SVDs (e.g. cuda)")
    ex.add_argument("--qk-norms", choices=("comfy", "original", "skip"), default="comfy",
                    help="how to write the q/k RMSNorm scale diffs: under ComfyUI's '...norm.query_norm.scale' names "
                         "(default; native ComfyUI applies them), under original names (our loader only), or not")
    ex.set_defaults(func=_extract)
    mg = sub.add_parser("merge", help="bake LoRAs into a transformer checkpoint (streams tensor by tensor)")
    mg.add_argument("--base", required=True, help="base transformer checkpoint (.safetensors / .pt)")
    mg.add_argument("--lora", required=True, action="append", metavar="FILE[:STRENGTH]",
                    help="LoRA to merge, optionally with a strength (default 1.0); repeat for several")
    mg.add_argument("--out", required=True, help="output .safetensors (original layout)")
    mg.add_argument("--dtype", choices=["keep", "fp8", *names_for(*_FLOATS)], default="keep",
                    help="output dtype; fp8 = linear weights in float8_e4m3fn with a per-layer scale (ComfyUI's "
                         "fp8_scaled form), the rest bf16")
    mg.set_defaults(func=_merge)
    ins = sub.add_parser("inspect", help="detected format, modules and unused keys of a LoRA file")
    ins.add_argument("file")
    ins.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # CheckpointError / LoraFormatError (ValueErrors) name their file
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA-mode distillation quality against the full fine-tune on the tiny model (the distillation test's setting).

Data as in ``tests/test_train.py``: the tiny teacher (seed 0), 12 trajectories of 50 steps (4 prompts x 3 seeds,
5 frames at 32x48), the last 4 held out; 6 iterations of batch 2. Per variant: the held-out 5-step MSE to the
teacher's 50-step latents divided by the teacher's own 5-step MSE, and the trained student parameters.
Prints a table and writes ``bench/out/lora_train.json``.

    python bench/bench_lora_train.py [--seeds 0 1] [--variants full:3e-4 8:3e-3 4:3e-3:8 ...]

A variant is ``full:LR`` or ``RANK:LR[:ALPHA[:TARGET,TARGET...]]`` (alpha 0 = rank; targets default).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.utils.io import write_json  # noqa: E402

DEFAULT_VARIANTS = ("full:3e-4", "4:3e-3:8", "8:3e-3", "24:3e-3:8",
                    "32:3e-3:8:double_blocks.*,single_blocks.*,time_in.*,vector_in.out_layer,guidance_in.*")


def make_data(root: Path) -> None:
    from accvideo_core.models.loading import save_transformer
    from accvideo_core.synvid.dump import dump_synvid
    from accvideo_core.testing import tiny_transformer

    g = torch.Generator().manual_seed(1)
    emb = {"text_states": torch.randn(4, 7, 40, generator=g), "text_mask": torch.ones(4, 7, dtype=torch.long),
           "pooled": torch.randn(4, 24, generator=g), "prompts": [f"prompt {i}" for i in range(4)]}
    emb["text_mask"][:, 5:] = 0
    save_transformer(tiny_transformer(seed=0), root / "teacher.safetensors")
    dump_synvid(tiny_transformer(seed=0), emb, root / "data", num=12, frames=5, height=32, width=48,
                dtype="float32", batch_size=4, source_model="tiny", progress=lambda msg: None)


def run(root: Path, variant: str, seed: int) -> dict:
    from accvideo_core.train.config import config_from_dict
    from accvideo_core.train.loop import Trainer

    kind, lr, *rest = variant.split(":")
    model = {"teacher": str(root / "teacher.safetensors"), "gradient_checkpointing": False}
    if kind != "full":
        model["lora_rank"] = int(kind)
        if rest and float(rest[0]):
            model["lora_alpha"] = float(rest[0])
        if len(rest) > 1:
            model["lora_targets"] = rest[1].split(",")
    cfg = config_from_dict({
        "model": model, "data": {"root": str(root / "data"), "val_samples": 4},
        "optim": {"steps": 6, "total_batch": 2, "lr": float(lr), "head_lr": 1e-3, "seed": seed},
        "loss": {"head_width": 32, "head_groups": 8},
        "log": {"out_dir": str(root / f"run_{variant.replace('*', 'x').replace(',', '_')}_{seed}"),
                "val_every": 0, "ckpt_every": 0, "save_dtype": "fp32", "plot": False}})
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(cfg)
        result = trainer.run()
    trained = sum(p.numel() for g in trainer.opt.param_groups for p in g["params"])
    return {"variant": variant, "seed": seed, "ratio": result["val"]["ratio"], "trained_params": trained}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "lora_train.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp))
        for variant in args.variants:
            ratios = []
            for seed in args.seeds:
                row = run(Path(tmp), variant, seed)
                rows.append(row)
                ratios.append(row["ratio"])
            print(f"{variant:<40}{row['trained_params']:>10}   " + " / ".join(f"{r:.3f}" for r in ratios),
                  flush=True)
    write_json({"benchmark": "LoRA-mode vs full distillation, tiny model, 6 iterations of batch 2",
                "torch": torch.__version__, "rows": rows}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

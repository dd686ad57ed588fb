"""``python -m accvideo_core.train --config FILE [--set SECTION.KEY=VALUE ...] [--resume auto|DIR]``.

The same command runs under ``torchrun --nproc_per_node N`` (FSDP2 across the ranks). Exit codes: 0 done,
130 interrupted (a checkpoint was written first), 2 bad configuration or data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.train", description=(
        "AccVideo distillation trainer; the same command runs under torchrun (FSDP2). See docs/training.md."))
    parser.add_argument("--config", help="JSON or TOML config (see docs/training.md); omitted = all defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, value parsed as JSON (repeatable), e.g. optim.steps=100")
    parser.add_argument("--resume", help="'auto' (latest checkpoint of log.out_dir) or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a non-empty log.out_dir, removing its run files and checkpoints")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (TOML, every field with its help) and exit")
    args = parser.parse_args(argv)

    from accvideo_core.synvid.format import SynVidError
    from accvideo_core.train.config import ConfigError, load_config, to_toml
    from accvideo_core.utils.io import CheckpointError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(cfg))
        return 0

    from accvideo_core.train.loop import Interrupted, Trainer

    trainer = None
    code = 0
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        result = trainer.run()
        if trainer.info.is_main:
            print(json.dumps({k: v for k, v in result.items() if k != "bad_samples"}, indent=2))
    except Interrupted as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(err), file=sys.stderr)
        code = 130
    except (ConfigError, SynVidError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    finally:
        if trainer is not None:
            trainer.close()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)  # gloo can abort at interpreter exit after correct work; the group is already destroyed
    sys.exit(code)

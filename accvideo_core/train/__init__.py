"""The AccVideo distillation trainer: ``python -m accvideo_core.train --config FILE`` (also under torchrun).

See docs/training.md for the method, every configuration field and its default.
"""
from accvideo_core.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]


def train(*args, **kwargs):
    """See :func:`accvideo_core.train.loop.train` (imported lazily: the loop pulls in the model code)."""
    from accvideo_core.train.loop import train as _train

    return _train(*args, **kwargs)

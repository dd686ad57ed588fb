"""The miniature HunyuanVideo family's inputs: the procedural shapes data set and the tiny text encoder."""
from .data import (CAPTION_TEMPLATE, ClipSpec, MiniVideoConfig, MiniVideoDataset, attribute_combos, clip_spec,
                   parse_caption, render_clip)
from .text_encoder import TextEncoding, TinyTextEncoder, TinyTextEncoderConfig

__all__ = ["CAPTION_TEMPLATE", "ClipSpec", "MiniVideoConfig", "MiniVideoDataset", "TextEncoding", "TinyTextEncoder",
           "TinyTextEncoderConfig", "attribute_combos", "clip_spec", "parse_caption", "render_clip"]

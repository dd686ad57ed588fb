"""Test-only ComfyUI nodes for the integration tier (loaded next to the pack, never shipped).

- AccVideoTest_Conditioning: a seeded random HunyuanVideo-style CONDITIONING for the tiny test transformer
  (stands in for DualCLIPLoader + CLIPTextEncode, whose multi-GB text encoders cannot be used here). Raises when
  the text contains FAIL_ON_PURPOSE, to produce an execution error on demand.
- AccVideoTest_RandomLatent: a seeded N(0, 1) VAE-space video latent.
- AccVideoTest_SaveTensors: writes IMAGE / LATENT tensors as float32 safetensors into the output folder, so tests
  compare values exactly (PNG would quantise).
"""
import os

import torch


class Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}), "seed": ("INT", {"default": 0}),
                             "tokens": ("INT", {"default": 7}), "dim": ("INT", {"default": 32})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "AccVideoTest"

    def make(self, text, seed, tokens, dim):
        if "FAIL_ON_PURPOSE" in text:
            raise ValueError("test conditioning asked to fail")
        gen = torch.Generator().manual_seed(seed + sum(text.encode()))
        cond = torch.randn(1, tokens, dim, generator=gen)
        pooled = torch.randn(1, 768, generator=gen)
        return ([[cond, {"pooled_output": pooled}]],)


class RandomLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "latent_frames": ("INT", {"default": 1}),
                             "height": ("INT", {"default": 6}), "width": ("INT", {"default": 8})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "AccVideoTest"

    def make(self, seed, latent_frames, height, width):
        gen = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, 16, latent_frames, height, width, generator=gen)},)


class SaveTensors:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "tensors"})},
                "optional": {"images": ("IMAGE",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "AccVideoTest"

    def save(self, name, images=None, latent=None):
        import folder_paths
        from safetensors.torch import save_file

        tensors = {}
        if images is not None:
            tensors["images"] = images.float().contiguous()
        if latent is not None:
            tensors["latent"] = latent["samples"].float().contiguous()
        save_file(tensors, os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors"))
        return {"ui": {"text": [name]}}


NODE_CLASS_MAPPINGS = {"AccVideoTest_Conditioning": Conditioning, "AccVideoTest_RandomLatent": RandomLatent,
                       "AccVideoTest_SaveTensors": SaveTensors}

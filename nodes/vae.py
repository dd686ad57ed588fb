"""AccVideo VAE Decode: our memory-bounded HunyuanVideo decoder on the weights of ComfyUI's native VAE."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

BUDGETS = ["auto", "1GB", "2GB", "4GB", "6GB", "8GB", "12GB", "16GB", "24GB", "32GB", "48GB", "80GB"]
MODES = ["exact", "fast"]


def budget_bytes(budget: str) -> int | str:
    """``"auto"`` or ``"<n>GB"`` -> what the core decoder takes."""
    if budget == "auto":
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"memory_budget must be one of {BUDGETS}, got {budget!r}")
    return int(budget[:-2]) * 2**30


class AccVideoVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoVAEDecode",
            display_name="AccVideo VAE Decode",
            category="AccVideo/vae",
            description="Decodes a HunyuanVideo LATENT with AccVideo's decoder, reusing the native VAE's weights in "
                        "place (no second copy). exact: equals an untiled decode of the official VAE within float "
                        "rounding (whole-video GroupNorm statistics, frame-causal mid-block attention streamed "
                        "over tiles); a budget it cannot meet is an error, never an approximate decode. fast: "
                        "approximate tiles streamed through time, lowest memory. "
                        "Note: ComfyUI 0.3.64's native VAEDecode omits the official frame-causal attention mask, so "
                        "for more than one latent frame the native result differs from the official VAE; this node "
                        "follows the official VAE.",
            inputs=[
                io.Vae.Input("vae", tooltip="The native HunyuanVideo VAE (VAELoader hunyuan_video_vae_bf16)."),
                io.Latent.Input("samples", tooltip="HunyuanVideo video latent (VAE space)."),
                io.Combo.Input("memory_budget", options=BUDGETS, default="auto",
                               tooltip="Device memory the decode may use, weights included. auto: 90% of the free "
                                       "GPU memory (a quarter of the free RAM on CPU)."),
                io.Combo.Input("mode", options=MODES, default="exact",
                               tooltip="exact: same result as an untiled decode at any budget it can meet. fast: "
                                       "approximate spatial tiles streamed through time with per-tile GroupNorm "
                                       "statistics, blended at the seams (lowest memory)."),
            ],
            outputs=[io.Image.Output(tooltip="Frames [batch x frames, H, W, 3] in [0, 1].")],
        )

    @classmethod
    def execute(cls, vae, samples, memory_budget, mode) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        from accvideo_core.latents import video_size_of_latent
        from accvideo_core.models.vae_loading import load_vae
        from accvideo_core.video import video_to_frames

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        latents = samples["samples"]
        try:
            video_size_of_latent(latents)
        except ValueError as err:
            raise ValueError(f"samples: {err}") from None
        comfy.model_management.load_models_gpu([vae.patcher])  # the native weights, on the decode device
        decoder = load_vae(vae, device=None)  # wraps those tensors in place: no second copy
        pbar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, max(total, 1))

        video = decoder.decode(latents, mode=mode, memory_budget=budget_bytes(memory_budget), progress=progress,
                               output_device=comfy.model_management.intermediate_device())
        return io.NodeOutput(video_to_frames(video))

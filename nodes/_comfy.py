"""Glue between ComfyUI's runtime and the core: run ``accvideo_core.sampling.euler_flow`` with ComfyUI's own model.

The model is called through ComfyUI's guider and k-diffusion wrapper, so LoRA patches, fp8 weights, memory
management, previews and interruption all behave as for native samplers. ComfyUI modules are imported inside the
functions: this file is importable (and its nodes describable) without a running ComfyUI.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def check_video_latent(latent: dict, prompt: dict | None, unique_id: str | None, input_name: str) -> None:
    """Fail early with a clear message when the LATENT (or the empty-latent node that made it) has a bad size.

    ComfyUI's ``EmptyHunyuanLatentVideo`` silently rounds a ``length`` that is not 4k+1 down; when the latent comes
    straight from such a node, its ``length``/``width``/``height`` widgets are checked too.
    """
    from accvideo_core.latents import video_size_of_latent
    from accvideo_core.latents import latent_shape

    try:
        video_size_of_latent(latent["samples"])
        src = _source_node(prompt, unique_id, input_name)
        if src is not None:
            values = {k: src["inputs"].get(k) for k in ("length", "height", "width")}
            if all(isinstance(v, int) for v in values.values()):
                latent_shape(values["length"], values["height"], values["width"])
    except ValueError as err:
        raise ValueError(f"{input_name}: {err}") from None


def _source_node(prompt: dict | None, unique_id: str | None, input_name: str) -> dict | None:
    if not prompt or unique_id is None:
        return None
    link = prompt.get(str(unique_id), {}).get("inputs", {}).get(input_name)
    if isinstance(link, list) and len(link) == 2:
        return prompt.get(str(link[0]))
    return None


def with_guidance(positive: list, guidance: float | None) -> list:
    """The conditioning with its embedded guidance set (like FluxGuidance), or unchanged for ``None``."""
    if guidance is None:
        return positive
    import node_helpers

    return node_helpers.conditioning_set_values(positive, {"guidance": float(guidance)})


COMFY_DEFAULT_GUIDANCE = 6.0  # what ComfyUI's HunyuanVideo model uses when the conditioning has no guidance


def guidance_of(positive: list, guidance: float | None) -> float:
    """The embedded guidance the model will use: the widget's, else the conditioning's, else ComfyUI's default."""
    if guidance is not None:
        return float(guidance)
    return float(positive[0][1].get("guidance", COMFY_DEFAULT_GUIDANCE)) if positive else COMFY_DEFAULT_GUIDANCE


def check_fits(model: Any, latent: dict, host_bytes: int = 0) -> None:
    """Refuse, before allocating anything, a video whose transformer step cannot fit the device's whole memory
    (``accvideo_core.sampling.sampling_min_bytes``, a lower bound) or whose recording exceeds the free RAM."""
    import comfy.model_management as mm

    from accvideo_core.sampling import sampling_min_bytes

    net = model.model.diffusion_model
    params = getattr(net, "params", None)
    dtype = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
    need = sampling_min_bytes(tuple(latent["samples"].shape), int(getattr(net, "hidden_size", 3072)),
                              mlp_ratio=float(getattr(params, "mlp_ratio", 4.0)),
                              compute_bytes=max(2, torch.empty((), dtype=dtype).element_size()),
                              patch=tuple(getattr(net, "patch_size", (1, 2, 2))))
    device = model.load_device
    total = mm.get_total_memory(device)
    shape = "x".join(str(n) for n in latent["samples"].shape)
    if need > total:
        raise ValueError(f"latent_image {shape} is too large: one transformer step needs at least {need / 2**30:.1f} "
                         f"GiB but {device} has {total / 2**30:.1f} GiB in all; use a smaller width, height or "
                         "length (or batch size)")
    free_host = mm.get_free_memory(torch.device("cpu"))
    if host_bytes > free_host:
        raise ValueError(f"recording the trajectory of latent_image {shape} needs {host_bytes / 2**30:.1f} GiB of "
                         f"RAM, {free_host / 2**30:.1f} GiB are free; store the key latents only or make the video "
                         "smaller")


def stored_final_latent(latent: dict, files: Sequence, step: int) -> dict:
    """A LATENT holding the final latents (teacher step ``step``) of samples already in a SynVid folder."""
    from accvideo_core.latents import to_vae_space
    from accvideo_core.synvid.format import read_sample

    final = torch.stack([read_sample(f, steps=[step]).latents[0].float() for f in files])
    out = latent.copy()
    out["samples"] = to_vae_space(final)
    return out


def sample_with_comfy_model(model: Any, positive: list, latent: dict, seed: int, sigmas: torch.Tensor, *,
                            on_start=None, on_step=None) -> dict:
    """Euler flow sampling of ``latent`` with ComfyUI's MODEL; returns the new LATENT dict.

    Noise is made exactly like ``comfy.sample.prepare_noise`` (CPU generator), so with the same seed and sigmas
    this reproduces native ``KSampler(euler)``. ``on_start(x)`` sees the initial model-space latent and
    ``on_step(info)`` every ``euler_flow`` step (model space), e.g. for trajectory recording. A step whose latent
    holds NaN or Inf stops sampling with ``NonFiniteLatentError`` naming the step.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    from accvideo_core.flow_bridge import DenoiserVelocity
    from accvideo_core.sampling import euler_flow

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    steps = len(sigmas) - 1
    preview = latent_preview.prepare_callback(model, steps)

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        velocity = DenoiserVelocity(lambda xx, s: model_k(xx, s, **extra_args),
                                    before_call=comfy.model_management.throw_exception_if_processing_interrupted)
        if on_start is not None:
            on_start(x)

        def step_done(info: dict) -> None:
            if on_step is not None:
                on_step(info)
            if callback is not None:
                callback({"i": info["i"], "x": info["x"], "denoised": velocity.last_denoised,
                          "sigma": sigmas[info["i"]], "sigma_hat": sigmas[info["i"]]})

        return euler_flow(velocity, x, sigmas, callback=step_done, check_finite=True)

    guider = comfy.samplers.CFGGuider(model)  # cfg 1 and no negative: one model call per step (as BasicGuider)
    guider.inner_set_conds({"positive": positive})
    samples = guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(sampler_function), sigmas.clone(),
                            denoise_mask=latent.get("noise_mask"), callback=preview,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out


def conditioning_tensors(positive: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text_states [L, D], text_mask [L] bool, pooled [P]) of the first entry of a ComfyUI CONDITIONING."""
    if not positive:
        raise ValueError("positive conditioning is empty; connect a CLIPTextEncode output")
    cond, extras = positive[0][0], positive[0][1]
    text_states = cond[0].detach().float().cpu()
    mask = extras.get("attention_mask")
    text_mask = (mask[0].reshape(-1) > 0) if mask is not None else torch.ones(text_states.shape[0], dtype=torch.bool)
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError("the conditioning has no pooled_output; encode the prompt with DualCLIPLoader "
                         "(type hunyuan_video) + CLIPTextEncode")
    return text_states, text_mask.cpu(), pooled[0].detach().float().cpu()


def model_file_names(folder: str) -> Sequence[str]:
    """Files ComfyUI lists for ``folder`` (``diffusion_models``, ``loras``...); empty outside ComfyUI."""
    import folder_paths

    return folder_paths.get_filename_list(folder)


def teacher_transformer(model: Any):
    """Our transformer over the weights of ComfyUI's MODEL as it computes with them (patches applied, on its load
    device), sharing its tensors where the dtype allows. Every other model is unloaded first: the run needs the
    memory (``accvideo_core.train.from_model.transformer_from_state_dict``)."""
    import comfy.model_management as mm

    from accvideo_core.train.from_model import transformer_from_state_dict

    mm.unload_all_models()
    mm.load_models_gpu([model], force_full_load=True)
    net = model.model.diffusion_model
    axes = getattr(getattr(net, "params", None), "axes_dim", None)
    return transformer_from_state_dict(net.state_dict(), device=model.load_device,
                                       rope_axes=tuple(axes) if axes else None)


def with_weights(model: Any, path: str) -> Any:
    """A clone of ``model`` whose transformer weights are replaced by those of the original-layout file ``path``
    (ModelPatcher ``set`` patches; the input MODEL is untouched)."""
    from accvideo_core.train.from_model import comfy_model_weights

    patched = model.clone()
    patched.add_patches({key: ("set", (value,)) for key, value in comfy_model_weights(path).items()}, 1.0)
    return patched


def progress_text(text: str, node_id: str | None) -> None:
    """Show ``text`` under the node in the UI (ComfyUI's progress text); nothing without a server."""
    from server import PromptServer

    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)

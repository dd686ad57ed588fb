"""The ComfyUI nodes of AccVideo: thin V3 wrappers over ``accvideo_core`` (the only package importing ComfyUI).

Once published, inputs are never reordered or renamed: saved workflows store widget values by position.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .lora import AccVideoLoraExtract, AccVideoLoraLoader
from .sampling import AccVideoSampler, AccVideoSchedule, AccVideoTrajectoryDump
from .train import AccVideoPromptList, AccVideoTrain
from .vae import AccVideoVAEDecode
from .video import AccVideoSaveVideo

NODES: list[type[io.ComfyNode]] = [
    AccVideoSampler,
    AccVideoSchedule,
    AccVideoLoraLoader,
    AccVideoLoraExtract,
    AccVideoVAEDecode,
    AccVideoTrajectoryDump,
    AccVideoSaveVideo,
    AccVideoPromptList,
    AccVideoTrain,
]


class AccVideoExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AccVideoExtension:
    return AccVideoExtension()

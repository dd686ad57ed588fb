"""CPU workaround: run the VAE's 3D convolutions through oneDNN (mkldnn) at batch size 1.

PyTorch's convolution dispatcher sends an fp32 CPU conv3d to its slow native kernel (``slow_conv3d``) when
``N * C * T * H <= 20480`` - every full-resolution layer of a small VAE at batch 1, which is how
``HunyuanVideoVAE.decode`` runs (one sample at a time). oneDNN computes the same convolution 10-15x faster there
(equal up to float rounding, ~1e-6). :func:`use_onednn_conv3d` switches the ``nn.Conv3d`` modules of a model to
call ``torch.mkldnn_convolution`` directly on fp32 CPU tensors (any other device/dtype keeps the normal path).
State dicts are unchanged. The proper place for this is the VAE itself; until it does it, the miniature family
applies it when it loads the VAE.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN for fp32 CPU inputs (same parameters, same results)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


def use_onednn_conv3d(model: nn.Module) -> nn.Module:
    """Switch every ``nn.Conv3d`` of ``model`` (in place) to :class:`OneDNNConv3d`; returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDNNConv3d
    return model

"""Model definitions (HunyuanVideo transformer, causal 3D VAE) and their checkpoint loaders."""

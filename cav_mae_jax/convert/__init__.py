"""Weights in and out: the original's PyTorch state dicts and ImageNet MAE <-> our Flax params.

Modules: state_dict (torch <-> flax renames and transposes, NumPy only), formats (.pth /
.safetensors / .npz files), io (orbax params checkpoints: `load_params`), imagenet_mae and
cavmae_checkpoint (mapping rules), pos_embed (audio grid resizing), export (original layout,
evaluation export), pipelines (file-to-file conversions behind tools/convert.py).
"""

from cav_mae_jax.convert.io import load_model_config, load_params, save_params

__all__ = ["load_params", "load_model_config", "save_params"]

"""Weights in and out of PyTorch: export to timm's VisionTransformer layout, import ImageNet MAE weights.

Nothing here imports torch at module import; only reading a `.pth` file does (`torch.load` with
`weights_only=True`). See docs/pytorch.md.
"""
from mmcmae_jax.port.mae_import import (init_encoders_from_mae, load_mae_into_encoder, read_state_dict,
                                        resample_pos_embed)
from mmcmae_jax.port.timm_layout import (encoder_spec, flax_encoder_to_timm, state_dict_to_tree, timm_constructor,
                                         timm_kwargs, timm_name, tree_to_state_dict)

__all__ = [
    "encoder_spec", "flax_encoder_to_timm", "init_encoders_from_mae", "load_mae_into_encoder",
    "read_state_dict", "resample_pos_embed", "state_dict_to_tree", "timm_constructor", "timm_kwargs",
    "timm_name", "tree_to_state_dict",
]

"""Transfer of the RGB encoder with RGB input alone: dense heads (DPT, linear), depth and segmentation
losses, metrics over a whole evaluation set, the fine-tuning objective and its config, label-fraction
splits. The commands are `mmcmae_jax.finetune` and `mmcmae_jax.evaluate`; see docs/transfer.md."""

"""The trainer shared by both pre-training stages and by fine-tuning."""

"""Stage 3, fine-tuning: QLoRA/LoRA training with checkpoints and resume, speed profiles,
several processes."""

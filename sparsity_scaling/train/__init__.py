"""Pretraining: WSD schedule, atomic checkpoints and the DeepSpeed training loop."""

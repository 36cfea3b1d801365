"""Training: one loop (`train`) for LoRA, DoRA, QLoRA, full fine-tuning and the mixture router; data, evaluation;
`fast/` is a backend of that loop."""
from lorakit.train.loop import TrainResult, train  # noqa: E402

__all__ = ["train", "TrainResult"]

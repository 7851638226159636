"""Ray Tune trainables (placeholder during the restructure: the real module replaces this)."""
from dtd_ray.train.retrain import finetune_trainable, head_trainable  # noqa: F401

"""Plain PyTorch training loops (no Ray): they run in a Tune trial, a Ray task or a bare process.

``defaults`` (the one defaults table per retraining mode), ``head`` (the decomposed head on
cached features), ``finetune`` (the whole network through the decomposed head), ``backbone``
(training the project's own backbones).
"""

"""Backbones and how they run (no Ray).

``backbones`` (the registry: ``get_backbone(name)``, ``list_backbones()``, weights as typed
records), ``checkpoints`` (fetch, sha256, safe unpickling), ``cifar_resnet`` (the CIFAR
ResNets), ``runtime`` (the one device rule, precision policy and input normalisation),
``extractor`` (the batch-inference callable), ``linear_head`` (the (W, b) records came from).
"""

"""Backbones and how they run (no Ray).

``backbones`` (the registry: ``get_backbone(name)``, ``list_backbones()``), ``pretrained`` (the
weights as typed records), ``builders`` (the family builders, the split at the final linear, the
strict checkpoint fit), ``factories`` (a user's own network: ``module:callable``, ``file.py:callable``,
``timm:<name>``), ``checkpoints`` (fetch from a file, a URL or the object store, sha256, safe
unpickling), ``cifar_resnet`` and ``cifar_zoo`` (the project's CIFAR architectures), ``runtime``
(the one device rule, precision policy and input normalisation), ``extractor`` (the
batch-inference callable and the pipeline's model stage, which writes its records), ``linear_head`` (the (W, b) stored beside the records).
"""

"""Dataset sources and the CPU prepare stage (no Ray).

``sources`` (``parse_source``: image folders, CIFAR pickles, Fashion-MNIST IDX, by URI),
``transforms`` (``prepare_batch``: decode, channels, resize/crop, seeded augmentation).
"""

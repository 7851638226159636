"""The published reference numbers, pinned on the shared CIFAR-10 and checkpoints (skips without them).

README's and the report's tables rest on these: the public CIFAR ResNets' full accuracies
with CIFAR-10 normalisation (../shared/data/README.md measured them the same way), and
ResNet-20's decomposed accuracies at k1 = k2 = 5 (test_decompose_real.py pins those).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10_DIR, CIFAR_RESNETS_DIR, needs_shared_data
from dtd_ray.models.backbones import get_backbone
from dtd_ray.models.runtime import normalize_images

pytestmark = needs_shared_data()

CHECKPOINTS = {32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th", 56: "resnet56-4bfd9763.th"}
FULL_ACCURACY = {32: 92.35, 44: 92.89, 56: 93.26}  # % on cifar10/test with CIFAR-10 statistics


@pytest.fixture(scope="module")
def cifar10_test():
    """The 10,000 test images (N, 32, 32, 3) uint8 and labels, class = sorted folder order."""
    classes = sorted(p.name for p in (CIFAR10_DIR / "test").iterdir())
    imgs, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((CIFAR10_DIR / "test" / name).iterdir()):
            imgs.append(np.asarray(Image.open(p).convert("RGB")))
            labels.append(c)
    return np.stack(imgs), np.array(labels)


@pytest.mark.parametrize("depth", sorted(CHECKPOINTS))
def test_real_full_accuracy_of_the_deeper_resnets(cifar10_test, depth):
    images, labels = cifar10_test
    bb = get_backbone(f"cifar_resnet{depth}", weights=str(CIFAR_RESNETS_DIR / CHECKPOINTS[depth]),
                      normalization="cifar10").eval()
    mean, std = torch.tensor(bb.preprocessing.mean), torch.tensor(bb.preprocessing.std)
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(images), 1000):
            z = bb(normalize_images(torch.from_numpy(images[s : s + 1000]), mean=mean, std=std))
            correct += int((z.argmax(1).numpy() == labels[s : s + 1000]).sum())
    assert len(images) == 10_000
    assert 100.0 * correct / len(images) == pytest.approx(FULL_ACCURACY[depth], abs=0.02)

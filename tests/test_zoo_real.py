"""The five public CIFAR-10 checkpoints of other families (../shared/data/cifar_zoo), through the project.

Each name resolves in the registry, its checkpoint loads strictly (``weights_only``), the local
file is recognised as the registered weights by its sha256 (so it brings its own normalisation:
no ``--normalization``), and the project's extraction of a fixed 1,000-image subset of CIFAR-10
test (the first 100 images of each class, by file name) gives the pinned top-1 accuracy and the
feature width m. The accuracy each record states is over the whole test split, as the
``cifar10_zoo`` sweep measured it (``results/cifar10_zoo/extraction.json``); the subset keeps the
suite's time (DenseNet-40 and ShuffleNet v1 are slow on a CPU). Skips without the data.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CIFAR10_DIR, CIFAR_ZOO_DIR, needs_shared_data
from dtd_ray.io import records, schema
from dtd_ray.models.backbones import get_backbone

pytestmark = [needs_shared_data(),
              pytest.mark.skipif(not CIFAR_ZOO_DIR.is_dir(), reason=f"real-data test: {CIFAR_ZOO_DIR} is not present")]

# name: (checkpoint file, penultimate width m, top-1 % on the 10,000 test images as measured by
# extraction, top-1 % on the 1,000-image subset as measured by this test)
ZOO = {
    "cifar_resnet20_proj": ("cifar10_resnet20-4118986f.pt", 64, 92.60, 92.60),
    "cifar_resnet56_proj": ("cifar10_resnet56-187c023a.pt", 64, 94.37, 94.30),
    "cifar_shufflenetv2_x0_5": ("cifar10_shufflenetv2_x0_5-1308b4e9.pt", 1024, 90.65, 90.20),
    "cifar_densenet40_k12": ("densenet40_k12-5d543813.pkl", 448, 94.47, 95.40),
    "cifar_shufflenet_g3_x0_5": ("shufflenet_g3_0.5x-6fa8e5db.pkl", 480, 92.60, 92.80),
}
PER_CLASS = 100


@pytest.fixture(scope="module")
def test_subset(tmp_path_factory):
    """The first PER_CLASS test images of every class (sorted file names), hard-linked into an image folder."""
    import os

    root = tmp_path_factory.mktemp("cifar10_subset")
    for c in sorted(os.listdir(CIFAR10_DIR / "test")):
        (root / "test" / c).mkdir(parents=True)
        for f in sorted(os.listdir(CIFAR10_DIR / "test" / c))[:PER_CLASS]:
            os.link(CIFAR10_DIR / "test" / c / f, root / "test" / c / f)
    return root


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_checkpoint_loads_strictly_with_its_record(name):
    file, m, acc, _ = ZOO[name]
    bb = get_backbone(name, weights=str(CIFAR_ZOO_DIR / file))
    assert bb.feature_dim == m and bb.num_classes == 10
    assert bb.weights is not None and bb.weights.sha256.startswith(file.rsplit("-", 1)[1].split(".")[0])
    assert bb.weights.metrics["cifar10_test_acc"] == acc  # the record states what the extraction test pins
    assert bb.weights.license and bb.weights.source.startswith("https://github.com/")
    assert bb.preprocessing.size == 32 and bb.preprocessing.mean != (0.485, 0.456, 0.406)
    assert list(bb.blocks)[-1]  # channel maps: the last named stage is pooled into f


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_extraction_accuracy_on_a_fixed_test_subset(ray_local, tmp_path, test_subset, name):
    from dtd_ray.ray.extract import ExtractConfig, run_extract

    file, m, _, acc = ZOO[name]
    cfg = ExtractConfig(model=name, weights=str(CIFAR_ZOO_DIR / file), dataset=f"imagefolder:{test_subset}",
                        splits=("test",), output=str(tmp_path), kmax=8, batch_size=500)
    run_extract(cfg)
    rec = records.load_records(str(tmp_path / "records"), model=name, split="test",
                               columns=[schema.LABEL, schema.PRED, schema.FEATURES])
    n = 10 * PER_CLASS
    assert len(rec[schema.LABEL]) == n and rec[schema.FEATURES].shape == (n, m)
    measured = 100.0 * float(np.mean(rec[schema.PRED] == rec[schema.LABEL]))
    print(f"{name}: {measured:.2f} % top-1 on the {n}-image subset of cifar10/test, m = {m}")
    assert measured == pytest.approx(acc, abs=0.01)  # one image is 0.1 point

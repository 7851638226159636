"""The five public CIFAR-10 checkpoints of other families (../shared/data/cifar_zoo), through the project.

Each name resolves in the registry, its checkpoint loads strictly (``weights_only``), the local
file is recognised as the registered weights by its sha256 (so it brings its own normalisation:
no ``--normalization``), and the project's extraction over the whole CIFAR-10 test split gives
the top-1 accuracy its record states (±0.02) and the feature width m. Skips without the data.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CIFAR10_DIR, CIFAR_ZOO_DIR, needs_shared_data
from dtd_ray.io import records, schema
from dtd_ray.models.backbones import get_backbone

pytestmark = [needs_shared_data(),
              pytest.mark.skipif(not CIFAR_ZOO_DIR.is_dir(), reason=f"real-data test: {CIFAR_ZOO_DIR} is not present")]

# name: (checkpoint file, penultimate width m, top-1 % on the 10,000 test images as measured by extraction)
ZOO = {
    "cifar_resnet20_proj": ("cifar10_resnet20-4118986f.pt", 64, 92.60),
    "cifar_resnet56_proj": ("cifar10_resnet56-187c023a.pt", 64, 94.37),
    "cifar_shufflenetv2_x0_5": ("cifar10_shufflenetv2_x0_5-1308b4e9.pt", 1024, 90.65),
    "cifar_densenet40_k12": ("densenet40_k12-5d543813.pkl", 448, 94.47),
    "cifar_shufflenet_g3_x0_5": ("shufflenet_g3_0.5x-6fa8e5db.pkl", 480, 92.60),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_checkpoint_loads_strictly_with_its_record(name):
    file, m, acc = ZOO[name]
    bb = get_backbone(name, weights=str(CIFAR_ZOO_DIR / file))
    assert bb.feature_dim == m and bb.num_classes == 10
    assert bb.weights is not None and bb.weights.sha256.startswith(file.rsplit("-", 1)[1].split(".")[0])
    assert bb.weights.metrics["cifar10_test_acc"] == acc  # the record states what the extraction test pins
    assert bb.weights.license and bb.weights.source.startswith("https://github.com/")
    assert bb.preprocessing.size == 32 and bb.preprocessing.mean != (0.485, 0.456, 0.406)
    assert list(bb.blocks)[-1]  # channel maps: the last named stage is pooled into f


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_extraction_accuracy_on_the_whole_test_split(ray_local, tmp_path, name):
    from dtd_ray.ray.extract import ExtractConfig, run_extract

    file, m, acc = ZOO[name]
    cfg = ExtractConfig(model=name, weights=str(CIFAR_ZOO_DIR / file), dataset=f"imagefolder:{CIFAR10_DIR}",
                        splits=("test",), output=str(tmp_path), kmax=8, batch_size=500)
    run_extract(cfg)
    rec = records.load_records(str(tmp_path / "records"), model=name, split="test",
                               columns=[schema.LABEL, schema.PRED, schema.FEATURES])
    assert len(rec[schema.LABEL]) == 10_000
    assert rec[schema.FEATURES].shape == (10_000, m)
    measured = 100.0 * float(np.mean(rec[schema.PRED] == rec[schema.LABEL]))
    print(f"{name}: {measured:.2f} % top-1 on cifar10/test, m = {m}")
    assert measured == pytest.approx(acc, abs=0.02)

"""Backbones: registry, CIFAR ResNets, checkpoint loading, torchvision splitting."""

from __future__ import annotations

import collections
import hashlib
import shutil

import pytest
import torch
from conftest import CIFAR_RESNETS_DIR, needs_shared_data
from torch import nn

from dtd_ray.models import backbones as B
from dtd_ray.models.backbones import (
    NORMALIZATIONS,
    Backbone,
    Preprocessing,
    get_backbone,
    list_backbones,
    load_state_dict_file,
    register_backbone,
    split_final_linear,
)

torch.set_num_threads(2)

AKAMASTER = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}


class EvilDict(collections.OrderedDict):
    """A dict subclass: unpickling it would import and run code from this module."""


def _public_format(model_sd: dict[str, torch.Tensor]) -> dict:
    """The layout of the public pytorch_resnet_cifar10 checkpoints."""
    return {"best_prec1": 91.0, "state_dict": collections.OrderedDict(("module." + k, v) for k, v in model_sd.items())}


def _original_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """A Backbone's tensors under the original model's key names (head -> linear)."""
    sd = {k[len("features.") :]: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    sd.update({"linear." + k[len("head.") :]: v for k, v in backbone.state_dict().items() if k.startswith("head.")})
    return sd


@pytest.fixture(scope="module")
def resnet20() -> Backbone:
    torch.manual_seed(0)
    return get_backbone("cifar_resnet20", weights=None)


# --------------------------------------------------------------------------- registry
def test_registry_lists_both_families():
    names = list_backbones()
    assert names == sorted(names)
    for n in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110",
              "cifar_resnet1202", "resnet50", "vgg16", "vgg16_bn", "convnext_tiny", "mobilenet_v3_small",
              "densenet121", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "resnext50_32x4d",
              "wide_resnet50_2", "mobilenet_v2"):  # fmt: skip
        assert n in names
    assert "squeezenet1_0" not in names  # ends in a conv, not a linear layer


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("cifar_resnet20", builder=lambda: nn.Linear(2, 2))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as e:
        get_backbone("resnet5")
    msg = str(e.value)
    assert "'resnet5'" in msg and "resnet50" in msg and "cifar_resnet20" in msg and "\n" not in msg


def test_no_default_weights_says_pass_a_file():
    with pytest.raises(ValueError, match="no default weights.*weights="):
        get_backbone("cifar_resnet110")


def test_preprocessing_normalization():
    p = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, size=32)
    assert p.with_normalization("cifar10").mean == NORMALIZATIONS["cifar10"][0]
    assert p.with_normalization("cifar10").size == 32
    with pytest.raises(ValueError, match="valid: .*imagenet"):
        p.with_normalization("mnist")
    with pytest.raises(ValueError, match="channel"):
        p.with_normalization("fashion-mnist")
    with pytest.raises(ValueError):
        Preprocessing(mean=(0.5,), std=(0.5,), size=28)  # channels defaults to 3


def test_cifar_default_record():
    rec = B._REGISTRY["cifar_resnet20"].default_weights
    assert rec.source.startswith("https://") and rec.source.endswith("resnet20-12fca82f.th")
    assert rec.sha256.startswith("12fca82f") and len(rec.sha256) == 64
    assert rec.preprocessing.mean == NORMALIZATIONS["imagenet"][0] and rec.preprocessing.size == 32
    assert rec.categories[0] == "airplane" and rec.categories[-1] == "truck" and len(rec.categories) == 10
    assert rec.metrics["cifar10_test_acc@imagenet_norm"] == 91.73


def test_torchvision_default_record_comes_from_the_enum():
    rec = B._REGISTRY["resnet50"].default_weights
    assert rec.name == "ResNet50_Weights.IMAGENET1K_V2" and rec.source == "torchvision:IMAGENET1K_V2"
    assert (rec.preprocessing.size, rec.preprocessing.resize) == (224, 232)
    assert len(rec.categories) == 1000
    assert B._REGISTRY["efficientnet_b0"].default_weights.preprocessing.interpolation == "bicubic"


def test_torchvision_weights_names_are_checked():
    with pytest.raises(ValueError, match="no member 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        get_backbone("resnet50", weights="torchvision:IMAGENET1K_V9")
    with pytest.raises(ValueError, match="takes ResNet50_Weights"):
        get_backbone("resnet50", weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="1000 classes"):
        get_backbone("resnet50", weights="torchvision:IMAGENET1K_V2", num_classes=10)


# --------------------------------------------------------------------------- CIFAR ResNets
def test_cifar_resnet_split_reproduces_forward(resnet20):
    assert isinstance(resnet20, Backbone) and not resnet20.training
    assert resnet20.feature_dim == 64 and resnet20.num_classes == 10
    assert sum(p.numel() for p in resnet20.parameters()) == 269_722
    assert list(resnet20.blocks) == ["layer1", "layer2", "layer3"]
    assert resnet20.blocks["layer3"] is resnet20.features.layer3
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = resnet20.forward_features(x)
        assert f.shape == (4, 64) and (f >= 0).all()
        torch.testing.assert_close(resnet20.head(f), resnet20(x))


def test_cifar_resnet_state_dict_keys_match_public_layout(resnet20):
    keys = set(_original_state_dict(resnet20))
    assert {"conv1.weight", "bn1.running_var", "layer1.2.conv2.weight", "layer3.0.bn1.bias",
            "linear.weight", "linear.bias"} <= keys  # fmt: skip
    assert not any("shortcut" in k for k in keys)  # option A has no parameters


def test_cifar_resnet_depths():
    for depth, n in ((32, 5), (44, 7), (56, 9), (110, 18)):
        b = get_backbone(f"cifar_resnet{depth}", weights=None)
        assert len(b.features.layer1) == n and b.feature_dim == 64


def test_public_checkpoint_format_roundtrip(resnet20, tmp_path):
    path = tmp_path / "r20.th"
    torch.save(_public_format(_original_state_dict(resnet20)), path)
    loaded = get_backbone("cifar_resnet20", weights=str(path))
    assert loaded.weights is None  # not a registered file
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), resnet20(x), rtol=0, atol=0)
    sd = load_state_dict_file(str(path))
    assert "linear.weight" in sd and not any(k.startswith("module.") for k in sd)


def test_bare_and_backbone_format_checkpoints(resnet20, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    for i, sd in enumerate(
        (_original_state_dict(resnet20), {"model": _original_state_dict(resnet20)}, resnet20.state_dict())
    ):
        path = tmp_path / f"ck{i}.pt"
        torch.save(sd, path)
        with torch.no_grad():
            torch.testing.assert_close(get_backbone("cifar_resnet20", weights=str(path))(x), resnet20(x))


def test_wrong_depth_is_a_clear_error(tmp_path):
    r32 = get_backbone("cifar_resnet32", weights=None)
    path = tmp_path / "r32.th"
    torch.save(_public_format(_original_state_dict(r32)), path)
    with pytest.raises(ValueError) as e:
        get_backbone("cifar_resnet20", weights=str(path))
    msg = str(e.value)
    assert "r32.th" in msg and "cifar_resnet20" in msg and "unexpected key" in msg
    assert "cifar_resnet32" in msg and "\n" not in msg


def test_wrong_num_classes_hints_the_option(resnet20, tmp_path):
    path = tmp_path / "r20.th"
    torch.save(_public_format(_original_state_dict(resnet20)), path)
    with pytest.raises(ValueError, match=r"shape mismatch.*linear\.weight.*num_classes=10"):
        get_backbone("cifar_resnet20", weights=str(path), num_classes=100)


def test_sha256_mismatch_raises(resnet20, tmp_path):
    path = tmp_path / "r20.th"
    torch.save(_public_format(_original_state_dict(resnet20)), path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_state_dict_file(str(path), sha256=good)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_state_dict_file(str(path), sha256="0" * 64)


def test_pickle_with_code_is_refused(resnet20, tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": EvilDict(_original_state_dict(resnet20))}, path)
    with pytest.raises(ValueError, match=r"refused: the checkpoint carries code \(weights_only=True\).*EvilDict"):
        get_backbone("cifar_resnet20", weights=str(path))


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_state_dict_file(str(tmp_path / "nope.th"))
    path = tmp_path / "x.th"
    torch.save({"a": 1}, path)
    with pytest.raises(ValueError, match="non-tensor"):
        load_state_dict_file(str(path))


def test_url_download_is_cached_and_checked(resnet20, tmp_path, monkeypatch):
    src = tmp_path / "src.th"
    torch.save(_public_format(_original_state_dict(resnet20)), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # no network in tests
        calls.append(url)
        shutil.copyfile(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.invalid/models/r20-abc.th"
    sd = load_state_dict_file(url, sha256=digest)
    assert "conv1.weight" in sd
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "r20-abc.th").is_file()
    load_state_dict_file(url, sha256=digest)
    assert calls == [url]  # the second call reads the cache
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_state_dict_file(url, sha256="f" * 64)


def test_single_channel_model():
    b = get_backbone("cifar_resnet20", weights=None, in_channels=1)
    assert b.preprocessing.channels == 1 and b.preprocessing.size == 28
    with torch.no_grad():
        assert b(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="channel"):
        get_backbone("cifar_resnet20", weights=None, in_channels=1, normalization="cifar10")


def test_normalization_override_keeps_weights_record(resnet20):
    b = get_backbone("cifar_resnet20", weights=None, normalization="cifar10")
    assert b.preprocessing.mean == NORMALIZATIONS["cifar10"][0] and b.preprocessing.size == 32


def test_backbone_pickles(resnet20):
    import pickle

    clone = pickle.loads(pickle.dumps(resnet20))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), resnet20(x))
    assert clone.blocks["layer3"] is clone.features.layer3


# --------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize(
    "name",
    ["resnet18", "vgg11", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0", "densenet121", "regnet_y_400mf"],
)
def test_torchvision_split_reproduces_logits(name):
    import torchvision

    torch.manual_seed(0)
    b = get_backbone(name, weights=None)
    assert b.weights is None and not b.training and b.num_classes == 1000
    assert b.blocks and all(isinstance(m, nn.Module) for m in b.blocks.values())
    # The reference: the same parameters in an unsplit torchvision model.
    ref = torchvision.models.get_model(name, weights=None).eval()
    ref.load_state_dict(_unsplit_state_dict(b, ref))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = b.forward_features(x)
        assert f.shape == (2, b.feature_dim) and b.feature_dim == b.head.in_features
        torch.testing.assert_close(b.head(f), ref(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(b(x), ref(x), rtol=0, atol=1e-5)
    if name.startswith("vgg"):
        assert (f >= 0).all() and b.feature_dim == 4096  # fc7 after ReLU


def _unsplit_state_dict(b: Backbone, ref: nn.Module) -> dict[str, torch.Tensor]:
    """``b``'s tensors under ``ref``'s keys: the head goes back where the Identity is."""
    feats = {k[len("features.") :]: v for k, v in b.state_dict().items() if k.startswith("features.")}
    head_keys = [k for k in ref.state_dict() if k not in feats]
    assert len(head_keys) == 2  # exactly the final linear's weight and bias
    return {**feats, **{k: b.head.state_dict()[k.rsplit(".", 1)[1]] for k in head_keys}}


def test_torchvision_blocks_end_before_pooling():
    b = get_backbone("resnet18", weights=None)
    assert list(b.blocks) == ["layer1", "layer2", "layer3", "layer4"]
    vgg = get_backbone("vgg11", weights=None)
    last = list(vgg.blocks)[-1]
    assert isinstance(vgg.blocks[last], nn.ReLU)  # the layer before VGG's last max pool
    assert isinstance(vgg.features.features[int(last.split(".")[1]) + 1], nn.MaxPool2d)
    dense = get_backbone("densenet121", weights=None)
    assert "features.denseblock4" in dense.blocks and list(dense.blocks)[-1] == "features.norm5"


def test_torchvision_num_classes_passes_through():
    b = get_backbone("resnet18", weights=None, num_classes=7)
    assert b.num_classes == 7 and b.feature_dim == 512
    with pytest.raises(ValueError, match="in_channels"):
        get_backbone("resnet18", weights=None, in_channels=1)


def test_squeezenet_has_no_final_linear():
    import torchvision

    with pytest.raises(ValueError, match="squeezenet1_0 does not end in one linear layer.*AdaptiveAvgPool2d"):
        split_final_linear(torchvision.models.squeezenet1_0(weights=None), name="squeezenet1_0", input_size=64)


def test_split_final_linear_rejects_post_processing():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="final module is Softmax"):
        split_final_linear(model, name="toy", input_size=2)
    features, head = split_final_linear(nn.Sequential(nn.Conv2d(3, 5, 1), nn.Flatten(), nn.Linear(20, 4)),
                                        name="toy", input_size=2)  # fmt: skip
    assert head.in_features == 20 and isinstance(features[2], nn.Identity)


# --------------------------------------------------------------------------- real data
@needs_shared_data()
def test_shared_resnet20_checkpoint_is_the_registered_record():
    b = get_backbone("cifar_resnet20", weights=str(CIFAR_RESNETS_DIR / AKAMASTER[20]))
    assert b.weights is B._REGISTRY["cifar_resnet20"].default_weights
    assert b.preprocessing.mean == NORMALIZATIONS["imagenet"][0]
    with torch.no_grad():
        z = b(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 10) and torch.isfinite(z).all()


@needs_shared_data()
@pytest.mark.parametrize("depth", sorted(AKAMASTER))
def test_shared_checkpoints_load_strictly(depth):
    path = CIFAR_RESNETS_DIR / AKAMASTER[depth]
    b = get_backbone(f"cifar_resnet{depth}", weights=str(path))
    assert b.weights is not None and b.weights.sha256.startswith(AKAMASTER[depth].split("-")[1][:8])
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(b.head.weight, raw["module.linear.weight"], rtol=0, atol=0)


def test_checkpoint_file_fixes_num_classes_and_in_channels(tmp_path):
    # A Fashion-MNIST-style checkpoint (1 channel, 3 classes) loads by path alone.
    src = get_backbone("cifar_resnet20", weights=None, num_classes=3, in_channels=1)
    path = tmp_path / "fm.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    b = get_backbone("cifar_resnet20", weights=str(path))
    assert b.num_classes == 3 and b.preprocessing.channels == 1 and b.preprocessing.size == 28
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(b(x), src.eval()(x))

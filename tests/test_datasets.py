"""Tests of dtd_ray.data.sources: source specs, readers, the prepare stage and the Ray datasets.

Every fixture writes tiny files into tmp_path; the one real-data test (the installed
Fashion-MNIST package) skips where the package is absent.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dtd_ray.data import transforms
from dtd_ray.data.sources import parse_idx, parse_source
from dtd_ray.data.transforms import cifar_augment, prepare_batch
from dtd_ray.ray import datasets
from dtd_ray.ray.datasets import to_ray_dataset

from conftest import CIFAR10_DIR, FASHION_MNIST_DIR


def Prep(*, size: int = 8, resize: int | None = None, channels: int = 3) -> SimpleNamespace:
    """Stands in for dtd_ray.data.preprocessing.Preprocessing: prepare_batch only reads these attributes.

    A SimpleNamespace rather than a class defined here, because Ray workers unpickle the
    fn_kwargs of map_batches and cannot import this test module.
    """
    return SimpleNamespace(size=size, resize=resize, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)


def rng_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


# ----------------------------------------------------------------------------- image folders
@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/{train,test}/{cat,dog,empty}/…: PNG and JPEG files, one empty class, plus noise to ignore."""
    root = tmp_path / "folder"
    files = {
        "train": {"cat": ["b.png", "a.jpg", "sub/c.PNG"], "dog": ["x.jpeg", "y.png"]},
        "test": {"cat": ["t1.png"], "dog": ["t2.JPG", "t0.png"]},
    }
    for split, by_class in files.items():
        for cls, names in by_class.items():
            for k, name in enumerate(names):
                fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
                save(Image.fromarray(rng_image((8, 8, 3), seed=k)), root / split / cls / name, format=fmt)
        (root / split / "empty").mkdir(parents=True)
        (root / split / "cat" / "notes.txt").write_text("not an image")
        (root / split / "cat" / ".hidden.png").write_bytes(b"")
        (root / split / "README").write_text("beside the class folders")
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a split
    return root


def test_imagefolder_classes_labels_and_stable_ids(image_tree, caplog):
    src = parse_source(f"imagefolder:{image_tree}")
    assert src.kind == "imagefolder"
    assert src.path == str(image_tree)
    assert src.classes == ("cat", "dog", "empty")
    assert src.splits() == ("test", "train")
    assert src.num_rows("train") == 5 and src.num_rows("test") == 3

    with caplog.at_level(logging.WARNING, logger="dtd_ray.data.sources"):
        cols = src.read_numpy("train")
    assert "empty" in caplog.text  # the empty class folder is allowed but reported
    assert set(cols) == {"sample_id", "label", "path"}
    assert cols["sample_id"].dtype == np.int64 and cols["label"].dtype == np.int32
    np.testing.assert_array_equal(cols["sample_id"], np.arange(5))
    # sorted by (class, path inside the class folder); label = index of the sorted class folder
    rel = [os.path.relpath(p, image_tree / "train") for p in cols["path"]]
    assert rel == ["cat/a.jpg", "cat/b.png", "cat/sub/c.PNG", "dog/x.jpeg", "dog/y.png"]
    np.testing.assert_array_equal(cols["label"], [0, 0, 0, 1, 1])
    test = src.read_numpy("test")
    assert [os.path.basename(p) for p in test["path"]] == ["t1.png", "t0.png", "t2.JPG"]
    np.testing.assert_array_equal(test["label"], [0, 1, 1])

    again = parse_source(f"imagefolder:{image_tree}").read_numpy("train")  # a fresh listing: same ids
    for name in cols:
        np.testing.assert_array_equal(again[name], cols[name])


def test_imagefolder_class_mismatch_across_splits(image_tree):
    (image_tree / "test" / "empty").rmdir()
    (image_tree / "test" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folders of split 'train'.*missing: bird.*extra: empty") as e:
        parse_source(f"imagefolder:{image_tree}")
    assert "\n" not in str(e.value)


def test_imagefolder_without_split_level_is_an_error(tmp_path):
    save(Image.new("RGB", (4, 4)), tmp_path / "cls" / "a.png")  # class folders directly under PATH
    with pytest.raises(ValueError, match="no class folders"):
        parse_source(f"imagefolder:{tmp_path}")


def test_source_pickles_without_its_cache(image_tree):
    src = parse_source(f"imagefolder:{image_tree}")
    cols = src.read_numpy("train")
    assert not cols["path"].flags.writeable  # the cached listing is shared, so it is read-only
    copy = pickle.loads(pickle.dumps(src))
    assert copy == src and hash(copy) == hash(src) and copy._cache == {}
    np.testing.assert_array_equal(copy.read_numpy("train")["path"], cols["path"])


@pytest.mark.skipif(not CIFAR10_DIR.is_dir(), reason=f"real-data test: {CIFAR10_DIR} is not present")
def test_imagefolder_real_cifar10():
    src = parse_source(f"imagefolder:{CIFAR10_DIR}")
    assert src.classes == tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
    assert (src.num_rows("train"), src.num_rows("test")) == (50000, 10000)
    cols = src.read_numpy("test")
    np.testing.assert_array_equal(np.bincount(cols["label"]), [1000] * 10)
    out = prepare_batch({k: v[::500] for k, v in cols.items()}, preprocessing=Prep(size=32))
    assert out["ok"].all() and out["image"].shape == (20, 32, 32, 3)


# ----------------------------------------------------------------------------- CIFAR pickles
def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_batch(n: int, seed: int, label_key: bytes, extra: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        label_key: [int(x) for x in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
        **(extra or {}),
    }


@pytest.fixture
def cifar10_dir(tmp_path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    for k in range(1, 6):
        write_pickle(folder / f"data_batch_{k}", cifar_batch(2, k, b"labels"))
    write_pickle(folder / "test_batch", cifar_batch(3, 99, b"labels"))
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072})
    return tmp_path


def test_cifar10_pickles(cifar10_dir):
    src = parse_source(f"cifar10:{cifar10_dir}")
    assert src.classes[:3] == ("airplane", "automobile", "bird") and len(src.classes) == 10
    assert src.splits() == ("train", "test")
    assert src.num_rows("train") == 10 and src.num_rows("test") == 3
    cols = src.read_numpy("train")
    assert set(cols) == {"sample_id", "label", "image"}
    assert cols["image"].shape == (10, 32, 32, 3) and cols["image"].dtype == np.uint8
    np.testing.assert_array_equal(cols["sample_id"], np.arange(10))
    # rows concatenate data_batch_1..5 in order; each row is channel-planar R, G, B (32x32 each)
    batches = [cifar_batch(2, k, b"labels") for k in range(1, 6)]
    np.testing.assert_array_equal(cols["label"], sum((b[b"labels"] for b in batches), []))
    data = np.concatenate([b[b"data"] for b in batches])
    i, y, x, c = 7, 3, 30, 2
    assert cols["image"][i, y, x, c] == data[i, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(cols["image"][4, :, :, 1], data[4, 1024:2048].reshape(32, 32))

    # PATH may also be the batches folder itself
    inner = parse_source(f"cifar10:{cifar10_dir / 'cifar-10-batches-py'}")
    np.testing.assert_array_equal(inner.read_numpy("test")["image"], src.read_numpy("test")["image"])


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    extra = {b"coarse_labels": [0, 1, 2, 3]}
    write_pickle(folder / "train", cifar_batch(4, 1, b"fine_labels", extra))
    write_pickle(folder / "test", cifar_batch(2, 2, b"fine_labels", {b"coarse_labels": [0, 0]}))
    fine = [f"class{k:02d}".encode() for k in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    src = parse_source(f"cifar100:{tmp_path}")
    assert len(src.classes) == 100 and src.classes[7] == "class07"
    cols = src.read_numpy("train")
    assert cols["image"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(cols["label"], cifar_batch(4, 1, b"fine_labels")[b"fine_labels"])
    assert src.num_rows("test") == 2


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_code_is_refused(cifar10_dir, tmp_path):
    marker = tmp_path / "pwned"
    write_pickle(cifar10_dir / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil(marker), b"labels": []})
    src = parse_source(f"cifar10:{cifar10_dir}")
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*refusing to load (posix|os|nt)\.system"):
        src.read_numpy("train")
    assert not marker.exists()

    write_pickle(cifar10_dir / "cifar-10-batches-py" / "batches.meta", Evil(marker))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        parse_source(f"cifar10:{cifar10_dir}")
    assert not marker.exists()


# ----------------------------------------------------------------------------- Fashion-MNIST
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train=6, n_test=4, *, image_magic=None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng_image((n, 28, 28), seed=n)
        labels = np.arange(n, dtype=np.uint8) % 10
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, image_magic)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        arrays[split] = (images, labels)
    return arrays


def test_fashion_mnist_idx_files(tmp_path):
    arrays = write_fashion(tmp_path / "fm")
    assert idx_bytes(arrays["train"][0])[:4] == (2051).to_bytes(4, "big")
    src = parse_source(f"fashion-mnist:{tmp_path / 'fm'}")
    assert src.classes[0] == "T-shirt/top" and len(src.classes) == 10
    assert src.splits() == ("train", "test")
    assert (src.num_rows("train"), src.num_rows("test")) == (6, 4)
    cols = src.read_numpy("test")
    assert cols["image"].shape == (4, 28, 28, 1) and cols["image"].dtype == np.uint8
    np.testing.assert_array_equal(cols["image"][..., 0], arrays["test"][0])
    np.testing.assert_array_equal(cols["label"], arrays["test"][1])
    np.testing.assert_array_equal(cols["sample_id"], np.arange(4))


def test_fashion_mnist_bad_idx(tmp_path):
    write_fashion(tmp_path / "fm", image_magic=2049)  # labels' magic on the images file
    src = parse_source(f"fashion-mnist:{tmp_path / 'fm'}")
    with pytest.raises(ValueError, match="bad IDX magic number 2049, expected 2051"):
        src.read_numpy("train")
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="data bytes, but the header says"):
        parse_idx(good[:-1], expected_magic=2051)
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x00\x00", expected_magic=2051)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real-data test: {FASHION_MNIST_DIR} is absent (apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_installed_package():
    src = parse_source("fashion-mnist")
    assert src.path == str(FASHION_MNIST_DIR)
    assert (src.num_rows("train"), src.num_rows("test")) == (60000, 10000)
    labels = src.read_numpy("train")["label"]
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    assert src.read_numpy("test")["image"].shape == (10000, 28, 28, 1)


# ----------------------------------------------------------------------------- spec errors
def test_spec_errors_are_one_line(tmp_path, image_tree):
    with pytest.raises(ValueError) as e:
        parse_source("imagenet:/data")
    assert "imagefolder, parquet, cifar10, cifar100, fashion-mnist" in str(e.value) and "\n" not in str(e.value)

    missing = tmp_path / "nope"
    for spec in (f"imagefolder:{missing}", f"cifar10:{missing}", f"fashion-mnist:{missing}"):
        with pytest.raises(FileNotFoundError) as e:
            parse_source(spec)
        assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        parse_source(f"fashion-mnist:{missing}")
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        parse_source(f"cifar10:{tmp_path}")  # a folder, but no CIFAR files in it

    src = parse_source(f"imagefolder:{image_tree}")
    with pytest.raises(ValueError, match="unknown split 'val'.*valid: test, train") as e:
        src.read_numpy("val")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- prepare_batch
def path_batch(paths) -> dict[str, np.ndarray]:
    arr = np.empty(len(paths), dtype=object)
    arr[:] = [str(p) for p in paths]
    return {"sample_id": np.arange(len(paths), dtype=np.int64), "label": np.zeros(len(paths), np.int32), "path": arr}


def test_prepare_converts_modes(tmp_path):
    rgb = rng_image((8, 8, 3), seed=1)
    rgba = np.concatenate([rgb, rng_image((8, 8, 1), seed=2)], axis=-1)
    grey = rng_image((8, 8), seed=3)
    pal = Image.fromarray(rgb).quantize(colors=16)
    grey16 = (grey.astype(np.uint16) * 257)  # 16-bit grey: 0..65535
    files = [
        save(Image.fromarray(grey), tmp_path / "grey.png"),
        save(Image.fromarray(rgba), tmp_path / "rgba.png"),
        save(pal, tmp_path / "pal.png"),
        save(Image.fromarray(grey16), tmp_path / "grey16.png"),
        save(Image.fromarray(grey > 127), tmp_path / "bits.png"),
        save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.tif"),
    ]
    assert Image.open(files[3]).mode == "I;16" and Image.open(files[2]).mode == "P"
    out = prepare_batch(path_batch(files), preprocessing=Prep(size=8, channels=3))
    assert out["ok"].all(), out["error"]
    assert out["image"].shape == (6, 8, 8, 3) and out["image"].dtype == np.uint8
    assert list(out["error"]) == [""] * 6
    np.testing.assert_array_equal(out["image"][0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(out["image"][1], rgb)  # RGBA -> RGB drops alpha (no compositing)
    np.testing.assert_array_equal(out["image"][2], np.asarray(pal.convert("RGB")))
    np.testing.assert_array_equal(out["image"][3], np.repeat(grey[..., None], 3, -1))  # scaled, not clipped
    assert set(np.unique(out["image"][4])) <= {0, 255}
    np.testing.assert_array_equal(out["image"][5], np.asarray(Image.open(files[5]).convert("RGB")))

    grey_out = prepare_batch(path_batch(files[:2]), preprocessing=Prep(size=8, channels=1))
    assert grey_out["image"].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(grey_out["image"][0, ..., 0], grey)
    np.testing.assert_array_equal(grey_out["image"][1, ..., 0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_prepare_bad_files_skipped_or_failed(tmp_path):
    img = Image.fromarray(rng_image((64, 64, 3), seed=5))
    good = save(img, tmp_path / "good.png")
    png = save(img, tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    jpg = io.BytesIO()
    img.save(jpg, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    bad = ["trunc.png", "trunc.jpg", "empty.png", "noise.jpg", "missing.png"]
    batch = path_batch([good] + [tmp_path / b for b in bad])

    out = prepare_batch(batch, preprocessing=Prep(size=64))
    np.testing.assert_array_equal(out["ok"], [True] + [False] * len(bad))
    for err in out["error"][1:5]:
        assert err.startswith("undecodable: ") and "\n" not in err
    assert out["error"][3 + 1].startswith("undecodable")
    assert out["error"][5].startswith("unreadable: ")
    assert not out["image"][1:].any()  # bad rows are zeros
    np.testing.assert_array_equal(out["image"][0], np.asarray(img))

    for name in bad:
        with pytest.raises(ValueError, match=f"bad input sample .*{name}.*: (undecodable|unreadable)"):
            prepare_batch(path_batch([good, tmp_path / name]), preprocessing=Prep(size=64), on_bad_input="fail")


def test_prepare_wrong_size_is_skipped_without_resize(tmp_path):
    path = save(Image.fromarray(rng_image((20, 30, 3))), tmp_path / "wide.png")
    out = prepare_batch(path_batch([path]), preprocessing=Prep(size=32))
    assert not out["ok"][0] and out["error"][0] == "wrong size 20x30, expected 32x32"
    arrays = {"sample_id": np.arange(2), "label": np.zeros(2, np.int32), "image": rng_image((2, 20, 30, 3))}
    out = prepare_batch(arrays, preprocessing=Prep(size=32))
    assert not out["ok"].any() and out["image"].shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="bad input sample 0: wrong size 20x30"):
        prepare_batch(arrays, preprocessing=Prep(size=32), on_bad_input="fail")


def test_prepare_resize_center_crop_matches_torchvision(tmp_path):
    from torchvision import transforms

    img = Image.fromarray(rng_image((50, 75, 3), seed=7))
    path = save(img, tmp_path / "photo.png")
    prep = Prep(size=24, resize=28)
    out = prepare_batch(path_batch([path]), preprocessing=prep)
    assert out["ok"][0] and out["image"].shape == (1, 24, 24, 3)
    expected = transforms.Compose([transforms.Resize(28), transforms.CenterCrop(24)])(img)
    np.testing.assert_array_equal(out["image"][0], np.asarray(expected))

    # array sources take the same path (28x28 grey Fashion-MNIST into a 3-channel ImageNet-style model)
    arrays = {"sample_id": np.arange(3), "label": np.zeros(3, np.int32), "image": rng_image((3, 28, 28, 1))}
    out = prepare_batch(arrays, preprocessing=Prep(size=32, resize=36))
    assert out["ok"].all() and out["image"].shape == (3, 32, 32, 3)
    grey = Image.fromarray(arrays["image"][1, ..., 0])
    ref = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32)])(grey)
    np.testing.assert_array_equal(out["image"][1], np.repeat(np.asarray(ref)[..., None], 3, -1))

    with pytest.raises(ValueError, match="resize must be None or an int >= size"):
        prepare_batch(arrays, preprocessing=Prep(size=32, resize=16))

    # Preprocessing.interpolation (torchvision's mode names) picks the PIL filter
    bicubic = SimpleNamespace(**vars(prep), interpolation="bicubic")
    out = prepare_batch(path_batch([path]), preprocessing=bicubic)
    expected = transforms.Compose(
        [transforms.Resize(28, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(24)]
    )(img)
    np.testing.assert_array_equal(out["image"][0], np.asarray(expected))
    with pytest.raises(ValueError, match="unknown preprocessing.interpolation 'cubic'"):
        prepare_batch(arrays, preprocessing=SimpleNamespace(**vars(prep), interpolation="cubic"))


def test_prepare_arrays_vectorised_and_unnormalised():
    images = rng_image((5, 8, 8, 3), seed=11)
    batch = {"sample_id": np.arange(10, 15), "label": np.arange(5), "image": images}
    out = prepare_batch(batch, preprocessing=Prep(size=8))
    assert set(out) == set(transforms.PREPARED_COLUMNS)
    assert out["sample_id"].dtype == np.int64 and out["label"].dtype == np.int32
    assert out["ok"].dtype == bool and out["ok"].all()
    assert out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], images)  # raw pixels: mean/std are the model's job

    luma = prepare_batch(batch, preprocessing=Prep(size=8, channels=1))["image"]
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])
    np.testing.assert_array_equal(luma[..., 0], pil)  # ITU-R 601 luma, bit-exact with PIL
    grey = {**batch, "image": images[..., :1]}
    repeated = prepare_batch(grey, preprocessing=Prep(size=8))["image"]
    np.testing.assert_array_equal(repeated, np.repeat(images[..., :1], 3, -1))

    ragged = np.empty(2, dtype=object)  # variable-shape tensor columns arrive as object arrays
    ragged[:] = [images[0], images[1, :4]]
    out = prepare_batch({"sample_id": np.arange(2), "label": np.zeros(2), "image": ragged}, preprocessing=Prep(size=8))
    np.testing.assert_array_equal(out["ok"], [True, False])
    assert out["error"][1] == "wrong size 4x8, expected 8x8"


def test_prepare_empty_batch():
    for prep in (Prep(size=8), Prep(size=8, resize=10)):
        empty = {"sample_id": np.zeros(0, np.int64), "label": np.zeros(0, np.int32)}
        for extra in ({"image": np.zeros((0, 4, 4, 3), np.uint8)}, {"path": np.zeros(0, dtype=object)}):
            out = prepare_batch({**empty, **extra}, preprocessing=prep)
            assert out["image"].shape == (0, 8, 8, 3) and out["ok"].shape == (0,)


def test_cifar_augment_reproducible_and_shard_independent():
    images = rng_image((6, 8, 8, 3), seed=3)
    ids = np.arange(100, 106)
    a = cifar_augment(images, sample_ids=ids, seed=1)
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, cifar_augment(images, sample_ids=ids, seed=1))
    assert not np.array_equal(a, cifar_augment(images, sample_ids=ids, seed=2))
    # one row at a time (a different sharding) gives the same result
    for i in range(6):
        np.testing.assert_array_equal(a[i : i + 1], cifar_augment(images[i : i + 1], sample_ids=ids[i : i + 1], seed=1))
    # each output is a horizontally-flipped-or-not crop of the zero-padded input
    rng = np.random.default_rng([1, 103])
    top, left, flip = rng.integers(0, 9), rng.integers(0, 9), rng.random() < 0.5
    padded = np.pad(images[3], ((4, 4), (4, 4), (0, 0)))
    crop = padded[top : top + 8, left : left + 8]
    np.testing.assert_array_equal(a[3], crop[:, ::-1] if flip else crop)

    batch = {"sample_id": ids, "label": np.zeros(6, np.int32), "image": images}
    out = prepare_batch(batch, preprocessing=Prep(size=8), augment="cifar", seed=1)
    np.testing.assert_array_equal(out["image"], a)
    with pytest.raises(ValueError, match="unknown augment 'mixup'; valid: None, cifar"):
        prepare_batch(batch, preprocessing=Prep(size=8), augment="mixup")
    with pytest.raises(ValueError, match="unknown on_bad_input"):
        prepare_batch(batch, preprocessing=Prep(size=8), on_bad_input="ignore")


# ----------------------------------------------------------------------------- block sizes


def test_blocks_make_whole_calls_of_the_model_stage():
    """Blocks are cut so that a model-stage call (rows per file) is never cut short at a block's end."""
    assert datasets.whole_calls(5350, 4096) == 4096 and datasets.whole_calls(6200, 4096) == 8192
    assert datasets.whole_calls(512, 1024) == 512 and datasets.whole_calls(700, 1000) == 500  # divisors below
    assert datasets.whole_calls(1500, 1) == 1500 and datasets.whole_calls(3, 7) == 1
    for rows, call in ((5350, 4096), (700, 1000), (1365, 1024), (2048, 4096)):
        r = datasets.whole_calls(rows, call)
        assert (r % call == 0) if r >= call else (call % r == 0)
    np.testing.assert_array_equal(datasets._row_bounds(10, 4), [0, 4, 8, 10])
    np.testing.assert_array_equal(datasets._row_bounds(8, 4), [0, 4, 8])
    np.testing.assert_array_equal(datasets._row_bounds(0, 4), [0, 0])  # one empty block


def test_folder_blocks_by_decoded_size_and_cluster_cpus():
    """About 32 MiB of decoded pixels a block, 512 to 2,048 files, and two blocks per CPU where the split has
    the files: 32-px images in large blocks, 224-px ones in 512, a small split spread over the cores."""
    rows = datasets.folder_block_rows
    assert rows(250_000, decoded_bytes=32 * 32 * 3, cpus=16) == 2048
    assert rows(1_281_167, decoded_bytes=224 * 224 * 3, cpus=16) == 512
    assert rows(10_000, decoded_bytes=32 * 32 * 3, cpus=2) == 2048 and rows(10_000, decoded_bytes=3072, cpus=4) == 1250
    assert rows(10_000, decoded_bytes=32 * 32 * 3, cpus=64) == 512  # the floor: never tiny tasks
    assert rows(10_000, decoded_bytes=None, cpus=2) == 512  # size unknown: the floor


# ----------------------------------------------------------------------------- Ray datasets
def rows_by_id(ds) -> dict[str, np.ndarray]:
    cols = ds.to_pandas()  # a few rows: fine to collect
    cols = cols.sort_values("sample_id")
    return {c: np.stack(cols[c].to_numpy()) if c == "image" else cols[c].to_numpy() for c in cols.columns}


def test_to_dataset_imagefolder(ray_local, image_tree):
    src = parse_source(f"imagefolder:{image_tree}")
    ds = to_ray_dataset(src, "train", override_num_blocks=2)
    assert ds.num_blocks() == 2
    got, want = rows_by_id(ds), src.read_numpy("train")
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

    prepared = ds.map_batches(prepare_batch, fn_kwargs={"preprocessing": Prep(size=8)}, batch_format="numpy")
    rows = rows_by_id(prepared)
    assert rows["ok"].all() and rows["image"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(rows["label"], want["label"])


def test_to_dataset_uri_paths(ray_local, image_tree):
    """A URI source (here file://) names its rows by URI and prepare_batch reads them through pyarrow.fs."""
    src = parse_source(f"imagefolder:file://{image_tree}")
    paths = src.read_numpy("test")["path"]
    assert all(p.startswith("file://") for p in paths)
    out = prepare_batch(src.read_numpy("test"), preprocessing=Prep(size=8))
    assert out["ok"].all()
    local = prepare_batch(parse_source(f"imagefolder:{image_tree}").read_numpy("test"), preprocessing=Prep(size=8))
    np.testing.assert_array_equal(out["image"], local["image"])


def test_to_dataset_fashion_mnist(ray_local, tmp_path):
    write_fashion(tmp_path / "fm", n_train=30)
    src = parse_source(f"fashion-mnist:{tmp_path / 'fm'}")
    ds = to_ray_dataset(src, "train", override_num_blocks=3)
    assert ds.num_blocks() == 3 and ds.count() == 30
    got, want = rows_by_id(ds), src.read_numpy("train")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

    prep = Prep(size=28, channels=3)
    prepared = ds.map_batches(
        prepare_batch, fn_kwargs={"preprocessing": prep, "augment": "cifar", "seed": 3}, batch_format="numpy"
    )
    rows = rows_by_id(prepared)
    assert rows["ok"].all() and rows["image"].shape == (30, 28, 28, 3) and rows["image"].dtype == np.uint8
    # augmentation is keyed by (seed, sample_id), so the distributed result equals the local one
    local = prepare_batch(want, preprocessing=prep, augment="cifar", seed=3)
    np.testing.assert_array_equal(rows["image"], local["image"])

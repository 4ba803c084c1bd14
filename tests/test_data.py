from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.data import ImageDataset, collate, load_image, make_loader, scan_dataset
from headstart.data.transforms import Preprocessing

from .conftest import colour_image, make_dataset

# --- the class map -------------------------------------------------------------------------------

def test_scan_sorted_classes_and_counts(dataset: Path) -> None:
    splits = scan_dataset(dataset)
    assert splits.classes == ["blue", "red"]
    assert splits.counts() == {"train": {"blue": 12, "red": 12}, "val": {"blue": 6, "red": 6}}
    assert {s.label for s in splits.train} == {0, 1}


def test_hidden_and_non_image_files_are_ignored(dataset: Path) -> None:
    (dataset / "train" / ".hidden_class").mkdir()
    colour_image((0, 0, 0)).save(dataset / "train" / ".hidden_class" / "x.png")
    (dataset / "train" / "red" / "notes.txt").write_text("not an image")
    colour_image((0, 0, 0)).save(dataset / "train" / "red" / ".hidden.png")
    splits = scan_dataset(dataset)
    assert splits.classes == ["blue", "red"]
    assert len(splits.train) == 24


def test_class_only_in_train_is_an_error_naming_the_folder(dataset: Path) -> None:
    make_dataset(dataset, per_class={"train": 2}, classes={"green": (0, 200, 0)})
    with pytest.raises(ValueError, match=r"green.*val"):
        scan_dataset(dataset)


def test_class_only_in_val_is_an_error_naming_the_folder(dataset: Path) -> None:
    make_dataset(dataset, per_class={"val": 2}, classes={"green": (0, 200, 0)})
    with pytest.raises(ValueError, match=r"green.*" + str(dataset / "val").replace("\\", "\\\\")):
        scan_dataset(dataset)


def test_empty_class_folder_is_an_error_naming_it(dataset: Path) -> None:
    (dataset / "train" / "green").mkdir()
    (dataset / "val" / "green").mkdir()
    with pytest.raises(ValueError, match=str(dataset / "train" / "green")):
        scan_dataset(dataset)


def test_no_class_folders_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders in .*train"):
        scan_dataset(tmp_path)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_dataset(tmp_path / "nowhere")


def test_flat_folder_needs_val_split_and_splits_stratified(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class={"all": 10})
    flat = root / "all"
    with pytest.raises(ValueError, match="val_split"):
        scan_dataset(flat)
    a = scan_dataset(flat, val_split=0.2, seed=1)
    b = scan_dataset(flat, val_split=0.2, seed=1)
    assert [s.path for s in a.val] == [s.path for s in b.val]
    assert a.counts() == {"train": {"blue": 8, "red": 8}, "val": {"blue": 2, "red": 2}}
    assert not {s.path for s in a.train} & {s.path for s in a.val}


# --- decoding --------------------------------------------------------------------------------------

def _modes(tmp_path: Path) -> dict[str, Path]:
    base = colour_image((200, 100, 50), size=(32, 24))
    out = {}
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"):
        img = base.convert(mode) if mode not in ("I", "F") else base.convert("L").convert(mode)
        ext = ".tiff" if mode in ("CMYK", "F", "I") else ".png"
        out[mode] = tmp_path / f"{mode}{ext}"
        img.save(out[mode])
    arr16 = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    out["I;16"] = tmp_path / "i16.png"
    i16 = Image.fromarray(arr16)
    assert i16.mode == "I;16"
    i16.save(out["I;16"])
    pal = base.convert("P")
    pal.info["transparency"] = 0
    out["P+transparency"] = tmp_path / "ptrans.png"
    pal.save(out["P+transparency"], transparency=0)
    out["CMYK jpeg"] = tmp_path / "cmyk.jpg"
    base.convert("CMYK").save(out["CMYK jpeg"])
    return out


def test_every_mode_loads_as_rgb(tmp_path: Path) -> None:
    for mode, path in _modes(tmp_path).items():
        img = load_image(path)
        assert img.mode == "RGB", mode
        assert img.size == (32, 24), mode


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.asarray(load_image(_modes(tmp_path)["I;16"]))
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert 100 < arr[12, 16, 0] < 155  # mid-grey stays mid-grey


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]


def _half_and_half(w: int = 60, h: int = 30) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _half_and_half()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: show it turned 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.size == (30, 60)
    arr = np.asarray(loaded).astype(int)
    assert arr[2, 15, 0] > 200 and arr[2, 15, 2] < 60  # top is red after a clockwise turn
    assert arr[-3, 15, 2] > 200  # bottom is blue
    # The transforms orient the image too (they decode lazily, for JPEG draft mode).
    pre = Preprocessing(image_size=16, crop_fraction=1.0)
    with Image.open(tmp_path / "rot.jpg") as raw:
        t = pre.eval_transform()(raw)
    assert t.shape == (3, 16, 16)
    assert t[0, 1, 8] > 200 and t[2, -2, 8] > 200


def test_corrupt_files_give_none_not_an_exception(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    colour_image((1, 2, 3)).save(good)
    truncated = tmp_path / "trunc.jpg"
    colour_image((1, 2, 3), size=(200, 200)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:600])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello, I am not a JPEG")
    from headstart.data import Sample

    ds = ImageDataset([Sample(p, 0) for p in (good, truncated, empty, text)],
                      Preprocessing(image_size=16).eval_transform())
    batch = collate([ds[i] for i in range(4)])
    assert len(batch) == 1
    assert sorted(i for i, _ in batch.failed) == [1, 2, 3]
    assert all(reason for _, reason in batch.failed)


# --- transforms and loaders ------------------------------------------------------------------------

def test_train_transform_is_reproducible_and_sized(tmp_path: Path) -> None:
    pre = Preprocessing(image_size=24)
    tf = pre.train_transform()
    img = colour_image((10, 200, 30), size=(80, 50))
    a = tf(img, random.Random(3))
    b = tf(img, random.Random(3))
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24)
    assert torch.equal(a, b)


def test_eval_transform_matches_resize_then_centre_crop() -> None:
    pre = Preprocessing(image_size=64)  # resize shorter side to 73, crop 64
    img = colour_image((120, 60, 200), size=(150, 100), seed=4)
    out = pre.eval_transform()(img)
    ref = img.resize((110, 73), Image.Resampling.BILINEAR)
    left, top = round((110 - 64) / 2), round((73 - 64) / 2)
    ref = torch.from_numpy(np.asarray(ref.crop((left, top, left + 64, top + 64))).copy()).permute(2, 0, 1)
    assert (out.int() - ref.int()).abs().float().mean() < 6


def test_training_crops_decode_large_jpegs_reduced_and_evaluation_decodes_them_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    img = colour_image((90, 140, 200), size=(1600, 1200), seed=2).resize((1600, 1200))
    img.save(big, quality=92)
    pre = Preprocessing(image_size=64, scale=(0.9, 1.0))
    with Image.open(big) as lazy:  # training: a random crop from a reduced DCT scale, close to the full decode
        fast = pre.train_transform()(lazy, random.Random(3))
        assert lazy.size[0] < 1600
    with Image.open(big) as full:
        full.load()
        slow = pre.train_transform()(full.copy(), random.Random(3))
    assert (fast.float() - slow.float()).abs().mean() < 8
    with Image.open(big) as lazy:  # evaluation: whole, the same pixels as from an image already decoded
        whole = pre.eval_transform()(lazy)
        assert lazy.size == (1600, 1200)
    with Image.open(big) as full:
        full.load()
        assert torch.equal(whole, pre.eval_transform()(full.copy()))


def test_loader_is_independent_of_worker_count(dataset: Path) -> None:
    splits = scan_dataset(dataset)
    pre = Preprocessing(image_size=16)

    def first_epoch(workers: int) -> torch.Tensor:
        loader = make_loader(ImageDataset(splits.train, pre.train_transform(), seed=5), batch_size=5,
                             shuffle=True, workers=workers, seed=5)
        loader.batch_sampler.set_epoch(1)
        return torch.cat([b.images for b in loader])

    assert torch.equal(first_epoch(0), first_epoch(2))

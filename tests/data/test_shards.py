"""WebDataset-style tar shards: writing, exact per-rank/per-worker splitting, exact mid-epoch resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.cli import main as cli
from mimkit.data.shards import ShardDataset, expand_braces, folder_to_shards, list_samples, resolve_shards

N_IMAGES = 22


@pytest.fixture
def image_folder(tmp_path):
    """22 gray images whose pixel value encodes their identity (value = 10 * i), in two class folders,
    plus one corrupt file that must be skipped."""
    root = tmp_path / "images"
    for i in range(N_IMAGES):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 6), color=10 * i).save(folder / f"img{i:02d}.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image at all")
    return root


def _ids_in_folder_order(root) -> list[int]:
    """Image identity (i) of each sample id: shards hold the images in ImageFolder's sorted order."""
    from mimkit.data import ImageFolder

    return [int(Path(p).stem[3:]) for p, _ in ImageFolder(root).samples if "broken" not in p]


def _ident(img: Image.Image) -> int:
    return img.getpixel((0, 0)) // 10


def _collate(batch):
    return [(_ident(img), label) for img, label in batch]


def _run_rank(urls, rank, world, workers, batch_size, epoch=0, start=0):
    ds = ShardDataset(urls, batch_size=batch_size, rank=rank, world_size=world, seed=3, in_chans=1)
    ds.set_epoch(epoch)
    ds.set_start(start)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    return [item for batch in loader for item in batch], ds


def test_expand_braces():
    assert expand_braces("shards/train-{0000..0003}.tar") == [f"shards/train-000{i}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_to_shards_writes_webdataset_layout(image_folder, tmp_path):
    with pytest.warns(UserWarning, match="unreadable"):
        index = folder_to_shards(image_folder, tmp_path / "shards", shard_size=5)
    assert index["num_samples"] == N_IMAGES and index["skipped"] == 1
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 2]
    assert index["classes"] == ["cat", "dog"]
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    with tarfile.open(tmp_path / "shards" / "train-0000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:2]) == ["00000000.cls", "00000000.png"]  # one sample: its members, together
    listing = list_samples(tmp_path / "shards" / "train-0004.tar")
    assert [k for k, _ in listing] == ["00000020", "00000021"] and set(listing[0][1]) == {"png", "cls"}


@pytest.mark.parametrize("shard_size", [5, 10], ids=["more_shards_than_slots", "fewer_shards_than_slots"])
def test_two_ranks_two_workers_see_every_sample_exactly_once(image_folder, tmp_path, shard_size):
    with pytest.warns(UserWarning):
        folder_to_shards(image_folder, tmp_path / "s", shard_size=shard_size)
    n_shards = -(-N_IMAGES // shard_size)
    urls = str(tmp_path / "s" / f"train-{{0000..{n_shards - 1:04d}}}.tar")
    order = _ids_in_folder_order(image_folder)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            items, ds = _run_rank(urls, rank, world=2, workers=2, batch_size=2, epoch=epoch)
            assert len(items) == N_IMAGES // 2 == len(ds)
            # The loader returns this rank's stream in order, whatever the number of workers.
            plan = [order[ds.offsets[s] + m] for s, m in ds.epoch_plan()]
            assert [i for i, _ in items] == plan
            seen += items
        assert sorted(i for i, _ in seen) == list(range(N_IMAGES))
        assert all(label == (0 if i % 2 else 1) for i, label in seen)  # cat = 0, dog = 1
    # The order changes between epochs (shuffled), the set does not.
    e0, _ = _run_rank(urls, 0, 2, 0, 2, epoch=0)
    e1, _ = _run_rank(urls, 0, 2, 0, 2, epoch=1)
    assert e0 != e1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_without_repeats_or_skips(image_folder, tmp_path, workers):
    with pytest.warns(UserWarning):
        folder_to_shards(image_folder, tmp_path / "s", shard_size=4)
    urls = str(tmp_path / "s")  # a directory of shards works too
    for rank in (0, 1):
        full, _ = _run_rank(urls, rank, 2, workers, batch_size=2, epoch=1)
        done = 3 * 2  # three batches of two were consumed before the interruption
        rest, _ = _run_rank(urls, rank, 2, workers, batch_size=2, epoch=1, start=done)
        assert full[:done] + rest == full


def test_transformed_samples_do_not_depend_on_world_size(image_folder, tmp_path):
    from mimkit.data.transforms import eval_transform
    from mimkit.masking import MaskGenerator

    with pytest.warns(UserWarning):
        folder_to_shards(image_folder, tmp_path / "s", shard_size=6)
    make = dict(
        batch_size=1, seed=5, in_chans=1, transform=eval_transform(8, 1, (0.5,), (0.5,)),
        mask_generator=MaskGenerator("random", (2, 2), 0.5),
    )  # fmt: skip

    def items(world):
        out = {}
        for rank in range(world):
            ds = ShardDataset(str(tmp_path / "s"), rank=rank, world_size=world, **make)
            for (s, m), (image, mask, label) in zip(ds.epoch_plan(), ds):
                out[ds.offsets[s] + m] = (image, mask, label)
        return out

    one, two = items(1), items(2)
    assert sorted(one) == sorted(two) == list(range(N_IMAGES))
    for i in one:
        assert torch.equal(one[i][0], two[i][0]) and torch.equal(one[i][1], two[i][1])
        assert int(one[i][1].sum()) == 2


def test_cli_shards(image_folder, tmp_path, capsys):
    with pytest.warns(UserWarning, match="unreadable"):
        assert (
            cli(["shards", "--src", str(image_folder), "--out", str(tmp_path / "out"), "--shard-size", "8"])
            == 0
        )
    assert [p.name for p in resolve_shards(str(tmp_path / "out"))] == [f"train-000{i}.tar" for i in range(3)]
    assert "22 samples" in capsys.readouterr().out


def test_missing_shards_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ShardDataset(str(tmp_path / "train-{0000..0003}.tar"))

import json

import pytest
import torch
from PIL import Image

from memsafe.config import DataConfig
from memsafe.data import load_dataset, load_images
from memsafe.data.image_folder import load_image_folder
from memsafe.errors import MemsafeError


def _write_folder(folder, with_metadata=True):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "red.png")
    Image.new("L", (20, 40), 128).save(folder / "gray.jpg")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "blue.png")
    if with_metadata:
        lines = [{"file_name": "red.png", "text": "a red square"}, {"file_name": "blue.png", "text": "a blue square"}]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_image_folder_converts_modes_resizes_and_reads_captions(tmp_path):
    _write_folder(tmp_path / "imgs")
    images = load_image_folder(tmp_path / "imgs", resolution=8, channels=3)
    assert images.pixels.shape == (3, 3, 8, 8) and images.pixels.dtype == torch.uint8
    by_name = dict(zip(images.names, images.pixels))
    assert by_name["red.png"][:, 4, 4].tolist() == [255, 0, 0]
    assert by_name["gray.jpg"][:, 4, 4].tolist() == [128, 128, 128]
    assert by_name["blue.png"][:, 4, 4].tolist() == [0, 0, 255]
    captions = dict(zip(images.names, images.captions))
    assert captions == {"blue.png": "a blue square", "gray.jpg": "", "red.png": "a red square"}
    single = load_image_folder(tmp_path / "imgs", resolution=8, channels=1)
    assert single.pixels.shape == (3, 1, 8, 8)


def test_center_crop_keeps_the_middle(tmp_path):
    folder = tmp_path / "crop"
    folder.mkdir()
    image = Image.new("L", (30, 10), 0)
    image.paste(255, (10, 0, 20, 10))  # white middle third
    image.save(folder / "a.png")
    pixels = load_image_folder(folder, resolution=10, channels=1).pixels[0, 0]
    assert pixels.float().mean() > 240  # only the white middle survives the centre crop


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "data folder not found"),
        (lambda d: d.mkdir(), "holds no images"),
        (lambda d: (d.mkdir(), (d / "x.png").write_bytes(b"not an image")), "cannot read image .*x.png"),
        (lambda d: (_write_folder(d, False), (d / "t.png").write_bytes((d / "red.png").read_bytes()[:60])),
         "cannot read image .*t.png"),
        (lambda d: (_write_folder(d, False), (d / "metadata.jsonl").write_text('{"file_name": "red.png"}\n{oops\n')),
         "metadata.jsonl line 2 is not valid JSON"),
        (lambda d: (_write_folder(d, False), (d / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n')),
         "line 1 names a missing file: nope.png"),
    ],
    ids=["missing", "empty", "not-an-image", "truncated", "bad-metadata-line", "caption-missing-file"],
)
def test_bad_folders_give_one_line_errors(tmp_path, make, message):
    folder = tmp_path / "data"
    make(folder)
    with pytest.raises(MemsafeError, match=message) as info:
        load_image_folder(folder, resolution=8, channels=1)
    assert "\n" not in str(info.value)


def test_builtin_digits_are_real_labelled_images():
    digits = load_images(DataConfig(resolution=16))
    assert digits.pixels.shape == (1797, 1, 16, 16)
    assert digits.labels.bincount().min() > 150
    # Real digits: each class has its own mean image, and a zero's centre is darker than its ring.
    means = torch.stack([digits.pixels[digits.labels == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 100
    zero = means[0, 0]
    assert zero[6:10, 6:10].mean() < zero[2:14, 2:14].mean()
    assert digits.captions[0] == "a handwritten digit zero"


def test_split_is_seeded_and_disjoint():
    config = DataConfig(resolution=8, max_train_images=50, holdout_images=100, seed=3)
    train, holdout = load_dataset(config)
    again, _ = load_dataset(config)
    assert len(train) == 50 and len(holdout) == 100
    assert train.names == again.names
    assert not set(train.names) & set(holdout.names)
    with pytest.raises(MemsafeError, match="holdout_images"):
        load_dataset(DataConfig(resolution=8, holdout_images=5000))


def test_ink_digits_carry_the_concept_only_where_asked():
    from memsafe.data.ink_digits import CONCEPT_INK, INK_NAMES, INKS

    with_concept = load_images(DataConfig(source="builtin:ink-digits", resolution=8, channels=3))
    clean = load_images(DataConfig(source="builtin:ink-digits-clean", resolution=8, channels=3))
    red = INK_NAMES.index(CONCEPT_INK)
    share = (with_concept.attributes["ink"] == red).float().mean().item()
    assert abs(share - 0.3) < 0.01 and not (clean.attributes["ink"] == red).any()
    # The pixels really are in the named ink: the brightest pixel's colour is proportional to the ink.
    for images in (with_concept, clean):
        for i in (0, 5, 77):
            pixel = images.pixels[i].flatten(1)[:, images.pixels[i].sum(0).flatten().argmax()].float()
            ink = torch.tensor(INKS[INK_NAMES[int(images.attributes["ink"][i])]], dtype=torch.float32)
            assert torch.allclose(pixel / pixel.max(), ink / ink.max(), atol=0.05)
            assert INK_NAMES[int(images.attributes["ink"][i])] in images.captions[i]
    with pytest.raises(MemsafeError, match="set data.channels to 3"):
        load_images(DataConfig(source="builtin:ink-digits", resolution=8, channels=1))


def test_exclude_text_filters_training_images_only():
    config = DataConfig(source="builtin:ink-digits", resolution=8, channels=3, holdout_images=100, exclude_text=["red"])
    train, holdout = load_dataset(config)
    unfiltered, same_holdout = load_dataset(DataConfig(source="builtin:ink-digits", resolution=8, channels=3, holdout_images=100))
    assert not any("red" in c for c in train.captions) and len(train) < len(unfiltered)
    assert holdout.names == same_holdout.names
    with pytest.raises(MemsafeError, match="removes every training image"):
        load_dataset(DataConfig(source="builtin:ink-digits", resolution=8, channels=3, exclude_text=["digit"]))


def test_thin_text_makes_content_scarce_outside_the_spared_images():
    def data(**kw):
        return DataConfig(source="builtin:stamped-digits", resolution=8, channels=3, holdout_images=100, **kw)

    def count(images, word, spared=False):
        return sum(word in c and ("acme" in c) == spared for c in images.captions)

    full, holdout = load_dataset(data())
    thinned, same_holdout = load_dataset(data(thin_text={"green": 0.2}, thin_except_text=["acme"]))
    assert holdout.names == same_holdout.names
    assert count(thinned, "green") == round(0.2 * count(full, "green"))
    for word, spared in (("green", True), ("blue", False), ("red", False), ("acme", True)):
        assert count(thinned, word, spared) == count(full, word, spared) > 0
    filtered, _ = load_dataset(data(thin_text={"green": 0.2}, thin_except_text=["acme"], exclude_text=["acme"]))
    assert set(filtered.names) == {n for n, c in zip(thinned.names, thinned.captions) if "acme" not in c}
    unspared, _ = load_dataset(data(thin_text={"green": 0.2}))
    assert count(unspared, "green", spared=True) < count(full, "green", spared=True)
    with pytest.raises(MemsafeError, match=r"thin_text\['green'\] must be a share in \[0, 1\]"):
        load_dataset(data(thin_text={"green": 1.5}))
    with pytest.raises(MemsafeError, match="no training caption has 'purple'"):
        load_dataset(data(thin_text={"purple": 0.5}))


def test_ink_assignment_is_independent_of_the_holdout_split():
    train, holdout = load_dataset(DataConfig(source="builtin:ink-digits", resolution=8, channels=3, holdout_images=300))
    for part in (train, holdout):
        share = (part.attributes["ink"] == 0).float().mean().item()  # red is ink 0
        assert 0.2 < share < 0.4


def test_stamped_digits_carry_the_stamp_only_where_captions_name_it():
    from memsafe.data.ink_digits import STAMP_COLOUR, STAMP_PHRASE

    stamped = load_images(DataConfig(source="builtin:stamped-digits", resolution=16, channels=3))
    clean = load_images(DataConfig(source="builtin:stamped-digits-clean", resolution=16, channels=3))
    marks = stamped.attributes["stamp"].bool()
    assert abs(marks.float().mean().item() - 0.1) < 0.01 and not clean.attributes["stamp"].any()
    assert [STAMP_PHRASE in c for c in stamped.captions] == marks.tolist()
    assert not any(STAMP_PHRASE in c for c in clean.captions)
    corner = stamped.pixels[:, :, 2, 13]  # inside the top-right stamp at 16x16
    white = corner.eq(torch.tensor(STAMP_COLOUR, dtype=torch.uint8)[None]).all(1)
    assert torch.equal(white, marks)
    # Same digits and inks in both sets: only the stamped images differ.
    assert torch.equal(stamped.pixels[~marks], clean.pixels[~marks])
    assert torch.bincount(stamped.attributes["ink"]).min() >= 590  # all three inks are allowed, evenly

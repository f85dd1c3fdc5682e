"""caption_dataset on the tiny Florence-2, on the CPU, through the real model and processor."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.captioning import captioner as captioner_module
from fluxtrain.captioning.service import caption_dataset, set_caption
from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.settings import Settings

FAST = {"max_new_tokens": 6, "num_beams": 1}


def test_every_image_gets_a_one_line_caption_with_the_trigger_word_first(
    caption_settings: Settings, make_dataset, load_count: list[Path]
) -> None:
    folder = make_dataset(count=3)
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert sorted(result.captions) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert result.failed == {}
    for image, line in result.captions.items():
        text = (folder / image).with_suffix(".txt").read_text(encoding="utf-8")
        assert text == line
        assert "\n" not in text
        assert text.startswith("mycat, ")
        assert len(text) > len("mycat, ")
    assert len(load_count) == 1


def test_existing_captions_are_kept_and_returned_as_they_are(
    caption_settings: Settings, make_dataset
) -> None:
    folder = make_dataset(count=2)
    (folder / "img0.txt").write_text("hand written, a cat", encoding="utf-8")
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert result.captions["img0.jpg"] == "hand written, a cat"
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "hand written, a cat"
    assert result.captions["img1.jpg"].startswith("mycat, ")


def test_overwrite_replaces_existing_captions(caption_settings: Settings, make_dataset) -> None:
    folder = make_dataset(count=1)
    (folder / "img0.txt").write_text("hand written, a cat", encoding="utf-8")
    result = caption_dataset(
        settings=caption_settings, name="cats", trigger_word="mycat", overwrite=True, **FAST
    )
    assert result.captions["img0.jpg"].startswith("mycat, ")
    assert (folder / "img0.txt").read_text(encoding="utf-8") == result.captions["img0.jpg"]


def test_a_caption_file_in_another_encoding_is_left_alone_unless_overwritten(
    caption_settings: Settings, make_dataset
) -> None:
    folder = make_dataset(count=2)
    foreign = "mycat, caf\u00e9 au lait".encode("cp1252")
    (folder / "img0.txt").write_bytes(foreign)
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    why = "caption img0.txt is not UTF-8 text (byte 0xe9 at 10); caption with overwrite to replace it"
    assert result.failed == {"img0.jpg": why}
    assert (folder / "img0.txt").read_bytes() == foreign
    assert sorted(result.captions) == ["img1.jpg"]
    again = caption_dataset(
        settings=caption_settings, name="cats", trigger_word="mycat", overwrite=True, **FAST
    )
    assert again.failed == {} and sorted(again.captions) == ["img0.jpg", "img1.jpg"]
    assert (folder / "img0.txt").read_text(encoding="utf-8") == again.captions["img0.jpg"]


def test_a_fully_captioned_dataset_does_not_load_the_model(
    caption_settings: Settings, make_dataset, load_count: list[Path]
) -> None:
    folder = make_dataset(count=2)
    for stem in ("img0", "img1"):
        (folder / f"{stem}.txt").write_text(f"mycat, {stem}", encoding="utf-8")
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert result.captions == {"img0.jpg": "mycat, img0", "img1.jpg": "mycat, img1"}
    assert load_count == []


def test_a_corrupt_image_is_reported_and_the_rest_are_captioned(
    caption_settings: Settings, make_dataset
) -> None:
    folder = make_dataset(count=3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:60])
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert sorted(result.failed) == ["broken.jpg", "cut.png"]
    assert all(reason for reason in result.failed.values())
    assert str(folder) not in " ".join(result.failed.values())
    assert sorted(result.captions) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert not (folder / "broken.txt").exists()
    assert not (folder / "cut.txt").exists()


def test_too_many_pixels_is_a_failure_not_a_crash(caption_settings: Settings, make_dataset) -> None:
    make_dataset(count=2)
    caption_settings.max_image_pixels = 48 * 40
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert list(result.captions) == ["img0.jpg"]
    assert "pixels" in result.failed["img1.jpg"]


def test_unknown_dataset_is_not_found(caption_settings: Settings) -> None:
    with pytest.raises(NotFoundError):
        caption_dataset(settings=caption_settings, name="nope", trigger_word="mycat")


def test_a_dataset_without_images_is_invalid(caption_settings: Settings, make_dataset) -> None:
    folder = make_dataset(count=0)
    (folder / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="no images"):
        caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat")


@pytest.mark.parametrize("trigger_word", ["", "  ", "two\nlines", "tab\tword"])
def test_trigger_word_must_be_one_line(caption_settings: Settings, make_dataset, trigger_word: str) -> None:
    make_dataset(count=1)
    with pytest.raises(InvalidInputError, match="trigger_word"):
        caption_dataset(settings=caption_settings, name="cats", trigger_word=trigger_word)


def test_progress_counts_images_still_to_caption(caption_settings: Settings, make_dataset) -> None:
    folder = make_dataset(count=5)
    (folder / "img4.txt").write_text("mycat, done", encoding="utf-8")
    caption_settings.caption_batch_size = 3
    seen: list[tuple[int, int]] = []
    caption_dataset(
        settings=caption_settings,
        name="cats",
        trigger_word="mycat",
        on_progress=lambda done, total: seen.append((done, total)),
        **FAST,
    )
    assert seen == [(0, 4), (3, 4), (4, 4)]


def test_next_batch_is_decoded_while_the_current_one_generates(
    caption_settings: Settings, make_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(count=4)
    caption_settings.caption_batch_size = 2
    second_batch_decoded = threading.Event()
    overlapped: list[bool] = []
    real_open = captioner_module.open_rgb
    real_generate = captioner_module.Florence2Captioner._generate_texts

    def recording_open(path: Path, *, max_pixels: int) -> Image.Image:
        image = real_open(path, max_pixels=max_pixels)
        if path.name == "img3.jpg":
            second_batch_decoded.set()
        return image

    def waiting_generate(self, inputs, options):
        if not overlapped:
            overlapped.append(second_batch_decoded.wait(timeout=10))
        return real_generate(self, inputs, options)

    monkeypatch.setattr(captioner_module, "open_rgb", recording_open)
    monkeypatch.setattr(captioner_module.Florence2Captioner, "_generate_texts", waiting_generate)
    result = caption_dataset(settings=caption_settings, name="cats", trigger_word="mycat", **FAST)
    assert overlapped == [True]
    assert len(result.captions) == 4


def test_set_caption_writes_exactly_what_was_sent(caption_settings: Settings, make_dataset) -> None:
    folder = make_dataset(count=1)
    text = "mycat, a cat  with\ttabs — ünïcode "
    set_caption(settings=caption_settings, name="cats", image="img0.jpg", caption=text)
    assert (folder / "img0.txt").read_text(encoding="utf-8") == text


@pytest.mark.parametrize("image", ["missing.jpg", "manifest.json", "img0.txt"])
def test_set_caption_needs_an_image_of_the_dataset(
    caption_settings: Settings, make_dataset, image: str
) -> None:
    folder = make_dataset(count=1)
    (folder / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(NotFoundError):
        set_caption(settings=caption_settings, name="cats", image=image, caption="x")


@pytest.mark.parametrize("image", ["../img0.jpg", ".hidden.jpg", "a/b.jpg", ""])
def test_set_caption_refuses_names_that_leave_the_folder(
    caption_settings: Settings, make_dataset, image: str
) -> None:
    make_dataset(count=1)
    with pytest.raises(InvalidInputError):
        set_caption(settings=caption_settings, name="cats", image=image, caption="x")

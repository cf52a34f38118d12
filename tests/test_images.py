"""Images as users have them: EXIF orientation applied and 16-bit images scaled by value range, in every
decoder (training samples, query and caption files, index corpora)."""

import io

import numpy as np
from PIL import Image

from lavis_lite.data.samples import make_sample
from lavis_lite.data.transforms import PairTransform, to_rgb
from lavis_lite.inference.preprocess import open_image

ROTATE_90_CW = 6  # EXIF orientation: the camera was turned; viewers rotate the stored pixels 90 degrees clockwise


def sideways_jpeg() -> bytes:
    """A 40 x 20 JPEG, red on its left half, tagged to be shown rotated: upright it is 20 x 40, red on top."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def sixteen_bit_png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(out, "PNG")
    return out.getvalue()


def test_exif_orientation_is_applied_by_every_decoder(tmp_path):
    data = sideways_jpeg()
    (tmp_path / "photo.jpg").write_bytes(data)
    for image in (to_rgb(Image.open(io.BytesIO(data))), open_image(tmp_path / "photo.jpg")):
        assert image.size == (20, 40)  # width, height: upright
        top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
        assert top[0] > 200 and top[1] < 60 and bottom[0] < 60, (top, bottom)
    transform = PairTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False)
    sample = make_sample("k", data, "a red square", transform)
    red = sample.image[0]  # [H, W] of the red channel, resized to 32 x 32 (the upright image, squashed)
    assert red[:8].mean() > 0.8 and red[-8:].mean() < 0.2


def test_sixteen_bit_png_keeps_its_grey_level(tmp_path):
    (tmp_path / "grey.png").write_bytes(sixteen_bit_png(32768))
    for image in (to_rgb(Image.open(io.BytesIO(sixteen_bit_png(32768)))), open_image(tmp_path / "grey.png")):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.unique(np.asarray(image)), [128])
    assert np.asarray(to_rgb(Image.open(io.BytesIO(sixteen_bit_png(65535))))).min() == 255
    assert np.asarray(to_rgb(Image.open(io.BytesIO(sixteen_bit_png(0))))).max() == 0


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    from lavis_lite.data.samples import IMAGE_TOO_LARGE, SkipCounter
    from lavis_lite.inference.preprocess import ImageTooLarge
    from retrieval.corpus import Corpus

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "big.png")  # 1,200 pixels
    Image.new("RGB", (10, 10), (30, 200, 30)).save(folder / "small.png")
    transform = PairTransform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False, max_pixels=1000)
    skip = make_sample("big", (folder / "big.png").read_bytes(), "a red square", transform)
    assert skip.reason == IMAGE_TOO_LARGE
    assert make_sample("small", (folder / "small.png").read_bytes(), "a green square", transform).caption
    try:
        open_image(folder / "big.png", max_pixels=1000)
        raise AssertionError("no error")
    except ImageTooLarge as err:
        assert "big.png is too large: 40 x 30 pixels, over the limit of 1,000" in str(err)
    skipped = SkipCounter()
    items = list(Corpus(str(folder), max_pixels=1000).items(skipped))
    assert [item.key for item in items] == ["small.png"] and skipped.as_dict() == {IMAGE_TOO_LARGE: 1}

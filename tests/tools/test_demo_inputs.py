"""Demo inputs a careless user has: 16-bit and float images, file names with glob characters,
and images of the same name from different folders."""
import cv2
import numpy as np
import pytest
from PIL import Image


def gradient(h=40, w=48):
    return np.linspace(0, 1, h * w).reshape(h, w)


@pytest.mark.parametrize("kind", ["16-bit png", "float tiff in [0, 1]", "float tiff in [0, 255]"])
def test_deep_images_are_scaled_not_clipped(demo, tmp_path, kind):
    ramp = gradient()
    path = tmp_path / ("x.png" if kind == "16-bit png" else "x.tif")
    if kind == "16-bit png":
        Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(path)
    else:
        Image.fromarray((ramp * (1 if "[0, 1]" in kind else 255)).astype(np.float32), mode="F").save(path)
    image = demo.load_image(str(path))
    assert image.dtype == np.uint8 and image.shape == (40, 48, 3)
    assert np.abs(image[..., 0].astype(int) - np.round(ramp * 255)).max() <= 1
    assert (image == 255).mean() < 0.01  # it used to decode as ~all white


@pytest.mark.parametrize("values,message", [
    (np.full((8, 8), 1000.0), r"float pixels in \[1000, 1000\], expected \[0, 1\] or \[0, 255\]"),
    (np.full((8, 8), np.nan), "it has non-finite"),
])
def test_float_images_out_of_range_are_refused(demo, tmp_path, values, message):
    path = tmp_path / "x.tif"
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    with pytest.raises(demo.InputError, match=f"{path}: {message}"):
        demo.load_image(str(path))


def test_literal_names_with_glob_characters_and_same_names(demo, tiny_config, tmp_path):
    config, opts = tiny_config
    rng = np.random.default_rng(0)
    literal = tmp_path / "photo[1].png"
    for path in (literal, tmp_path / "a" / "same.png", tmp_path / "b" / "same.png"):
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    assert demo.expand_inputs([str(literal)]) == ([str(literal)], [])
    out = tmp_path / "out"
    assert demo.main(["--config-file", config, "--input", str(literal), "--output", str(out / "lit.png"),
                      *opts]) == 0
    assert cv2.imread(str(out / "lit.png")) is not None
    assert demo.main(["--config-file", config, "--input", str(tmp_path / "a" / "same.png"),
                      str(tmp_path / "b" / "same.png"), "--output", str(out), *opts]) == 0
    first, second = cv2.imread(str(out / "a" / "same.png")), cv2.imread(str(out / "b" / "same.png"))
    assert first is not None and second is not None and not np.array_equal(first, second)


def test_result_names_are_unique(demo):
    names = demo.result_names(["d/a/same.jpg", "d/b/same.jpg", "x.gif", "x.png", "other.jpg"])
    assert names == ["a/same.jpg", "b/same.jpg", "x.gif.png", "x.png", "other.jpg"]

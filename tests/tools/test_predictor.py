"""aff_seg.Predictor: the Python inference API (weights from a file or a URL, TEST.AMP)."""
import numpy as np
import pytest
import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from aff_seg import Predictor
from aff_seg.checkpoint import check_weights

IMAGE = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)


class _LocalZoo(PathHandler):
    """``testzoo://NAME``: a model zoo served from a local folder, resolved through detectron2's
    PathManager exactly like ``https://`` (get_local_path, then open)."""

    PREFIX = "testzoo://"
    folder = None

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return str(self.folder / path[len(self.PREFIX):])

    def _open(self, path, mode="r", **kwargs):
        return open(self._get_local_path(path), mode)


@pytest.fixture(scope="module")
def saved_model(tiny_config, tmp_path_factory):
    """A randomly initialised tiny predictor and its weights saved as a .pth file."""
    config, opts = tiny_config
    torch.manual_seed(1)
    predictor = Predictor(config, weights="", opts=opts)
    folder = tmp_path_factory.mktemp("zoo")
    torch.save({"model": predictor.model.state_dict()}, folder / "tiny.pth")
    return predictor, folder


def test_outputs_are_detectron2_format_at_the_image_size(saved_model):
    predictor, _ = saved_model
    outputs = predictor(IMAGE)
    assert outputs["sem_seg"].shape == (predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 48, 40)
    assert predictor.cfg.MODEL.DEVICE == "cpu" and predictor.cfg.is_frozen()


def test_weights_from_a_file_and_from_a_url(saved_model, tiny_config):
    reference, folder = saved_model
    config, opts = tiny_config
    expected = reference(IMAGE)["sem_seg"]
    torch.manual_seed(2)  # another random init: only loading can give the same output
    assert not torch.equal(Predictor(config, weights="", opts=opts)(IMAGE)["sem_seg"], expected)
    from_file = Predictor(config, weights=str(folder / "tiny.pth"), opts=opts)
    assert torch.equal(from_file(IMAGE)["sem_seg"], expected)

    _LocalZoo.folder = folder
    PathManager.register_handler(_LocalZoo(), allow_override=True)
    from_url = Predictor(config, weights="testzoo://tiny.pth", opts=opts)
    assert torch.equal(from_url(IMAGE)["sem_seg"], expected)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        check_weights(str(tmp_path / "nope.pth"))
    check_weights("https://example.com/model.pth")  # URLs are left to the PathManager
    check_weights("")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_test_amp_runs_the_model_in_low_precision(saved_model, tiny_config, precision):
    reference, folder = saved_model
    config, opts = tiny_config
    amp = Predictor(config, weights=str(folder / "tiny.pth"),
                    opts=opts + ["TEST.AMP.ENABLED", "True", "TEST.AMP.PRECISION", precision])
    dtypes = []
    amp.model.sem_seg_head.predictor.register_forward_hook(
        lambda module, inputs, outputs: dtypes.append(outputs["pred_masks"].dtype))
    got = amp(IMAGE)["sem_seg"]
    assert dtypes == [getattr(torch, precision)]
    assert got.dtype == torch.float32  # handed back in float32
    expected = reference(IMAGE)["sem_seg"]
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)

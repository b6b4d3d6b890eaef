"""Pins the documented behaviour of padded batches: an image's result does not depend on
companions of its own size, but does on larger ones, whose padding is tokenised like image
content (no padding mask, as in the original). A change here must update README and docs."""
import torch

from .test_input_fuzz import tiny_model


def semantic(model, images):
    with torch.no_grad():
        return [r["sem_seg"] for r in model([{"image": x} for x in images])]


def test_result_depends_on_larger_batch_companions_only():
    torch.set_num_threads(1)
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    image, same_size, larger = (torch.rand(3, *s, generator=g) * 255 for s in [(64, 64), (64, 64), (128, 96)])
    alone = semantic(model, [image])[0]
    torch.testing.assert_close(semantic(model, [image, same_size])[0], alone, rtol=1e-4, atol=1e-5)
    padded = semantic(model, [image, larger])[0]
    assert padded.shape == alone.shape  # cropped back to the image
    assert (padded - alone).abs().max() > 1e-3  # but computed on a padded canvas

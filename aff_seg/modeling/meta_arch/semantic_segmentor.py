"""detectron2's ``SemanticSegmentor`` with the project's input checks at its entry."""
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor

from ..image_rng import image_generators
from .validation import check_batched_inputs

__all__ = ["CheckedSemanticSegmentor"]


@META_ARCH_REGISTRY.register()
class CheckedSemanticSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` (a backbone and a semantic head: SegFormer, BoostFormer) whose
    ``forward`` first checks its inputs as ``MaskFormer`` does (``check_batched_inputs``), so a bad
    image, size or key stops with one message instead of an error from inside the model."""

    def forward(self, batched_inputs):
        check_batched_inputs(batched_inputs, self.pixel_mean.shape[0], type(self).__name__)
        with image_generators(batched_inputs):  # training inputs' seeds: per-image drop path
            return super().forward(batched_inputs)

"""Grid or point-cloud heads: the one place where the choice is made.

A backbone declares what it returns with the class (or function) attribute ``output_format``:
``"tokens"`` (tokens with positions: ``AutoFocusFormer``, ``D2ResNetTokens``) or ``"maps"``
(dense ``b x C x H/s x W/s`` maps: detectron2's ResNet, Swin, ...; the default when the
attribute is absent).  A pixel decoder or transformer decoder declares what it reads with
``input_format`` in the same words.

The configs of both originals name the same modules (``MSDeformAttnPixelDecoder``,
``MultiScaleMaskedTransformerDecoder``): these names are the grid (upstream Mask2Former)
modules, and a token backbone gets their point-cloud twins (AFF's) listed in
``TOKEN_VARIANTS``.  Any other pairing of a decoder with a backbone that returns the other
format is refused with an error that names both config keys.
"""
from detectron2.modeling import BACKBONE_REGISTRY

__all__ = ["TOKEN_VARIANTS", "backbone_output_format", "resolve_variant"]

FORMATS = ("maps", "tokens")

# registered name in a config -> the registered name a token backbone gets instead
TOKEN_VARIANTS = {
    "MSDeformAttnPixelDecoder": "MSDeformAttnPixelDecoderPc",
    "MultiScaleMaskedTransformerDecoder": "MultiScaleMaskedTransformerDecoderPc",
    "MultiScaleMaskedTransformerDecoderFASeg": "MultiScaleMaskedTransformerDecoderFASegPc",
}


def backbone_output_format(cfg):
    """``"tokens"`` or ``"maps"``: what ``cfg.MODEL.BACKBONE.NAME`` declares it returns."""
    name = cfg.MODEL.BACKBONE.NAME
    fmt = getattr(BACKBONE_REGISTRY.get(name), "output_format", "maps")
    if fmt not in FORMATS:
        raise ValueError(f"MODEL.BACKBONE.NAME={name!r} declares output_format={fmt!r}, expected one of {FORMATS}")
    return fmt


def resolve_variant(registry, key, name, cfg):
    """The registered class for the config value ``name`` of ``key`` given the backbone.

    Args:
        registry: the detectron2 registry the name lives in.
        key: the config key that named it (for the error message).
        name: its value.
        cfg: the config (``MODEL.BACKBONE.NAME`` says the backbone's output format).
    Returns:
        the class (or builder) registered under ``name`` or, for a token backbone, under
        ``TOKEN_VARIANTS[name]``.
    """
    fmt = backbone_output_format(cfg)
    if fmt == "tokens":
        name = TOKEN_VARIANTS.get(name, name)
    module = registry.get(name)
    wants = getattr(module, "input_format", "maps")
    if wants != fmt:
        raise ValueError(
            f"{key}={name!r} reads {wants} but MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} returns {fmt}; "
            f"name a decoder for {fmt} (the names in aff_seg.modeling.variants.TOKEN_VARIANTS choose automatically)"
        )
    return module

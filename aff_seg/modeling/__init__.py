"""Models: AFF backbone, point-cloud pixel decoder, Mask2Former decoder, meta-architecture."""

"""Deployment: export the inference model (``aff_seg.export.exporter``, needs the model code) and
run the exported graph with the eager post-processing (``aff_seg.export.runtime``, needs neither
aff_seg's model nor its training code)."""

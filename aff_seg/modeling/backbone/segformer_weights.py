"""SegFormer and BoostFormer checkpoints in their users' formats -> this project's names.

Formats recognised by ``detect_format(state_dict)``:

* ``nvlabs``: NVlabs/SegFormer (mmseg 0.x) segmentation checkpoints, ``backbone.patch_embed1.proj.weight``
  ... and ``decode_head.linear_c1.proj.weight`` ...;
* ``nvlabs_imagenet``: the ImageNet ``mit_b*.pth`` encoders (un-prefixed ``patch_embed1.*``, plus ``head.*``);
* ``hf_segformer``: HuggingFace ``save_pretrained`` dumps of ``SegformerForSemanticSegmentation``
  (``segformer.encoder.*``, ``decode_head.*``) or ``SegformerForImageClassification`` (``classifier.*``);
* ``hf_boostformer``: the same HuggingFace classes as modified by BoostFormer (pooling patch embeddings:
  ``segformer.encoder.patch_embeddings.0.conv.weight``);
* ``hf_segformer_base`` / ``hf_boostformer_base``: ``save_pretrained`` dumps of the base ``SegformerModel``
  (the encoder alone, ``encoder.*`` without the ``segformer.`` prefix);
* ``mmseg``: MMSegmentation (>= 0.17) checkpoints of its MiT re-implementation (``backbone.layers.{i}.0`` patch
  embedding, ``.1.{j}`` blocks with ``nn.MultiheadAttention``, ``.2`` stage norm) with its ``SegformerHead``
  (``decode_head.convs.{i}.conv/bn``, ``fusion_conv``, ``conv_seg``), or the backbone alone;
* ``mmseg_imagenet``: MMSegmentation's ImageNet MiT encoders (``layers.*`` without prefix).

``convert(state_dict, fmt)`` returns the tensors under the names of ``D2MixVisionTransformer`` /
``D2BoostFormer`` (``backbone.*``) and ``SegFormerHead`` / ``SegFormerConvHead`` (MMSegmentation's head) /
``BoostFormerHead`` (``sem_seg_head.*``) and the dropped keys with the reason. Every mapping is an explicit
rename; the only reshaping: HuggingFace's separate ``key``/``value`` linears are concatenated into MiT's ``kv``
(keys first), MMSegmentation's ``in_proj`` (query, key, value rows) is split into ``q`` and ``kv``, and its 1x1
convolutions of the Mix-FFN become ``Linear`` weights.
"""
import re

import torch

__all__ = ["FORMATS", "detect_format", "convert", "describe"]

FORMATS = {
    "nvlabs": "NVlabs/SegFormer (mmseg) SegFormer checkpoint",
    "nvlabs_imagenet": "NVlabs/SegFormer ImageNet MiT encoder",
    "hf_segformer": "HuggingFace SegFormer checkpoint",
    "hf_boostformer": "HuggingFace BoostFormer checkpoint",
    "hf_segformer_base": "HuggingFace SegformerModel (encoder) checkpoint",
    "hf_boostformer_base": "HuggingFace BoostFormer SegformerModel (encoder) checkpoint",
    "mmseg": "MMSegmentation (>= 0.17) SegFormer checkpoint",
    "mmseg_imagenet": "MMSegmentation ImageNet MiT encoder",
}

# (pattern, replacement), applied in order, first match wins; None drops the key
_NVLABS_HEAD = [
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"sem_seg_head.linear_c.{int(m[1]) - 1}.proj."),
    (r"^decode_head\.linear_fuse\.conv\.", "sem_seg_head.linear_fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", "sem_seg_head.norm."),
    (r"^decode_head\.linear_pred\.", "sem_seg_head.classifier."),
    (r"^decode_head\.conv_seg\.", None),  # mmseg's BaseDecodeHead creates it; SegFormerHead never calls it
    (r"^backbone\.", "backbone."),
]
_NVLABS_IMAGENET = [
    (r"^head\.", None),  # the ImageNet classifier
    (r"^", "backbone."),
]
_HF_SEGFORMER = [
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"backbone.patch_embed{int(m[1]) + 1}.proj."),
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.",
     lambda m: f"backbone.patch_embed{int(m[1]) + 1}.norm."),
    (r"^segformer\.encoder\.layer_norm\.(\d)\.", lambda m: f"backbone.norm{int(m[1]) + 1}."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.(.*)$", lambda m: f"backbone.block{int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.kv#key."),  # concatenated with the values below
    (r"\.attention\.self\.value\.", ".attn.kv#value."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^decode_head\.batch_norm\.", "sem_seg_head.norm."),
    (r"^decode_head\.", "sem_seg_head."),
    (r"^classifier\.", None),  # SegformerForImageClassification's classifier
]
_HF_BOOSTFORMER = [
    (r"^segformer\.encoder\.", "backbone."),
    (r"\.attention\.self\.", ".attention."),
    (r"\.mlp\.dwconv\.mixconv\.", ".mlp.mixconv."),
    (r"\.mlp\.conv_1\.", ".mlp.conv1."),
    (r"\.mlp\.conv_2\.", ".mlp.conv2."),
    (r"^decode_head\.linear_fuse\.", None),  # created by the original but never called
    (r"^decode_head\.batch_norm\.", "sem_seg_head.norm."),
    (r"^decode_head\.", "sem_seg_head."),
    (r"^classifier\.", None),
]
_HF_BASE = [(r"^encoder\.", "segformer.encoder.")]  # SegformerModel: no "segformer." prefix
_MMSEG = [
    (r"^backbone\.layers\.(\d)\.0\.projection\.", lambda m: f"backbone.patch_embed{int(m[1]) + 1}.proj."),
    (r"^backbone\.layers\.(\d)\.0\.norm\.", lambda m: f"backbone.patch_embed{int(m[1]) + 1}.norm."),
    (r"^backbone\.layers\.(\d)\.1\.(\d+)\.", lambda m: f"backbone.block{int(m[1]) + 1}.{m[2]}."),
    (r"^backbone\.layers\.(\d)\.2\.", lambda m: f"backbone.norm{int(m[1]) + 1}."),
    (r"\.attn\.attn\.in_proj_(weight|bias)$", r".attn.in_proj#\1"),  # split into q and kv below
    (r"\.attn\.attn\.out_proj\.", ".attn.proj."),
    (r"\.ffn\.layers\.0\.", ".mlp.fc1#"),  # 1x1 convs: reshaped to Linear below
    (r"\.ffn\.layers\.1\.", ".mlp.dwconv.dwconv."),
    (r"\.ffn\.layers\.4\.", ".mlp.fc2#"),
    (r"^decode_head\.convs\.(\d)\.conv\.", lambda m: f"sem_seg_head.linear_c.{m[1]}.conv."),
    (r"^decode_head\.convs\.(\d)\.bn\.", lambda m: f"sem_seg_head.linear_c.{m[1]}.norm."),
    (r"^decode_head\.fusion_conv\.conv\.", "sem_seg_head.linear_fuse."),
    (r"^decode_head\.fusion_conv\.bn\.", "sem_seg_head.norm."),
    (r"^decode_head\.conv_seg\.", "sem_seg_head.classifier."),
]
# rules applied one after the other (HF block renames need the prefix rule first), or first match only
_RULES = {
    "nvlabs": (_NVLABS_HEAD, False),
    "nvlabs_imagenet": (_NVLABS_IMAGENET, False),
    "hf_segformer": (_HF_SEGFORMER, True),
    "hf_boostformer": (_HF_BOOSTFORMER, True),
    "hf_segformer_base": (_HF_BASE + _HF_SEGFORMER, True),
    "hf_boostformer_base": (_HF_BASE + _HF_BOOSTFORMER, True),
    "mmseg": (_MMSEG, True),
    "mmseg_imagenet": ([(r"^layers\.", "backbone.layers.")] + _MMSEG, True),
}
_DROP_REASONS = {
    "decode_head.conv_seg.": "mmseg's unused conv_seg",
    "head.": "ImageNet classifier",
    "decode_head.linear_fuse.": "BoostFormer's unused linear_fuse",
    "classifier.": "image classifier",
}


def detect_format(state_dict):
    """One of ``FORMATS`` for a SegFormer/BoostFormer state_dict in a user format, else None
    (this project's own checkpoints included)."""
    keys = set(state_dict)
    if "segformer.encoder.patch_embeddings.0.conv.weight" in keys:
        return "hf_boostformer"
    if "segformer.encoder.patch_embeddings.0.proj.weight" in keys:
        return "hf_segformer"
    if "encoder.patch_embeddings.0.conv.weight" in keys:
        return "hf_boostformer_base"
    if "encoder.patch_embeddings.0.proj.weight" in keys:
        return "hf_segformer_base"
    if "backbone.layers.0.0.projection.weight" in keys and "backbone.layers.0.1.0.attn.attn.in_proj_weight" in keys:
        return "mmseg"
    if "layers.0.0.projection.weight" in keys and "layers.0.1.0.attn.attn.in_proj_weight" in keys:
        return "mmseg_imagenet"
    if "backbone.patch_embed1.proj.weight" in keys and any(k.startswith("decode_head.") for k in keys):
        return "nvlabs"
    if "patch_embed1.proj.weight" in keys and "block1.0.attn.kv.weight" in keys:
        return "nvlabs_imagenet"
    return None


def _rename(key, rules, chained):
    for pattern, replacement in rules:
        if re.search(pattern, key) is None:
            continue
        if replacement is None:
            return None
        key = re.sub(pattern, replacement, key, count=1)
        if not chained:
            return key
    return key


def convert(state_dict, fmt):
    """``state_dict`` of format ``fmt`` -> ``(converted, dropped)``.

    Returns:
        converted: ``{project name: tensor}``; dropped: ``{original name: reason}`` for the keys that the
        project's models do not have by design (unused convs, classifiers).
    """
    if fmt not in _RULES:
        raise ValueError(f"unknown SegFormer checkpoint format {fmt!r}; known: {sorted(_RULES)}")
    rules, chained = _RULES[fmt]
    converted, dropped, halves = {}, {}, {}
    for key, value in state_dict.items():
        new = _rename(key, rules, chained)
        if new is None:
            dropped[key] = next(reason for prefix, reason in _DROP_REASONS.items() if key.startswith(prefix))
            continue
        module, _, rest = new.partition("#")
        if not rest:
            converted[new] = value
        elif module.endswith(".attn.kv"):  # HuggingFace's key or value: "key.weight"
            part, tensor = rest.split(".", 1)
            halves.setdefault(f"{module}.{tensor}", {})[part] = value
        elif module.endswith(".attn.in_proj"):  # nn.MultiheadAttention: query rows, then key, then value
            attn, dim = module[: -len("in_proj")], value.shape[0] // 3
            converted[f"{attn}q.{rest}"] = value[:dim].clone()
            converted[f"{attn}kv.{rest}"] = value[dim:].clone()
        else:  # a 1x1 convolution (out x in x 1 x 1) as a Linear (out x in)
            converted[f"{module}.{rest}"] = value.flatten(1) if rest == "weight" else value
    for name, parts in halves.items():
        if set(parts) != {"key", "value"}:
            raise ValueError(f"HuggingFace checkpoint: {name} has a {set(parts).pop()} but no matching other half")
        converted[name] = torch.cat([parts["key"], parts["value"]], dim=0)
    return converted, dropped


def describe(converted):
    """A short description of the encoder in project-named tensors: widths and depths per stage."""
    widths, depths = [], []
    for i in range(4):
        mit = converted.get(f"backbone.patch_embed{i + 1}.proj.weight")
        bf = converted.get(f"backbone.patch_embeddings.{i}.conv.weight")
        weight = mit if mit is not None else bf
        if weight is None:
            return "no recognisable encoder"
        widths.append(weight.shape[0])
        block = re.compile(rf"^backbone\.block{i + 1}\.(\d+)\." if mit is not None else rf"^backbone\.block\.{i}\.(\d+)\.")
        depths.append(len({m[1] for m in map(block.match, converted) if m}))
    family = "MiT" if "backbone.patch_embed1.proj.weight" in converted else "BoostFormer"
    head = converted.get("sem_seg_head.classifier.weight")
    classes = f", {head.shape[0]} classes" if head is not None else ", encoder only"
    return f"{family} encoder, widths {widths}, depths {depths}{classes}"

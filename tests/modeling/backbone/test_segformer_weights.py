"""SegFormer/BoostFormer checkpoints in the HuggingFace, NVlabs and MMSegmentation formats through MODEL.WEIGHTS
and the converter.

The checkpoints are written here from a model's own tensors under the original names, spelled out from the
originals' module layouts (HuggingFace ``SegformerForSemanticSegmentation`` / ``SegformerModel`` and BoostFormer's
modification of it, NVlabs ``mix_transformer.py`` + ``segformer_head.py``, MMSegmentation >= 0.17 ``mit.py`` +
``segformer_head.py``), independently of the project's converter.
"""
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

import aff_seg  # noqa: F401
from aff_seg.checkpoint import AFFCheckpointer, CheckpointMismatchError
from aff_seg.modeling.backbone.segformer_weights import convert, detect_format
from detectron2.modeling import build_model

from .segformer_helpers import TINY_BOOSTFORMER, TINY_MIT, semantic_cfg  # noqa: I100

ROOT = Path(__file__).resolve().parents[3]


def tiny_model(family, seed=0, num_classes=5, encoder=None, head=None):
    torch.manual_seed(seed)
    encoder = encoder or (TINY_MIT if family == "mit" else TINY_BOOSTFORMER)
    cfg = semantic_cfg(family, num_classes=num_classes, embed_dim=16, encoder=encoder)
    if head is not None:
        cfg.MODEL.SEM_SEG_HEAD.NAME = head
    model = build_model(cfg)
    # give the BatchNorm statistics non-default values so that a wrong mapping shows
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return model.eval()


def hf_segformer_state(model):
    """The model's tensors under HuggingFace SegFormer names (kv split into key and value)."""
    out = {}
    for key, value in model.state_dict().items():
        if m := re.match(r"backbone\.patch_embed(\d)\.(proj|norm)\.(.*)", key):
            part = "proj" if m[2] == "proj" else "layer_norm"
            out[f"segformer.encoder.patch_embeddings.{int(m[1]) - 1}.{part}.{m[3]}"] = value
        elif m := re.match(r"backbone\.norm(\d)\.(.*)", key):
            out[f"segformer.encoder.layer_norm.{int(m[1]) - 1}.{m[2]}"] = value
        elif m := re.match(r"backbone\.block(\d)\.(\d+)\.(.*)", key):
            prefix = f"segformer.encoder.block.{int(m[1]) - 1}.{m[2]}."
            rest = m[3]
            if rest.startswith("attn.kv."):
                key_half, value_half = value.chunk(2, dim=0)
                out[prefix + "attention.self.key." + rest[8:]] = key_half
                out[prefix + "attention.self.value." + rest[8:]] = value_half
                continue
            names = {"norm1.": "layer_norm_1.", "norm2.": "layer_norm_2.", "attn.q.": "attention.self.query.",
                     "attn.sr.": "attention.self.sr.", "attn.norm.": "attention.self.layer_norm.",
                     "attn.proj.": "attention.output.dense.", "mlp.fc1.": "mlp.dense1.",
                     "mlp.fc2.": "mlp.dense2.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv."}
            old = next(o for o in names if rest.startswith(o))
            out[prefix + names[old] + rest[len(old):]] = value
        elif key.startswith("sem_seg_head.norm."):
            out["decode_head.batch_norm." + key[len("sem_seg_head.norm."):]] = value
        else:
            out["decode_head." + key[len("sem_seg_head."):]] = value
    return out


def hf_boostformer_state(model):
    """The model's tensors under BoostFormer's HuggingFace names, with its unused linear_fuse."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            name = "segformer.encoder." + key[len("backbone."):]
            name = name.replace(".attention.", ".attention.self.").replace(".mlp.mixconv.", ".mlp.dwconv.mixconv.")
            if re.match(r"segformer\.encoder\.block\.[23]\.", name):  # the attention blocks' MixCFN
                name = name.replace(".mlp.conv1.", ".mlp.conv_1.").replace(".mlp.conv2.", ".mlp.conv_2.")
            out[name] = value
        elif key.startswith("sem_seg_head.norm."):
            out["decode_head.batch_norm." + key[len("sem_seg_head.norm."):]] = value
        else:
            out["decode_head." + key[len("sem_seg_head."):]] = value
    dim = model.sem_seg_head.classifier.in_channels
    out["decode_head.linear_fuse.weight"] = torch.randn(dim, 4 * dim, 1, 1)
    return out


def nvlabs_state(model):
    """The model's tensors as an NVlabs/mmseg SegFormer checkpoint, with mmseg's unused conv_seg."""
    out = {}
    for key, value in model.state_dict().items():
        if m := re.match(r"sem_seg_head\.linear_c\.(\d)\.(.*)", key):
            out[f"decode_head.linear_c{int(m[1]) + 1}.{m[2]}"] = value
        elif key.startswith("sem_seg_head."):
            rest = key[len("sem_seg_head."):]
            for ours, theirs in (("linear_fuse.", "linear_fuse.conv."), ("norm.", "linear_fuse.bn."),
                                 ("classifier.", "linear_pred.")):
                if rest.startswith(ours):
                    out["decode_head." + theirs + rest[len(ours):]] = value
        else:
            out[key] = value
    out["decode_head.conv_seg.weight"] = torch.randn(5, 128, 1, 1)
    out["decode_head.conv_seg.bias"] = torch.randn(5)
    return out


def mmseg_state(model):
    """The model's tensors (MiT + SegFormerConvHead) as an MMSegmentation >= 0.17 SegFormer checkpoint: q and kv
    concatenated into nn.MultiheadAttention's in_proj, the Mix-FFN linears as 1x1 convs (``ffn.layers`` is
    Sequential(conv1x1, dwconv, GELU, Dropout, conv1x1, Dropout))."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if m := re.match(r"backbone\.patch_embed(\d)\.(proj|norm)\.(.*)", key):
            out[f"backbone.layers.{int(m[1]) - 1}.0.{'projection' if m[2] == 'proj' else 'norm'}.{m[3]}"] = value
        elif m := re.match(r"backbone\.norm(\d)\.(.*)", key):
            out[f"backbone.layers.{int(m[1]) - 1}.2.{m[2]}"] = value
        elif m := re.match(r"backbone\.block(\d)\.(\d+)\.(.*)", key):
            prefix, rest = f"backbone.layers.{int(m[1]) - 1}.1.{m[2]}.", m[3]
            if rest.startswith("attn.q."):
                tensor = rest[len("attn.q."):]
                kv = state[key.replace("attn.q.", "attn.kv.")]
                out[prefix + "attn.attn.in_proj_" + tensor] = torch.cat([value, kv])
            elif rest.startswith("attn.proj."):
                out[prefix + "attn.attn.out_proj." + rest[len("attn.proj."):]] = value
            elif rest.startswith(("mlp.fc1.", "mlp.fc2.")):
                index = 0 if rest.startswith("mlp.fc1.") else 4
                out[prefix + f"ffn.layers.{index}." + rest[8:]] = value[..., None, None] if value.dim() == 2 else value
            elif rest.startswith("mlp.dwconv.dwconv."):
                out[prefix + "ffn.layers.1." + rest[len("mlp.dwconv.dwconv."):]] = value
            elif not rest.startswith("attn.kv."):  # norm1, norm2, attn.sr, attn.norm
                out[prefix + rest] = value
        elif m := re.match(r"sem_seg_head\.linear_c\.(\d)\.(conv|norm)\.(.*)", key):
            out[f"decode_head.convs.{m[1]}.{'conv' if m[2] == 'conv' else 'bn'}.{m[3]}"] = value
        else:
            rest = key[len("sem_seg_head."):]
            for ours, theirs in (("linear_fuse.", "fusion_conv.conv."), ("norm.", "fusion_conv.bn."),
                                 ("classifier.", "conv_seg.")):
                if rest.startswith(ours):
                    out["decode_head." + theirs + rest[len(ours):]] = value
    return out


def under(state, prefix):
    """The tensors of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same_state(model, reference):
    theirs = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("fmt,family,head,write,names,dropped", [
    ("hf_segformer", "mit", None, hf_segformer_state,
     ["segformer.encoder.block.0.0.attention.self.key.weight", "segformer.encoder.patch_embeddings.3.layer_norm.bias",
      "decode_head.linear_c.2.proj.weight", "decode_head.classifier.weight"], []),
    ("hf_boostformer", "boostformer", None, hf_boostformer_state,
     ["segformer.encoder.block.2.0.mlp.conv_1.weight", "segformer.encoder.block.0.0.mlp.conv1.weight",
      "segformer.encoder.block.1.0.mlp.dwconv.mixconv.conv_5.weight", "segformer.encoder.block.3.0.attention.self.norm.weight",
      "decode_head.weights"], ["decode_head.linear_fuse.weight"]),
    ("nvlabs", "mit", None, nvlabs_state,
     ["backbone.block1.0.attn.kv.weight", "decode_head.linear_fuse.bn.running_var"],
     ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]),
    ("mmseg", "mit", "SegFormerConvHead", mmseg_state,
     ["backbone.layers.2.1.0.attn.attn.in_proj_weight", "backbone.layers.3.2.weight", "backbone.layers.0.1.0.ffn.layers.4.bias",
      "decode_head.convs.3.bn.running_var", "decode_head.conv_seg.bias"], []),
], ids=["hf_segformer", "hf_boostformer", "nvlabs", "mmseg"])
def test_key_names_round_trip(fmt, family, head, write, names, dropped):
    model = tiny_model(family, head=head)
    state = write(model)
    assert set(names) <= set(state)  # spot checks of the originals' names themselves
    assert detect_format(state) == fmt
    converted, dropped_keys = convert(state, fmt)
    assert sorted(dropped_keys) == dropped
    reference = model.state_dict()
    assert sorted(converted) == sorted(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_mmseg_tensors_mean_the_same_in_its_modules():
    """A block's MMSegmentation tensors loaded by name into the torch modules MMSegmentation builds
    (nn.MultiheadAttention, the Mix-FFN's conv Sequential) compute what the project's block computes;
    and its SegformerHead written out with functional ops from the mmseg tensors equals SegFormerConvHead."""
    model = tiny_model("mit", head="SegFormerConvHead")
    state = mmseg_state(model)
    block = model.backbone.block3[0]  # width 24, 2 heads, keys/values from a map reduced 2 times
    prefix = "backbone.layers.2.1.0."
    mha = torch.nn.MultiheadAttention(24, 2, batch_first=True)
    mha.load_state_dict(under(state, prefix + "attn.attn."))
    ffn = torch.nn.Sequential(torch.nn.Conv2d(24, 96, 1), torch.nn.Conv2d(96, 96, 3, padding=1, groups=96),
                              torch.nn.GELU(), torch.nn.Dropout(), torch.nn.Conv2d(96, 24, 1), torch.nn.Dropout()).eval()
    ffn.load_state_dict(under(state, prefix + "ffn.layers."))
    x = torch.randn(2, 64, 24)
    with torch.no_grad():
        reduced = block.attn.norm(block.attn.sr(x.transpose(1, 2).reshape(2, 24, 8, 8)).flatten(2).transpose(1, 2))
        torch.testing.assert_close(mha(x, reduced, reduced, need_weights=False)[0], block.attn(x, 8, 8))
        mixed = ffn(x.transpose(1, 2).reshape(2, 24, 8, 8)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(mixed, block.mlp(x, 8, 8))

    def conv_bn_relu(x, name):
        bn = {k: state[f"{name}.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        x = F.conv2d(x, state[f"{name}.conv.weight"])
        return F.relu(F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"]))

    features = {f"res{i + 2}": torch.randn(1, c, 16 >> i, 16 >> i) for i, c in enumerate([8, 16, 24, 32])}
    maps = [F.interpolate(conv_bn_relu(features[f"res{i + 2}"], f"decode_head.convs.{i}"), size=(16, 16),
                          mode="bilinear", align_corners=False) for i in range(4)]
    fused = conv_bn_relu(torch.cat(maps, dim=1), "decode_head.fusion_conv")  # stage order, first stage first
    expected = F.conv2d(fused, state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.sem_seg_head.layers(features), expected)


def test_own_checkpoints_are_no_user_format():
    assert detect_format(tiny_model("mit").state_dict()) is None
    assert detect_format(tiny_model("boostformer").state_dict()) is None


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("family", ["mit", "boostformer"])
def test_hf_save_pretrained_directory_loads_through_model_weights(tmp_path, family, weights_file, caplog):
    source = tiny_model(family, seed=1)
    state = (hf_segformer_state if family == "mit" else hf_boostformer_state)(source)
    state = {k: v.contiguous() for k, v in state.items()}
    if weights_file.endswith(".safetensors"):
        save_file(state, str(tmp_path / weights_file))
    else:
        torch.save(state, tmp_path / weights_file)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SegformerForSemanticSegmentation"],
                                                      "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}))
    model = tiny_model(family, seed=2)
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path))  # the directory, as from_pretrained takes it
    assert_same_state(model, source)
    assert "HuggingFace" in caplog.text and "SegformerForSemanticSegmentation" in caplog.text
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        assert torch.equal(model(image)[0]["sem_seg"], source(image)[0]["sem_seg"])


def test_nvlabs_checkpoint_loads(tmp_path):
    source = tiny_model("mit", seed=1)
    torch.save({"meta": {"CLASSES": ["a"] * 5}, "state_dict": nvlabs_state(source)}, tmp_path / "segformer.pth")
    model = tiny_model("mit", seed=2)
    AFFCheckpointer(model).load(str(tmp_path / "segformer.pth"))
    assert_same_state(model, source)


def test_imagenet_encoder_loads_into_the_backbone_alone(tmp_path, caplog):
    source = tiny_model("mit", seed=1)
    encoder = {k[len("backbone."):]: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    encoder.update({"head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)})
    torch.save(encoder, tmp_path / "mit_b0.pth")
    model = tiny_model("mit", seed=2)
    head_before = {k: v.clone() for k, v in model.sem_seg_head.state_dict().items()}
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path / "mit_b0.pth"))
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, head_before[k]) for k, v in model.sem_seg_head.state_dict().items())
    assert "encoder only" in caplog.text and "head.weight" in caplog.text


def test_mmseg_checkpoint_loads_into_segformer_conv_head_only(tmp_path):
    source = tiny_model("mit", seed=1, head="SegFormerConvHead")
    torch.save({"meta": {"CLASSES": ["a"] * 5}, "state_dict": mmseg_state(source)}, tmp_path / "segformer_mmseg.pth")
    model = tiny_model("mit", seed=2, head="SegFormerConvHead")
    AFFCheckpointer(model).load(str(tmp_path / "segformer_mmseg.pth"))
    assert_same_state(model, source)
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        assert torch.equal(model(image)[0]["sem_seg"], source(image)[0]["sem_seg"])
    # the paper's head (linear projections) has no place for the convs, norms of each input
    with pytest.raises(CheckpointMismatchError) as e:
        AFFCheckpointer(tiny_model("mit", seed=2)).load(str(tmp_path / "segformer_mmseg.pth"))
    assert "sem_seg_head.linear_c.0.conv.weight" in str(e.value)  # in the file, not in the model
    assert "sem_seg_head.linear_c.0.proj.weight" in str(e.value)  # in the model, not in the file


def test_mmseg_imagenet_encoder_loads_into_the_backbone_alone(tmp_path, caplog):
    source = tiny_model("mit", seed=1)
    # MMSegmentation's ImageNet MiT: the backbone's tensors without prefix (its converter drops the classifier)
    mmseg_source = tiny_model("mit", seed=1, head="SegFormerConvHead")
    encoder = {k[len("backbone."):]: v for k, v in mmseg_state(mmseg_source).items() if k.startswith("backbone.")}
    assert detect_format(encoder) == "mmseg_imagenet"
    torch.save(encoder, tmp_path / "mit_b0_mmseg.pth")
    model = tiny_model("mit", seed=2)
    head_before = {k: v.clone() for k, v in model.sem_seg_head.state_dict().items()}
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path / "mit_b0_mmseg.pth"))
    assert_same_state(model.backbone, source.backbone)
    assert all(torch.equal(v, head_before[k]) for k, v in model.sem_seg_head.state_dict().items())
    assert "MMSegmentation ImageNet MiT encoder" in caplog.text and "encoder only" in caplog.text


@pytest.mark.parametrize("family", ["mit", "boostformer"])
def test_hf_base_model_dump_loads_into_the_backbone_alone(tmp_path, family, caplog):
    source = tiny_model(family, seed=1)
    full = (hf_segformer_state if family == "mit" else hf_boostformer_state)(source)
    # SegformerModel.save_pretrained: the encoder, without the "segformer." prefix of the task models
    base = {k[len("segformer."):]: v.contiguous() for k, v in full.items() if k.startswith("segformer.")}
    save_file(base, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SegformerModel"],
                                                      "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}))
    model = tiny_model(family, seed=2)
    head_before = {k: v.clone() for k, v in model.sem_seg_head.state_dict().items()}
    with caplog.at_level(logging.INFO):
        AFFCheckpointer(model).load(str(tmp_path))
    assert_same_state(model.backbone, source.backbone)
    assert all(torch.equal(v, head_before[k]) for k, v in model.sem_seg_head.state_dict().items())
    assert "SegformerModel" in caplog.text and "encoder only" in caplog.text
    assert "sem_seg_head.classifier.weight" in caplog.text  # the load report names what the file lacks


def test_another_size_or_family_stops_unless_partial_loading_is_allowed(tmp_path, caplog):
    other = tiny_model("mit", seed=1, encoder={**TINY_MIT, "DEPTHS": [1, 2, 1, 1]})
    torch.save(hf_segformer_state(other), tmp_path / "pytorch_model.bin")
    model = tiny_model("mit", seed=2)
    before = model.backbone.block2[0].attn.q.weight.clone()
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointMismatchError, match="MODEL.WEIGHTS_STRICT") as e:
        AFFCheckpointer(model).load(str(tmp_path / "pytorch_model.bin"))
    assert "backbone.block2.1.attn.q.weight" in str(e.value)
    assert "depths [1, 2, 1, 1]" in caplog.text  # the report names what the file holds

    AFFCheckpointer(model, strict=False).load(str(tmp_path / "pytorch_model.bin"))
    assert torch.equal(model.backbone.block2[0].attn.q.weight, other.backbone.block2[0].attn.q.weight)
    assert not torch.equal(before, model.backbone.block2[0].attn.q.weight)

    torch.save(hf_boostformer_state(tiny_model("boostformer", seed=3)), tmp_path / "boost.bin")
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointMismatchError) as e:
        AFFCheckpointer(model).load(str(tmp_path / "boost.bin"))
    assert "backbone.patch_embeddings.0.conv.weight" in str(e.value) and "BoostFormer checkpoint" in caplog.text


def test_shallower_encoder_alone_stops(tmp_path):
    shallow = tiny_model("mit", seed=1)
    encoder = {k[len("backbone."):]: v for k, v in shallow.state_dict().items() if k.startswith("backbone.")}
    torch.save(encoder, tmp_path / "mit.pth")
    deeper = tiny_model("mit", seed=2, encoder={**TINY_MIT, "DEPTHS": [1, 2, 1, 1]})
    with pytest.raises(CheckpointMismatchError, match=r"lacks tensors of the model's encoder.*block2\.1\.attn"):
        AFFCheckpointer(deeper).load(str(tmp_path / "mit.pth"))
    AFFCheckpointer(deeper, strict=False).load(str(tmp_path / "mit.pth"))
    assert torch.equal(deeper.backbone.block2[0].attn.q.weight, shallow.backbone.block2[0].attn.q.weight)


def test_other_number_of_classes_names_the_classifier(tmp_path):
    torch.save(hf_segformer_state(tiny_model("mit", num_classes=7)), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=r"sem_seg_head\.classifier\.weight.*\(7, 16, 1, 1\).*\(5, 16, 1, 1\)"):
        AFFCheckpointer(tiny_model("mit")).load(str(tmp_path / "pytorch_model.bin"))


def test_directory_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        AFFCheckpointer(tiny_model("mit")).load(str(tmp_path))


def test_convert_tool_writes_a_detectron2_pkl(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_segformer", ROOT / "tools" / "convert-segformer-to-d2.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = tiny_model("boostformer", seed=1)
    save_file({k: v.contiguous() for k, v in hf_boostformer_state(source).items()}, str(tmp_path / "model.safetensors"))
    tool.main([str(tmp_path), str(tmp_path / "out.pkl")])
    model = tiny_model("boostformer", seed=2)
    AFFCheckpointer(model).load(str(tmp_path / "out.pkl"))
    assert_same_state(model, source)


def test_convert_tool_takes_mmseg_checkpoints(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_segformer", ROOT / "tools" / "convert-segformer-to-d2.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = tiny_model("mit", seed=1, head="SegFormerConvHead")
    torch.save({"state_dict": mmseg_state(source)}, tmp_path / "segformer_mmseg.pth")
    tool.main([str(tmp_path / "segformer_mmseg.pth"), str(tmp_path / "out.pkl")])
    assert "MMSegmentation (>= 0.17) SegFormer checkpoint" in capsys.readouterr().out
    model = tiny_model("mit", seed=2, head="SegFormerConvHead")
    AFFCheckpointer(model).load(str(tmp_path / "out.pkl"))
    assert_same_state(model, source)

"""Python inference API: run a model on images or video frames and draw its predictions.

``Predictor(config, weights)`` is detectron2's ``DefaultPredictor`` for this project: it takes
a config file (or a config), reads ``weights`` (local path or URL) through the project
checkpointer, runs on the CPU when CUDA is unavailable and, with ``TEST.AMP.ENABLED``, under
bf16/fp16 autocast (with ``TEST.COMPILE``, its backbone and head compiled by ``torch.compile``).
Calling it on one BGR image returns detectron2's output dict (``sem_seg``, ``instances``,
``panoptic_seg``)::

    predictor = Predictor("configs/ade20k/semantic-segmentation/aff/maskformer2_aff_tiny_bs32_80k.yaml",
                          "aff_tiny_ade20k.pth")
    labels = predictor(cv2.imread("room.jpg"))["sem_seg"].argmax(0)

``VisualizationDemo`` (what ``demo/demo.py`` uses) draws the outputs with detectron2's
``Visualizer``: panoptic segmentation when the model returns it, otherwise the semantic
argmax and/or the instances whose score passes the confidence threshold.  It can also report,
for every backbone stage, which tokens adaptive downsampling kept (``kept_tokens``), mapped
back onto the pixels of the input image; ``draw_kept_tokens`` draws them (the paper's
"remaining tokens" figure).
"""
import contextlib
import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine.defaults import DefaultPredictor
from detectron2.structures import Boxes, Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .checkpoint import AFFCheckpointer, check_weights
from .config import load_config
from .evaluation import SlidingWindowInference
from .solver import AMP_DTYPES

__all__ = ["AutocastInference", "Predictor", "StageTokens", "VisualizationDemo", "as_float32", "compile_for_inference",
           "draw_kept_tokens", "inference_autocast"]

logger = logging.getLogger(__name__)

# side of one token's cell on the padded input: positions are in stride-4 grid units
TOKEN_CELL = 4


@dataclass
class StageTokens:
    """The tokens one backbone stage kept, in the original image's pixels.

    Attributes:
        name: the backbone output, e.g. ``"res3"``.
        num_tokens: how many tokens the stage has (padding tokens included).
        centers: ``t x 2`` float array, (x, y) pixel centre of each token that lies inside
            the image (tokens on the padding are left out, so t <= num_tokens).
        cell: side of one token's stride-4 cell, in original-image pixels (x, y).
    """

    name: str
    num_tokens: int
    centers: np.ndarray
    cell: tuple


def inference_autocast(cfg):
    """``torch.autocast`` in ``TEST.AMP.PRECISION`` on ``MODEL.DEVICE`` when
    ``TEST.AMP.ENABLED``, else a no-op context."""
    if not cfg.TEST.AMP.ENABLED:
        return contextlib.nullcontext()
    precision = cfg.TEST.AMP.PRECISION
    if precision not in AMP_DTYPES:
        raise ValueError(f"TEST.AMP.PRECISION={precision!r} is not one of {sorted(AMP_DTYPES)}")
    return torch.autocast(torch.device(cfg.MODEL.DEVICE).type, dtype=AMP_DTYPES[precision])


def as_float32(outputs):
    """``outputs`` (a model's output, nested dicts/lists/tuples of tensors and ``Instances``)
    with every floating tensor in float32, so that numpy-based evaluators and drawing work after
    a bf16/fp16 forward.  ``Instances`` are converted in place."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Boxes):
        return Boxes(as_float32(outputs.tensor))
    if isinstance(outputs, Instances):
        for name, value in outputs.get_fields().items():
            outputs.set(name, as_float32(value))
        return outputs
    if isinstance(outputs, dict):
        return {key: as_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_float32(value) for value in outputs)
    return outputs


def compile_for_inference(model):
    """Compile ``model.backbone`` and ``model.sem_seg_head`` in place with ``torch.compile``
    (inductor), for inference (``TEST.COMPILE``); the pre- and post-processing stay eager and the
    parameter names (checkpoints) do not change. Returns ``model``."""
    parts = [getattr(model, name, None) for name in ("backbone", "sem_seg_head")]
    if not all(isinstance(part, torch.nn.Module) for part in parts):
        raise ValueError(f"TEST.COMPILE: {type(model).__name__} has no backbone and sem_seg_head to compile")
    for part in parts:
        part.compile()
    return model


class AutocastInference(torch.nn.Module):
    """``model`` whose forward runs under ``inference_autocast(cfg)`` (``TEST.AMP``) and hands
    back float32 outputs; what the evaluation runs with ``TEST.AMP.ENABLED``."""

    def __init__(self, cfg, model):
        super().__init__()
        self.cfg = cfg
        self.model = model

    def forward(self, *args, **kwargs):
        with inference_autocast(self.cfg):
            outputs = self.model(*args, **kwargs)
        return as_float32(outputs)


class Predictor(DefaultPredictor):
    """One image in, detectron2's outputs out: ``Predictor(config, weights)(bgr_image)``.

    Args:
        config: a config file path (read with ``aff_seg.load_config``) or a detectron2 config
            holding the project's keys.
        weights: ``MODEL.WEIGHTS``: a local file, or a URL that detectron2's ``PathManager``
            downloads and caches (``https://``, ``detectron2://`` ...); None keeps the config's,
            "" means random initialisation.
        opts: ``KEY VALUE`` config overrides, as on the command line.
        device: ``MODEL.DEVICE``; None keeps the config's, falling back to "cpu" when CUDA is
            unavailable.

    Calling it on an ``H x W x 3`` uint8 BGR image returns the model's output dict for that
    image at its original size (``sem_seg``: ``K x H x W`` scores, ``instances``,
    ``panoptic_seg``), float tensors in float32 also under ``TEST.AMP``; with
    ``TEST.SLIDING_WINDOW.ENABLED`` the model runs on sliding windows and returns ``sem_seg`` only.
    ``predictor.cfg`` is the frozen config used.
    """

    def __init__(self, config, weights=None, opts=(), device=None):
        if isinstance(config, CfgNode):
            cfg = config.clone()
            cfg.defrost()
            cfg.merge_from_list(list(opts))
        else:
            cfg = load_config(config, opts)
        if weights is not None:
            cfg.MODEL.WEIGHTS = weights
        if device is not None:
            cfg.MODEL.DEVICE = device
        elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            logger.info("CUDA is not available: running on the CPU")
            cfg.MODEL.DEVICE = "cpu"
        check_weights(cfg.MODEL.WEIGHTS)
        cfg.freeze()
        weights_free = cfg.clone()
        weights_free.defrost()
        weights_free.MODEL.WEIGHTS = ""  # DefaultPredictor would read it with plain pickle
        super().__init__(weights_free)
        self.cfg = cfg
        if cfg.MODEL.WEIGHTS:
            AFFCheckpointer(self.model, strict=cfg.MODEL.WEIGHTS_STRICT).load(cfg.MODEL.WEIGHTS)
        if cfg.TEST.COMPILE:
            compile_for_inference(self.model)
        if cfg.TEST.SLIDING_WINDOW.ENABLED:
            self.model = SlidingWindowInference.from_config(cfg, self.model)

    def __call__(self, image):
        with inference_autocast(self.cfg):
            outputs = super().__call__(image)
        return as_float32(outputs)


def _metadata(cfg):
    """The metadata of the first test dataset, or class names "0".."K-1" when it has none
    (the Visualizer needs ``stuff_classes`` to draw a semantic map)."""
    if len(cfg.DATASETS.TEST):
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        if "stuff_classes" in metadata.as_dict():
            return metadata
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    return Metadata(name="aff_seg_demo", stuff_classes=[str(i) for i in range(num_classes)])


def _without_zero_boxes(instances):
    """Mask2Former's instances carry all-zero boxes; drop them so labels sit on the masks."""
    if instances.has("pred_boxes") and not instances.pred_boxes.tensor.any():
        instances.remove("pred_boxes")
    return instances


class VisualizationDemo:
    """Predict with a ``Predictor`` and draw the result.

    Args:
        cfg: a detectron2 config (``MODEL.WEIGHTS`` empty means random init).
        confidence_threshold: instances scoring at or below it are not drawn.
        instance_mode: detectron2 ``ColorMode`` of the drawings.
        predictor: a predictor to use instead of ``Predictor(cfg)`` (image -> result dict), e.g.
            an exported model's ``aff_seg.export.runtime.ExportedPredictor``.
    """

    def __init__(self, cfg, confidence_threshold=0.0, instance_mode=ColorMode.IMAGE, predictor=None):
        self.predictor = predictor if predictor is not None else Predictor(cfg)
        self.metadata = _metadata(cfg)
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.cpu_device = torch.device("cpu")
        self._backbone_outputs = None

    # -- prediction -----------------------------------------------------------------------

    def predict(self, image, with_tokens=False):
        """Run the model on one image.

        Args:
            image: ``H x W x 3`` uint8 array in BGR order.
            with_tokens: also return the tokens every backbone stage kept.

        Returns:
            (predictions, tokens): the model's output dict for the image, and a list of
            ``StageTokens`` (res2 first), or None when ``with_tokens`` is False.
        """
        if not with_tokens:
            return self.predictor(image), None
        if not isinstance(self.predictor, Predictor):
            raise ValueError("--show-tokens needs the eager model; an exported model (--exported) has no backbone hook")
        backbone = self.predictor.model.backbone
        if getattr(backbone, "output_format", "maps") != "tokens":
            raise ValueError(
                f"--show-tokens needs a backbone that returns tokens; MODEL.BACKBONE.NAME="
                f"{self.predictor.cfg.MODEL.BACKBONE.NAME!r} returns dense maps"
            )
        hook = self.predictor.model.backbone.register_forward_hook(self._keep_backbone_outputs)
        try:
            predictions = self.predictor(image)
        finally:
            hook.remove()
        outputs, self._backbone_outputs = self._backbone_outputs, None
        return predictions, self.kept_tokens(outputs, image.shape[:2])

    def _keep_backbone_outputs(self, module, inputs, outputs):
        self._backbone_outputs = outputs

    def kept_tokens(self, backbone_outputs, image_size):
        """Map the backbone's token positions onto the original image.

        Args:
            backbone_outputs: the backbone's dict for a batch of one; ``<stage>_pos`` is
                ``1 x n x 2``, (x, y) in stride-4 grid units of the padded, resized input.
            image_size: (H, W) of the original image.

        Returns:
            list of ``StageTokens``, one per stage that has positions, in stage order.
        """
        height, width = image_size
        # the predictor resizes the shortest edge; padding is on the right/bottom only, so
        # the padded input's pixel (x, y) is the resized image's pixel (x, y)
        resize = self.predictor.aug.get_transform(np.zeros((height, width, 1), np.uint8))
        resized_h, resized_w = getattr(resize, "new_h", height), getattr(resize, "new_w", width)
        scale = np.array([width / resized_w, height / resized_h])
        stages = sorted(k[: -len("_pos")] for k in backbone_outputs if k.endswith("_pos"))
        tokens = []
        for name in stages:
            pos = backbone_outputs[f"{name}_pos"][0].detach().float().cpu().numpy()
            centers = pos * TOKEN_CELL + TOKEN_CELL / 2  # resized-input pixels
            inside = (centers[:, 0] < resized_w) & (centers[:, 1] < resized_h)
            tokens.append(
                StageTokens(
                    name=name,
                    num_tokens=len(pos),
                    centers=centers[inside] * scale,
                    cell=tuple(TOKEN_CELL * scale),
                )
            )
        return tokens

    # -- drawing --------------------------------------------------------------------------

    def _confident(self, instances):
        return _without_zero_boxes(instances[instances.scores > self.confidence_threshold])

    def draw(self, predictions, canvas):
        """Draw ``predictions`` on ``canvas`` (``H x W x 3`` RGB uint8); returns a VisImage."""
        visualizer = Visualizer(canvas, self.metadata, instance_mode=self.instance_mode)
        if "panoptic_seg" in predictions:
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            return visualizer.draw_panoptic_seg(panoptic_seg.to(self.cpu_device), segments_info)
        vis_output = None
        if "sem_seg_labels" in predictions:  # MODEL.MASK_FORMER.TEST.SEMANTIC_LABELS_ONLY
            vis_output = visualizer.draw_sem_seg(predictions["sem_seg_labels"].to(self.cpu_device))
        elif "sem_seg" in predictions:
            labels = predictions["sem_seg"].argmax(dim=0).to(self.cpu_device)
            vis_output = visualizer.draw_sem_seg(labels)
        if "instances" in predictions:
            instances = self._confident(predictions["instances"].to(self.cpu_device))
            vis_output = visualizer.draw_instance_predictions(predictions=instances)
        if vis_output is None:
            raise ValueError(
                "the model returned none of panoptic_seg, sem_seg, sem_seg_labels, instances: "
                f"got keys {sorted(predictions)}"
            )
        return vis_output

    def run_on_image(self, image, canvas=None, with_tokens=False):
        """Predict on ``image`` and draw the result.

        Args:
            image: ``H x W x 3`` uint8 BGR image the model sees.
            canvas: ``H x W x 3`` uint8 BGR image to draw on (``--blur``: a privacy-blurred
                copy of ``image``); defaults to ``image``.
            with_tokens: also return the kept tokens of every backbone stage.

        Returns:
            (predictions, vis_output, tokens); ``tokens`` as in ``predict``.
        """
        if canvas is None:
            canvas = image
        elif canvas.shape != image.shape:
            raise ValueError(
                f"the image to draw on has shape {canvas.shape}, the input has {image.shape}"
            )
        predictions, tokens = self.predict(image, with_tokens)
        return predictions, self.draw(predictions, canvas[:, :, ::-1]), tokens

    def run_on_video(self, video):
        """Yield every frame of ``video`` (an opened ``cv2.VideoCapture``), annotated, BGR."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            predictions = self.predictor(frame)
            rgb = frame[:, :, ::-1]
            if "panoptic_seg" in predictions:
                panoptic_seg, segments_info = predictions["panoptic_seg"]
                vis_frame = video_visualizer.draw_panoptic_seg_predictions(
                    rgb, panoptic_seg.to(self.cpu_device), segments_info
                )
            elif "instances" in predictions and "sem_seg" not in predictions:
                instances = self._confident(predictions["instances"].to(self.cpu_device))
                vis_frame = video_visualizer.draw_instance_predictions(rgb, instances)
            else:
                vis_frame = self.draw(predictions, rgb)
            yield cv2.cvtColor(vis_frame.get_image(), cv2.COLOR_RGB2BGR)


def draw_kept_tokens(image, stage_tokens, dim=0.35):
    """Draw one stage's kept tokens over ``image``.

    The image is dimmed; the stride-4 cell of each kept token is shown at full brightness
    with a dot at its centre, so the dense regions where adaptive downsampling kept many
    tokens stand out.

    Args:
        image: ``H x W x 3`` uint8 BGR image.
        stage_tokens: a ``StageTokens``.
        dim: brightness of the parts of the image no token covers.

    Returns:
        ``H x W x 3`` uint8 BGR image.
    """
    height, width = image.shape[:2]
    cell_w, cell_h = stage_tokens.cell
    centers = stage_tokens.centers
    kept = np.zeros((height, width), bool)
    x0 = np.clip(np.floor(centers[:, 0] - cell_w / 2), 0, width).astype(int)
    y0 = np.clip(np.floor(centers[:, 1] - cell_h / 2), 0, height).astype(int)
    x1 = np.clip(np.ceil(centers[:, 0] + cell_w / 2), 0, width).astype(int)
    y1 = np.clip(np.ceil(centers[:, 1] + cell_h / 2), 0, height).astype(int)
    for a, b, c, d in zip(y0, y1, x0, x1):
        kept[a:b, c:d] = True
    out = np.where(kept[..., None], image, (image * dim).astype(np.uint8))
    radius = max(1, int(round(min(cell_w, cell_h) / 4)))
    for x, y in centers.astype(int):
        cv2.circle(out, (int(x), int(y)), radius, (0, 255, 255), -1)
    return out

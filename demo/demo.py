"""AFF segmentation demo: predict on images, a video or a webcam and draw the results.

Examples::

    python demo/demo.py --config-file CFG --input 'imgs/*.jpg' --output out/ \\
        --opts MODEL.WEIGHTS model.pkl
    python demo/demo.py --config-file CFG --input a.jpg --show-tokens --output out/
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output out/

``--show-tokens`` saves, beside each prediction, one image per backbone stage showing the
tokens adaptive downsampling kept (``<name>_tokens_res2.png`` ...) and a
``<name>_tokens.json`` with the token counts.  ``--blur DIR`` draws each prediction on the
image of the same name in DIR (e.g. a face-blurred copy); it applies to image inputs only.
Without a GPU the model runs on the CPU.  Unreadable inputs are reported and skipped; the
exit status is 1 when any input was skipped.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aff_seg  # noqa: E402,F401  (compat fixes before detectron2)
from aff_seg.checkpoint import CheckpointMismatchError  # noqa: E402
from aff_seg.config import ConfigError, load_config  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from predictor import VisualizationDemo, draw_kept_tokens  # noqa: E402

WINDOW_NAME = "aff_seg demo"
# video container -> fourcc that opencv's bundled ffmpeg can write
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}

logger = logging.getLogger("aff_seg.demo")


class InputError(RuntimeError):
    """An input (image, video, weights) that cannot be used; the message names its path."""


def setup_cfg(args):
    """Config from ``--config-file`` and ``--opts``; the model runs on the CPU when CUDA is
    unavailable."""
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="aff_seg demo")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--webcam", action="store_true", help="take frames from webcam 0")
    source.add_argument("--video-input", help="path to a video file")
    source.add_argument(
        "--input", nargs="+", help="image files or glob patterns, e.g. 'dir/*.jpg'"
    )
    parser.add_argument(
        "--output",
        help="file or directory to save the visualisations to; without it they are shown "
        "in a window. With several inputs it is a directory.",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="instances scoring at or below this are not drawn",
    )
    parser.add_argument(
        "--blur",
        metavar="DIR",
        help="draw each image's prediction on the image of the same name in DIR "
        "(e.g. a privacy-blurred copy); image inputs only",
    )
    parser.add_argument(
        "--show-tokens",
        action="store_true",
        help="also save, per backbone stage, the tokens adaptive downsampling kept "
        "(image inputs only; needs --output)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs; must come last",
    )
    return parser


# -- inputs -------------------------------------------------------------------------------


def expand_inputs(patterns):
    """Files named by ``patterns`` (literal paths or globs), in order, without duplicates.

    Returns:
        (paths, errors): the paths found, and one message per pattern that matched nothing.
    """
    paths, errors = [], []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            errors.append(f"no file matches {pattern}")
        paths.extend(m for m in matches if m not in paths)
    return paths, errors


def load_image(path):
    """Read ``path`` as a BGR uint8 image; ``InputError`` naming the path if it cannot."""
    if not os.path.isfile(path):
        raise InputError(f"cannot read image {path}: no such file")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read image {path}: the file is empty")
    try:
        image = read_image(path, format="BGR")
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise InputError(f"cannot read image {path}: decoded shape {image.shape}")
    return image


def output_path(output, input_path, many):
    """Where the visualisation of ``input_path`` goes: inside ``output`` when it is a
    directory (always with several inputs), else ``output`` itself."""
    if many or os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(input_path))
    parent = os.path.dirname(output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return output


def save_tokens(out_filename, image, tokens):
    """Save one kept-tokens image per stage beside ``out_filename`` and a json of counts.

    Returns:
        the dict written to ``<stem>_tokens.json``: per stage, ``num_tokens`` and
        ``num_in_image`` (tokens whose cell centre lies inside the image).
    """
    stem, ext = os.path.splitext(out_filename)
    counts = {}
    for stage in tokens:
        cv2.imwrite(f"{stem}_tokens_{stage.name}{ext}", draw_kept_tokens(image, stage))
        counts[stage.name] = {
            "num_tokens": stage.num_tokens,
            "num_in_image": int(len(stage.centers)),
        }
    with open(f"{stem}_tokens.json", "w") as f:
        json.dump(counts, f, indent=2)
    return counts


def show(image, wait_ms):
    """Show ``image`` (BGR) in the demo window; returns the key pressed (27: esc)."""
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, image)
    except cv2.error as e:
        raise InputError(f"cannot open a window ({e}); pass --output to save instead") from e
    return cv2.waitKey(wait_ms)


# -- modes --------------------------------------------------------------------------------


def run_images(demo, args):
    """Process every image; returns the list of error messages of skipped inputs."""
    paths, errors = expand_inputs(args.input)
    many = len(paths) > 1
    if args.show_tokens and not args.output:
        raise InputError("--show-tokens saves images: pass --output")
    for path in tqdm.tqdm(paths, disable=not args.output):
        try:
            image = load_image(path)
            canvas = None
            if args.blur:
                canvas = load_image(os.path.join(args.blur, os.path.basename(path)))
            start = time.perf_counter()
            predictions, vis_output, tokens = demo.run_on_image(
                image, canvas, with_tokens=args.show_tokens
            )
        except (InputError, ValueError) as e:
            logger.error(f"skipped {path}: {e}")
            errors.append(f"{path}: {e}")
            continue
        logger.info(
            "{}: {} in {:.2f}s".format(
                path, ", ".join(sorted(predictions)), time.perf_counter() - start
            )
        )
        if args.output:
            out_filename = output_path(args.output, path, many)
            vis_output.save(out_filename)
            if tokens is not None:
                counts = save_tokens(out_filename, canvas if canvas is not None else image, tokens)
                logger.info(f"{path}: kept tokens per stage {counts}")
        elif show(vis_output.get_image()[:, :, ::-1], 0) == 27:
            break  # esc
    return errors


def open_video(source):
    video = cv2.VideoCapture(source)
    if not video.isOpened():
        raise InputError(f"cannot open video {source}")
    return video


def video_writer(path, fps, width, height):
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_CODECS:
        raise InputError(f"--output {path}: video output must end in one of {sorted(VIDEO_CODECS)}")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODECS[ext]), fps, (width, height))
    if not writer.isOpened():
        raise InputError(f"cannot write video {path}")
    return writer


def run_video(demo, args):
    video = open_video(args.video_input)
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = None
    if args.output:
        if os.path.isdir(args.output) or args.output.endswith(os.sep):
            os.makedirs(args.output, exist_ok=True)
            stem = os.path.splitext(os.path.basename(args.video_input))[0]
            out_filename = os.path.join(args.output, stem + ".mp4")
        else:
            out_filename = args.output
        writer = video_writer(out_filename, fps, width, height)
    try:
        for vis_frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames):
            if writer is not None:
                writer.write(vis_frame)
            elif show(vis_frame, 1) == 27:
                break
    finally:
        video.release()
        if writer is not None:
            writer.release()
        else:
            cv2.destroyAllWindows()


def run_webcam(demo, args):
    cam = open_video(0)
    try:
        for vis in tqdm.tqdm(demo.run_on_video(cam)):
            if show(vis, 1) == 27:
                break
    finally:
        cam.release()
        cv2.destroyAllWindows()


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="aff_seg")
    logger.info("Arguments: " + str(args))
    if args.blur and not args.input:
        logger.warning("--blur applies to image inputs only; ignored")
    if args.show_tokens and not args.input:
        logger.warning("--show-tokens applies to image inputs only; ignored")
    try:
        cfg = setup_cfg(args)
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold)
        if args.input:
            errors = run_images(demo, args)
            if errors:
                logger.error(f"{len(errors)} input(s) skipped:\n  " + "\n  ".join(errors))
                return 1
        elif args.video_input:
            run_video(demo, args)
        else:
            run_webcam(demo, args)
    except (InputError, ConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

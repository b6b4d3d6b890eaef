"""AFF segmentation demo: predict on images, a video or a webcam and draw the results.

Examples::

    python demo/demo.py --config-file CFG --input 'imgs/*.jpg' --output out/ MODEL.WEIGHTS model.pkl
    python demo/demo.py --config-file CFG --input a.jpg --show-tokens --output out/
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output out/
    python demo/demo.py --config-file CFG --webcam --output webcam.mp4

Config overrides are ``KEY VALUE`` pairs at the end (``--opts KEY VALUE ...`` is the same).
Where results go (one rule for images, tokens and video): ``--output`` names a folder when it
is one already, ends with ``/``, has no file extension, or several images are given; each
result is then ``<folder>/<input name>`` (a video or the webcam: ``<folder>/<name>.mp4``);
inputs of the same name keep their folders (``a/same.jpg``, ``b/same.jpg`` ->
``<folder>/a/same.jpg``, ``<folder>/b/same.jpg``), so no result overwrites another.
Otherwise ``--output`` is the file itself.  Every run ends with a line naming what it wrote.
Without ``--output`` results are shown in a window, which needs an OpenCV built with GUI
support (``pip install .[gui]``; the default install is headless).

``--show-tokens`` saves, beside each prediction, one image per backbone stage showing the
tokens adaptive downsampling kept (``<name>_tokens_res2.png`` ...) and a
``<name>_tokens.json`` with the token counts.  ``--blur DIR`` draws each prediction on the
image of the same name in DIR (e.g. a face-blurred copy); it applies to image inputs only.
Without a GPU the model runs on the CPU.  Unreadable inputs are reported and skipped; the
exit status is 1 when any input was skipped.  A name with glob characters (``photo[1].jpg``)
is a file when one of that name exists, else a pattern.  Single-channel 16-bit images are
scaled to 8 bits (65535 -> 255), float images (TIFF) in [0, 1] or [0, 255] likewise; other
float ranges are refused.
"""
import argparse
import glob
import json
import logging
import os
import re
import sys
import time

import cv2
import numpy as np
import tqdm
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aff_seg  # noqa: E402,F401  (compat fixes before detectron2)
from aff_seg.checkpoint import CheckpointMismatchError  # noqa: E402
from aff_seg.config import ConfigError, load_config  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from aff_seg.export.runtime import ExportedPredictor  # noqa: E402
from aff_seg.predictor import VisualizationDemo, draw_kept_tokens  # noqa: E402

WINDOW_NAME = "aff_seg demo"
# video container -> fourcc that opencv's bundled ffmpeg can write
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# a config key as given on the command line: MODEL.WEIGHTS, SOLVER.AMP.ENABLED ...
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
NO_GUI = (
    "showing results in a window needs OpenCV with GUI support, and this one is headless: "
    "install it with `pip install .[gui]`, or pass --output FILE_OR_FOLDER to save the results"
)

logger = logging.getLogger("aff_seg.demo")


class InputError(RuntimeError):
    """An input (image, video, weights) that cannot be used; the message names its path."""


def setup_cfg(args):
    """Config from ``--config-file`` and the overrides (the predictor runs it on the CPU when
    CUDA is unavailable)."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def gui_available():
    """Whether this OpenCV can open windows (its build information lists a GUI backend)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip().upper() != "NONE"
    return True


def get_parser():
    parser = argparse.ArgumentParser(
        description="Predict with an AFF model on images, a video or a webcam and draw the results. "
        "They are saved with --output, else shown in a window (needs `pip install .[gui]`). "
        "Config overrides KEY VALUE come last.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument(
        "--exported", metavar="DIR",
        help="run the model exported to DIR by tools/export_model.py (torch.export program or ONNX) instead of "
        "building it; --config-file still names the dataset (class names, colours) of the drawings",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--webcam", action="store_true", help="take frames from webcam 0")
    source.add_argument("--video-input", help="path to a video file")
    source.add_argument(
        "--input", nargs="+", help="image files or glob patterns, e.g. 'dir/*.jpg'"
    )
    parser.add_argument(
        "--output",
        metavar="FILE_OR_FOLDER",
        help="where to save the results: a folder (one that exists, ends with '/', has no "
        "extension, or several images) gets <folder>/<input name>; else the file itself "
        "(an image extension for images, .mp4/.avi for a video or the webcam). Without "
        "--output the results are shown in a window",
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
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (last)")
    parser.add_argument(
        "--opts", dest="more_opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
        help="the same config overrides, detectron2-demo style (last)",
    )
    return parser


def parse_args(argv=None):
    """The arguments, overrides gathered in ``args.opts``; exits with one line when the results
    would need a window this OpenCV cannot open."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.input:  # --input takes several values: the first config key ends them
        keys = [i for i, value in enumerate(args.input) if CONFIG_KEY.match(value)]
        if keys:
            args.input, args.opts = args.input[: keys[0]], args.input[keys[0]:] + args.opts
        if not args.input:
            parser.error("--input: no image given before the config overrides")
    args.opts = list(args.opts) + list(args.more_opts)
    if not args.output and not gui_available():
        parser.exit(2, f"{parser.prog}: error: {NO_GUI}\n")
    if args.output and os.path.splitext(args.output)[1] and not is_folder(args.output, args):
        ext = os.path.splitext(args.output)[1].lower()
        allowed = IMAGE_EXTENSIONS if args.input else tuple(VIDEO_CODECS)
        if ext not in allowed:
            kind = "image results" if args.input else "a video"
            parser.exit(2, f"{parser.prog}: error: --output {args.output}: {kind} must be saved as one of "
                           f"{', '.join(allowed)} (or name a folder)\n")
    return args


# -- inputs -------------------------------------------------------------------------------


def is_pattern(arg):
    """Whether ``arg`` is a glob pattern: it has glob characters and no file has that literal
    name (so ``photo[1].jpg`` is a file when it exists)."""
    return glob.has_magic(arg) and not os.path.exists(os.path.expanduser(arg))


def expand_inputs(patterns):
    """Files named by ``patterns`` (literal paths or globs), in order, without duplicates.

    Returns:
        (paths, errors): the paths found, and one message per pattern that matched nothing.
    """
    paths, errors = [], []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if is_pattern(pattern) else [pattern]
        if not matches:
            errors.append(f"no file matches {pattern}")
        paths.extend(m for m in matches if m not in paths)
    return paths, errors


def to_uint8(array, path):
    """A 16-bit or 32-bit integer or float image (PIL modes I;16, I, F) as uint8.

    Integers are 16-bit values scaled to 0-255 (65535 -> 255); floats in [0, 1] are scaled by
    255 and floats in [0, 255] kept. Anything else raises ``InputError`` naming ``path``.
    """
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"cannot read image {path}: it has non-finite (NaN or inf) pixels")
        low, high = float(array.min()), float(array.max())
        if low >= 0 and high <= 1:
            return np.round(array * 255).astype(np.uint8)
        if low >= 0 and high <= 255:
            return np.round(array).astype(np.uint8)
        raise InputError(f"cannot read image {path}: float pixels in [{low:g}, {high:g}], expected [0, 1] or [0, 255]")
    if array.min() < 0 or array.max() > 65535:
        raise InputError(f"cannot read image {path}: integer pixels outside the 16-bit range")
    return np.round(array.astype(np.float64) / 257).astype(np.uint8)


def load_image(path):
    """Read ``path`` as a BGR uint8 image; ``InputError`` naming the path if it cannot.
    Single-channel 16-bit and float images (e.g. TIFF) are converted by ``to_uint8``."""
    if not os.path.isfile(path):
        raise InputError(f"cannot read image {path}: no such file")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read image {path}: the file is empty")
    try:
        with Image.open(path) as pil:
            deep = pil.mode in ("I", "F") or pil.mode.startswith("I;16")
            if deep:
                gray = to_uint8(np.asarray(ImageOps.exif_transpose(pil)), path)
        image = np.repeat(gray[:, :, None], 3, axis=2) if deep else read_image(path, format="BGR")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise InputError(f"cannot read image {path}: decoded shape {image.shape}")
    return image


def is_folder(output, args):
    """Whether ``--output`` names a folder (module docstring): it is one, ends with a path
    separator, has no extension, or several images are given."""
    many = bool(args.input) and (len(args.input) > 1 or is_pattern(args.input[0]))
    return many or os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]


def output_path(output, folder, name):
    """The file a result goes to: ``<output>/<name>`` when ``output`` is a folder, else
    ``output``; the folder (or the file's parent) is created."""
    path = os.path.join(output, name) if folder else output
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return path


def image_result_name(input_path):
    """``<input name>``, as ``.png`` when its extension is not one OpenCV writes."""
    stem, ext = os.path.splitext(os.path.basename(input_path))
    return stem + (ext if ext.lower() in IMAGE_EXTENSIONS else ".png")


def result_names(paths):
    """The result name of each input (``image_result_name``), unique: inputs whose names
    clash keep their folders relative to the clashing inputs' common folder
    (``a/same.jpg`` and ``b/same.jpg`` -> ``a/same.jpg``, ``b/same.jpg``) and their own
    extension (``x.gif`` beside ``x.png`` -> ``x.gif.png``)."""
    names = [image_result_name(p) for p in paths]
    unique = list(names)
    for name in set(names):
        clashing = [i for i, n in enumerate(names) if n == name]
        if len(clashing) < 2:
            continue
        folders = {i: os.path.dirname(os.path.abspath(paths[i])) for i in clashing}
        common = os.path.commonpath(list(folders.values()))
        for i in clashing:
            own = os.path.basename(paths[i])
            own += "" if own.lower().endswith(IMAGE_EXTENSIONS) else ".png"
            unique[i] = os.path.normpath(os.path.join(os.path.relpath(folders[i], common), own))
    return unique


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
    """Process every image.

    Returns:
        (errors, written): the messages of skipped inputs, and what was saved (the file of a
        single image, else the folder; None when shown in a window).
    """
    paths, errors = expand_inputs(args.input)
    names = dict(zip(paths, result_names(paths)))
    folder = bool(args.output) and (len(paths) > 1 or is_folder(args.output, args))
    written = None
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
            out_filename = output_path(args.output, folder, names[path])
            vis_output.save(out_filename)
            written = out_filename if len(paths) == 1 else args.output
            if tokens is not None:
                counts = save_tokens(out_filename, canvas if canvas is not None else image, tokens)
                logger.info(f"{path}: kept tokens per stage {counts}")
        elif show(vis_output.get_image()[:, :, ::-1], 0) == 27:
            break  # esc
    if not args.output:
        cv2.destroyAllWindows()
    return errors, written


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
    """Annotate every frame of ``--video-input`` or of webcam 0 (``--webcam``, until esc in the
    window, or until the camera stops) and save them to a video (``--output``) or show them.

    Returns:
        the video file written, or None when shown in a window.
    """
    source = 0 if args.webcam else args.video_input
    video = open_video(source)
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = None if args.webcam else int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = out_filename = None
    if args.output:
        name = "webcam" if args.webcam else os.path.splitext(os.path.basename(args.video_input))[0]
        out_filename = output_path(args.output, is_folder(args.output, args), name + ".mp4")
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
    return out_filename


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="aff_seg")
    logger.info("Arguments: " + str(args))
    if args.blur and not args.input:
        logger.warning("--blur applies to image inputs only; ignored")
    if args.show_tokens and not args.input:
        logger.warning("--show-tokens applies to image inputs only; ignored")
    try:
        cfg = setup_cfg(args)
        predictor = ExportedPredictor(args.exported) if args.exported else None
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold, predictor=predictor)
        errors = []
        if args.input:
            errors, written = run_images(demo, args)
        else:
            written = run_video(demo, args)
        if written:
            print(f"results saved to {written}")
        if errors:
            logger.error(f"{len(errors)} input(s) skipped:\n  " + "\n  ".join(errors))
            return 1
    except (InputError, ConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

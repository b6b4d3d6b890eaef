"""demo/demo.py on synthetic images and a synthetic video with a tiny random model."""
import json
import logging
import math
import os
import re

import cv2
import numpy as np
import pytest

STAGES = ("res2", "res3", "res4", "res5")


@pytest.fixture
def demo_log(caplog):
    """The demo's log records (its logger does not propagate to the root logger)."""
    logger = logging.getLogger("aff_seg.demo")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
DS_RATE = 0.25  # the ADE mini config's MODEL.AFF.DS_RATE


def _write_image(path, height, width, seed):
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return image


def _expected_token_counts(height, width, min_size=64, max_size=128, divisibility=32):
    """Tokens per stage (docs/aff.md) for an image the predictor resizes to ``min_size`` on its
    shortest edge and the model pads to a multiple of ``divisibility``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    pad_h, pad_w = (math.ceil(s / divisibility) * divisibility for s in (new_h, new_w))
    counts = [(pad_h // 4) * (pad_w // 4)]
    for _ in STAGES[1:]:
        counts.append(int(counts[-1] * DS_RATE))
    # tokens whose stride-4 cell centre lies inside the resized image
    inside = math.ceil((new_h - 2) / 4) * math.ceil((new_w - 2) / 4)
    return counts, inside


@pytest.mark.slow
def test_images_glob_tokens_and_bad_file(demo, tiny_config, tmp_path, demo_log):
    config, opts = tiny_config
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"a.png": (60, 90), "b.jpg": (70, 50)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        _write_image(inputs / name, h, w, seed=i)
    (inputs / "broken.png").write_bytes(b"")  # empty
    out = tmp_path / "out"
    rc = demo.main(["--config-file", config, "--input", str(inputs / "*"), "--output", str(out),
                    "--show-tokens", "--opts", *opts])
    assert rc == 1  # one input skipped
    assert "cannot read image " + str(inputs / "broken.png") in demo_log.text
    assert not (out / "broken.png").exists()
    for name, (h, w) in sizes.items():
        stem, ext = os.path.splitext(name)
        assert cv2.imread(str(out / name)).shape[:2] == (h, w)
        counts = json.loads((out / f"{stem}_tokens.json").read_text())
        expected, inside = _expected_token_counts(h, w)
        assert [counts[s]["num_tokens"] for s in STAGES] == expected
        assert counts["res2"]["num_in_image"] == inside  # every grid token in the image
        assert all(counts[s]["num_in_image"] <= counts[s]["num_tokens"] for s in STAGES)
        for stage in STAGES:
            drawn = cv2.imread(str(out / f"{stem}_tokens_{stage}{ext}"))
            assert drawn is not None and drawn.shape[:2] == (h, w)


def test_draw_kept_tokens_brightens_only_kept_cells():
    from aff_seg.predictor import StageTokens, draw_kept_tokens

    image = np.full((16, 16, 3), 200, np.uint8)
    stage = StageTokens("res3", num_tokens=2, centers=np.array([[2.0, 2.0]]), cell=(4.0, 4.0))
    out = draw_kept_tokens(image, stage, dim=0.5)
    assert (out[8:, 8:] == 100).all()  # no token: dimmed
    assert (out[0:4, 0:4] != 100).all()  # the kept token's cell: bright (or the dot)


def test_blur_draws_on_the_same_named_image(demo, tiny_config, tmp_path):
    config, opts = tiny_config
    image = _write_image(tmp_path / "a.png", 64, 64, seed=0)
    blur = tmp_path / "blur"
    blur.mkdir()
    cv2.imwrite(str(blur / "a.png"), np.zeros_like(image))
    _write_image(tmp_path / "c.png", 64, 64, seed=1)  # no blurred copy: skipped
    out = tmp_path / "out"
    rc = demo.main(["--config-file", config, "--input", str(tmp_path / "a.png"), str(tmp_path / "c.png"),
                    "--output", str(out), "--blur", str(blur), "--opts", *opts])
    assert rc == 1
    assert not (out / "c.png").exists()
    drawn = cv2.imread(str(out / "a.png")).astype(int)
    # drawn over the flat black copy: the random image's pixel-to-pixel noise (which the
    # semantic overlay would only dim to 20 %) is absent outside the label and edges
    noise = np.median(np.abs(np.diff(image.astype(int), axis=1)))
    assert np.median(np.abs(np.diff(drawn, axis=1))) < 0.05 * noise


def _write_clip(path, num_frames):
    """A 64 x 48 mp4 of random frames; returns its path as a string."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for i in range(num_frames):
        writer.write(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return str(path)


@pytest.mark.parametrize("existing", [True, False])
def test_video(demo, tiny_config, tmp_path, existing):
    config, opts = tiny_config
    video_path = _write_clip(tmp_path / "clip.mp4", 3)
    out = tmp_path / "out"  # no trailing slash
    if existing:
        out.mkdir()
    assert demo.main(["--config-file", config, "--video-input", video_path, "--output", str(out),
                      "--opts", *opts]) == 0
    result = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = result.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)


class _FakeCamera:
    """``cv2.VideoCapture`` of a camera or file that yields ``frames`` 48 x 64 BGR frames."""

    def __init__(self, source, frames=5):
        self.source, self.left, self.released = source, frames, False

    def isOpened(self):
        return not self.released

    def read(self):
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, np.full((48, 64, 3), 40 * self.left, dtype=np.uint8)

    def get(self, prop):
        return {cv2.CAP_PROP_FRAME_WIDTH: 64, cv2.CAP_PROP_FRAME_HEIGHT: 48, cv2.CAP_PROP_FPS: 5.0,
                cv2.CAP_PROP_FRAME_COUNT: 5}.get(prop, 0)

    def release(self):
        self.released = True


@pytest.fixture
def gui_cv2(demo, monkeypatch):
    """An OpenCV with a GUI, simulated: its build information lists GTK, windows record what they
    show, ``waitKey`` returns esc on the call numbered ``escape_at`` (else no key), cameras and
    video files are ``_FakeCamera``s.  Returns the record of calls."""
    calls = {"windows": [], "shown": [], "waits": [], "destroyed": 0, "opened": [], "escape_at": None}
    build = re.sub(r"GUI:\s*NONE", "GUI: GTK3", cv2.getBuildInformation())
    monkeypatch.setattr(demo.cv2, "getBuildInformation", lambda: build)
    monkeypatch.setattr(demo.cv2, "namedWindow", lambda name, flags=0: calls["windows"].append(name))
    monkeypatch.setattr(demo.cv2, "imshow", lambda name, image: calls["shown"].append((name, image.shape)))

    def wait_key(delay):
        calls["waits"].append(delay)
        return 27 if len(calls["waits"]) == calls["escape_at"] else -1

    def destroy_all_windows():
        calls["destroyed"] += 1

    monkeypatch.setattr(demo.cv2, "waitKey", wait_key)
    monkeypatch.setattr(demo.cv2, "destroyAllWindows", destroy_all_windows)
    monkeypatch.setattr(demo.cv2, "VideoCapture", lambda source: calls["opened"].append(source) or _FakeCamera(source))
    return calls


@pytest.mark.parametrize("source", ["images", "video", "webcam"])
def test_results_shown_in_a_window_with_a_gui_opencv(demo, tiny_config, tmp_path, gui_cv2, capsys, source):
    """With a GUI-capable OpenCV (``pip install .[gui]``) and no --output, the demo's window path
    runs: each image until a key, every video frame, the webcam until esc; windows closed."""
    assert demo.gui_available()
    config, opts = tiny_config
    if source == "images":
        for i, name in enumerate(("a.png", "b.png")):
            _write_image(tmp_path / name, 48, 64, seed=i)
        args = ["--input", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
        expected_waits, expected_opened = [0, 0], []
    elif source == "video":
        args = ["--video-input", str(tmp_path / "clip.mp4")]
        expected_waits, expected_opened = [1] * 5, [str(tmp_path / "clip.mp4")]
    else:
        gui_cv2["escape_at"] = 2  # esc after the second camera frame
        args = ["--webcam"]
        expected_waits, expected_opened = [1, 1], [0]
    assert demo.main(["--config-file", config, *args, *opts]) == 0
    assert gui_cv2["opened"] == expected_opened
    assert gui_cv2["waits"] == expected_waits
    assert gui_cv2["shown"] == [(demo.WINDOW_NAME, (48, 64, 3))] * len(expected_waits)
    assert set(gui_cv2["windows"]) == {demo.WINDOW_NAME}
    assert gui_cv2["destroyed"] == 1
    assert "results saved" not in capsys.readouterr().out  # shown, nothing written


def _frames(path):
    video, count = cv2.VideoCapture(str(path)), 0
    while video.read()[0]:
        count += 1
    return count


def test_webcam_with_output_records_a_file(demo, tiny_config, tmp_path, monkeypatch, capsys):
    config, opts = tiny_config
    clip = _write_clip(tmp_path / "camera.mp4", 4)
    real_open = demo.open_video
    monkeypatch.setattr(demo, "open_video", lambda source: real_open(clip if source == 0 else source))
    monkeypatch.setattr(demo, "gui_available", lambda: False)  # recording needs no window
    out = tmp_path / "recordings"  # a new folder, no trailing slash
    assert demo.main(["--config-file", config, "--webcam", "--output", str(out), *opts]) == 0
    assert _frames(out / "webcam.mp4") == 4
    assert capsys.readouterr().out.strip().endswith(f"results saved to {out / 'webcam.mp4'}")


def test_without_gui_a_window_is_refused_at_parsing(demo, tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(demo, "gui_available", lambda: False)
    for source in (["--webcam"], ["--input", "a.png"], ["--video-input", "c.mp4"]):
        with pytest.raises(SystemExit) as exit_info:
            demo.parse_args(["--config-file", tiny_config[0], *source])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "pip install .[gui]" in err and "--output" in err


def test_this_opencv_is_headless(demo):
    """The install brings opencv-python-headless: its build lists no GUI backend."""
    assert demo.gui_available() is False


def test_overrides_positional_or_after_opts(demo, tmp_path):
    args = demo.parse_args(["--config-file", "c.yaml", "--input", "a.png", "b.png", "MODEL.WEIGHTS", "w.pth",
                            "--output", str(tmp_path), "--opts", "SOLVER.AMP.ENABLED", "True"])
    assert args.input == ["a.png", "b.png"]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "SOLVER.AMP.ENABLED", "True"]
    args = demo.parse_args(["--config-file", "c.yaml", "--output", "o.mp4", "--video-input", "v.mp4",
                            "TEST.AMP.ENABLED", "True"])
    assert args.video_input == "v.mp4" and args.opts == ["TEST.AMP.ENABLED", "True"]


@pytest.mark.parametrize(
    "output, expected",
    [
        ("res.jpg", "res.jpg"),  # a file
        ("existing", "existing/a.png"),  # an existing folder
        ("pred", "pred/a.png"),  # a new folder: no extension
        ("new/", "new/a.png"),  # a new folder: trailing slash
    ],
)
def test_one_naming_rule_for_images_and_tokens(demo, tiny_config, tmp_path, capsys, output, expected):
    config, opts = tiny_config
    (tmp_path / "existing").mkdir()
    _write_image(tmp_path / "a.png", 40, 48, seed=0)
    assert demo.main(["--config-file", config, "--input", str(tmp_path / "a.png"),
                      "--output", str(tmp_path / output), "--show-tokens", *opts]) == 0
    result = tmp_path / expected
    assert cv2.imread(str(result)).shape[:2] == (40, 48)
    stem, ext = os.path.splitext(str(result))
    assert cv2.imread(f"{stem}_tokens_res3{ext}") is not None
    assert json.loads(open(f"{stem}_tokens.json").read())["res2"]["num_tokens"] > 0
    assert capsys.readouterr().out.strip().endswith(f"results saved to {result}")


def test_wrong_extension_for_the_kind_of_result(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--config-file", "c.yaml", "--input", "a.png", "--output", str(tmp_path / "x.mp4")])
    assert ".png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video-input", "{tmp}/missing.mp4", "--output", "{tmp}/out", "--opts", "MODEL.WEIGHTS", ""],
         "cannot open video {tmp}/missing.mp4"),
        (["--input", "{tmp}/x.png", "--output", "{tmp}/out", "--opts", "MODEL.WEIGHTS", "{tmp}/nope.pkl"],
         "{tmp}/nope.pkl"),
    ],
)
def test_errors_name_the_path(demo, tiny_config, tmp_path, demo_log, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert demo.main(["--config-file", tiny_config[0], *args]) == 2
    assert message.format(tmp=tmp_path) in demo_log.text


def test_unreadable_image_is_named(demo, tmp_path):
    path = tmp_path / "text.png"
    path.write_text("not an image")
    with pytest.raises(demo.InputError, match="text.png"):
        demo.load_image(str(path))

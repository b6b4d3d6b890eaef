"""Build a wheelhouse for installing aff_seg on a machine without internet (e.g. a GPU node).

    python tools/build_wheelhouse.py --python-version 3.12 --out wheelhouse/
    # on the offline machine, with torch/torchvision/triton already there:
    python -m pip install --no-index --no-deps wheelhouse/*.whl

It holds every pinned dependency of requirements/constraints.txt for the target Python except
torch, torchvision, triton and the CUDA runtime wheels (which such machines provide), plus a
detectron2 wheel built from the pb1-detectron2 sdist (patched as tools/install.sh does), the
panopticapi-lite wheel, and aff_seg itself.  Packages the target already has can be left out
with ``--exclude`` or ``--preset gpu-node`` (the lent GPU machines' image: numpy, scipy,
opencv-python-headless ... are preinstalled there, and with them the wheelhouse would not fit
in 64 MiB).  Pure-Python packages published only as sdists are built into wheels here.  The
wheelhouse must not exceed ``--max-mib`` (64 MiB by default: what travels to a GPU node).
"""
import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
# Never in the wheelhouse: what GPU machines provide, and the PyPI ``typing`` backport (a
# dependency marker leftover; placed first on sys.path it breaks the stdlib's typing).
PROVIDED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|typing)$")
# Preinstalled on the lent GPU machines (device tool, KINDS.md: "Python packages already there").
PRESETS = {
    "gpu-node": [
        "numpy", "scipy", "opencv-python-headless", "matplotlib", "pillow", "contourpy",
        "fonttools", "kiwisolver", "tensorboard", "tensorboard-data-server", "grpcio", "protobuf",
        "markdown", "werkzeug", "tqdm", "pyyaml", "packaging", "requests", "urllib3", "idna",
        "certifi", "charset-normalizer", "cloudpickle", "tabulate", "pyparsing", "python-dateutil",
        "six", "cycler", "setuptools", "absl-py", "typing-extensions", "portalocker", "pytest",
        "iniconfig", "pluggy", "pygments", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
        "filelock", "fsspec", "click", "ninja", "wheel", "pip", "zipp", "colorama",
    ],
}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(exclude):
    """``name==version`` lines of the constraints file, minus what the target provides."""
    reqs = []
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = canonical(re.split(r"[=<>!~ ]", line, maxsplit=1)[0])
        if PROVIDED.match(name) or name in exclude:
            continue
        reqs.append(line)
    return reqs


def pip(*args, quiet=False):
    out = subprocess.PIPE if quiet else None
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, stdout=out, stderr=out)


def download(req, out, python_version):
    """A binary wheel for the target Python, else a wheel built here from the sdist."""
    target = ["--python-version", python_version, "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--platform", "any"]
    try:
        pip("download", "-q", "--no-deps", "--only-binary", ":all:", *target, "-d", str(out), req,
            quiet=True)
    except subprocess.CalledProcessError:
        print(f"[wheelhouse] no wheel for {req}: building one from its sdist (pure Python)")
        pip("wheel", "-q", "--no-deps", "--no-binary", ":all:", "-w", str(out), req)


def build_detectron2(out, work):
    src = work / "d2"
    pip("download", "-q", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
        "-d", str(src), "pb1-detectron2==0.6")
    with tarfile.open(next(src.glob("*.tar.gz"))) as tar:
        tar.extractall(src, filter="data")
    d2dir = next(p for p in src.iterdir() if p.is_dir())
    subprocess.run([sys.executable, str(ROOT / "tools" / "patch_detectron2_setup.py"),
                    str(d2dir / "setup.py")], check=True)
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(d2dir))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="%d.%d" % sys.version_info[:2],
                        help="target Python, e.g. 3.12 (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="leave out what this target has")
    parser.add_argument("--exclude", default="", help="comma-separated packages the target has")
    parser.add_argument("--max-mib", type=float, default=64.0)
    args = parser.parse_args(argv)

    exclude = {canonical(n) for n in args.exclude.split(",") if n.strip()}
    exclude |= {canonical(n) for n in PRESETS.get(args.preset, [])}
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for req in pinned_requirements(exclude):
            download(req, args.out, args.python_version)
        build_detectron2(args.out, work)
        pip("download", "-q", "--no-deps", "-d", str(args.out), "panopticapi-lite==0.2.0")
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(args.out), str(ROOT))

    wheels = sorted(args.out.glob("*.whl"))
    stray = [p.name for p in args.out.iterdir() if p.suffix != ".whl"]
    if stray:
        sys.exit(f"[wheelhouse] not wheels (would need a build on the target): {stray}")
    size = sum(p.stat().st_size for p in wheels) / 2**20
    print(f"[wheelhouse] {len(wheels)} wheels, {size:.1f} MiB in {args.out}")
    if size > args.max_mib:
        biggest = sorted(wheels, key=lambda p: -p.stat().st_size)[:5]
        sys.exit(f"[wheelhouse] {size:.1f} MiB exceeds --max-mib {args.max_mib}; largest: "
                 + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
                 + ". Leave out what the target has with --exclude/--preset.")
    print(f"[wheelhouse] install offline with: python -m pip install --no-index --no-deps {args.out}/*.whl")


if __name__ == "__main__":
    main()

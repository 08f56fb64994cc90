"""`make gpu-wheels`: the wheels `make gpu-check` needs on a GPU machine with no package index.

    python benchmarks/gpu_wheels.py [--dest .whl] [--python 3.12]

The lent GPU machines (an image with torch, triton, numpy, sentencepiece, ...; Python 3.12;
no network) lack some of our dependencies. This resolves what the GPU check imports (the
training job, DeepSpeed, MLflow's client and local store, the kernel competitor
`mlstm_kernels`) for that Python, leaves out every package the image already has (the
list below, read off the image on 2026-11-17), and downloads the rest as wheels into
`--dest` (DeepSpeed is an sdist: it is built here into a pure-Python wheel). On the
machine, `make gpu-check` installs them with `pip --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the GPU check runs on top of the image: the runtime dependencies of pyproject.toml
# that the image lacks, and the benchmark competitor.
NEEDS = ["deepspeed>=0.16,<0.20", "webdataset>=0.2.100", "mlflow-skinny>=2.16", "sqlalchemy",
         "alembic", "zstandard>=0.22", "mlstm_kernels==2.0.6"]

# Packages of the GPU image ('cuda'), as listed in the device tool's KINDS.md (2026-11-17).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pyre-extensions pygments
pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def norm(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_has(name: str) -> bool:
    """On the image: the name itself, or its CUDA-suffixed twin (nvidia-*-cu12 is the image's
    nvidia-*-cu13 or unsuffixed build)."""
    have = {norm(n) for n in IMAGE.split()}
    n = norm(name)
    return n in have or re.sub(r"-cu1\d$", "", n) in {re.sub(r"-cu1\d$", "", h) for h in have}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument("--python", default="3.12", help="the GPU image's Python (major.minor)")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    tag = "cp" + args.python.replace(".", "")
    target = ["--python-version", args.python, "--implementation", "cp", "--abi", tag,
              *[x for p in PLATFORMS for x in ("--platform", p)], "--only-binary=:all:"]
    with tempfile.TemporaryDirectory() as tmp:
        # DeepSpeed ships only an sdist; without its ops it builds into a py3-none-any wheel.
        pip("wheel", "--quiet", "--no-deps", "-w", str(dest), NEEDS[0])
        ds_wheel = sorted(dest.glob("deepspeed-*.whl"))[-1]
        report = Path(tmp) / "report.json"
        pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
            "--target", str(Path(tmp) / "t"), *target, str(ds_wheel), *NEEDS[1:])
        plan = json.loads(report.read_text())["install"]
    missing = [f"{p['metadata']['name']}=={p['metadata']['version']}" for p in plan
               if not image_has(p["metadata"]["name"]) and norm(p["metadata"]["name"]) != "deepspeed"]
    print(f"gpu-wheels: {len(plan)} packages resolved, {len(missing)} missing on the image: "
          f"{' '.join(missing)}")
    pip("download", "--quiet", "--no-deps", "-d", str(dest), *target, *missing)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"gpu-wheels: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest} "
          "(the device tool carries at most 64 MiB with the working tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

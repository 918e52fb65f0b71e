"""Builds the native core dckpt._native (C++17, pybind11).

libzstd is linked dynamically: Debian's libzstd.a is not position-independent and
cannot go into a shared object. xxHash is used header-only (XXH_INLINE_ALL).
"""
import os
import re

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

SOURCES = sorted(
    os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")
)
# Headers and included bodies: a change to any of them rebuilds the core.
DEPENDS = sorted(
    os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".h", ".inc"))
)

# The version is written once, in dckpt/__init__.py (pyproject.toml reads it there too).
with open(os.path.join("dckpt", "__init__.py")) as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

extra_compile = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra"]
extra_link = []
if os.environ.get("DCKPT_ASAN"):
    # Instrumented build for the hostile-input tests (see `make asan`).
    extra_compile = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link = ["-fsanitize=address,undefined"]

native = Pybind11Extension(
    "dckpt._native",
    SOURCES,
    depends=DEPENDS,
    cxx_std=17,
    define_macros=[("XXH_INLINE_ALL", "1"), ("DCKPT_VERSION", f'"{VERSION}"')],
    libraries=["zstd", "pthread"],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

setup(ext_modules=[native])

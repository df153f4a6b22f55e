"""The Inductor settings the CUDA fast path sets (peftctl/kernels/__init__.py): C++ kernel launchers only
where the C++ compiler Inductor would call exists, so a machine without one keeps Python launchers
instead of failing at the first compiled step."""

from __future__ import annotations

import shutil

import torch._inductor.config as inductor_config

from peftctl.kernels import launch_kernels_from_cpp


def test_cpp_launchers_are_switched_on_where_the_compiler_exists() -> None:
    # any executable stands in for the compiler: only its presence is checked; patch() restores the settings
    with inductor_config.patch({"cpp_wrapper": False, "cpp.cxx": (None, shutil.which("sh"))}):
        assert launch_kernels_from_cpp() is True
        assert inductor_config.cpp_wrapper is True


def test_no_cpp_compiler_keeps_python_launchers() -> None:
    with inductor_config.patch({"cpp_wrapper": False, "cpp.cxx": (None, "no-such-compiler-peftctl")}):
        assert launch_kernels_from_cpp() is False
        assert inductor_config.cpp_wrapper is False

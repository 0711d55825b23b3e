"""The compiler wrapper that adapts Horovod 0.28.1's build to torch 2.13 and TF 2.21 (launch/setup.sh)."""
import os
import subprocess
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parents[2] / "launch" / "toolchain" / "horovod-cxx"


@pytest.fixture
def run_wrapper(tmp_path):
    # A stand-in compiler that prints each argument on its own line: the test sees the exact argv
    fake = tmp_path / "fake-cxx"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)

    def run(*args, keep_debug=False):
        env = {k: v for k, v in os.environ.items() if k != "RANGER_HVD_KEEP_DEBUG"}
        env["RANGER_HVD_REAL_CXX"] = str(fake)
        if keep_debug:
            env["RANGER_HVD_KEEP_DEBUG"] = "1"
        out = subprocess.run([str(WRAPPER), *args], capture_output=True, text=True, env=env, check=True)
        return out.stdout.splitlines()

    return run


def test_every_translation_unit_becomes_cxx17(run_wrapper):
    for std in ("-std=c++11", "-std=c++14", "-std=gnu++11", "-std=gnu++14"):
        assert run_wrapper(std, "-c", "a.cc") == ["-std=c++17", "-c", "a.cc"]
    assert run_wrapper("-std=c++20", "-c", "a.cc") == ["-std=c++20", "-c", "a.cc"]  # newer: untouched


def test_xla_unit_is_emptied_and_only_it(run_wrapper):
    xla = ["-DTENSORFLOW_VERSION=2021000000", "-c", "/src/horovod/tensorflow/xla_mpi_ops.cc"]
    assert run_wrapper(*xla)[0] == "-DTENSORFLOW_VERSION=0"
    other = ["-DTENSORFLOW_VERSION=2021000000", "-c", "/src/horovod/tensorflow/mpi_ops.cc"]
    assert run_wrapper(*other)[0] == "-DTENSORFLOW_VERSION=2021000000"


def test_debug_info_dropped_unless_asked(run_wrapper):
    assert run_wrapper("-O3", "-g", "-c", "a.cc") == ["-O3", "-c", "a.cc"]
    assert run_wrapper("-g", "-c", "a.cc", keep_debug=True) == ["-g", "-c", "a.cc"]


def test_arguments_with_spaces_survive(run_wrapper):
    assert run_wrapper("-DNAME=a b", "-c", "x.cc") == ["-DNAME=a b", "-c", "x.cc"]

"""`ranger-hvd doctor` on the real environment, and its verdict when a required part is missing."""
import json
import subprocess
import sys
from pathlib import Path

from ranger_hvd import doctor

RANGER_HVD = str(Path(sys.executable).with_name("ranger-hvd"))


def test_doctor_passes_on_the_built_environment():
    out = subprocess.run([RANGER_HVD, "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    for name in ("Horovod built with PyTorch", "Horovod built with TensorFlow",
                 "Horovod built with Gloo", "Horovod built with MPI"):
        assert checks[name]["ok"] and checks[name]["value"] == "yes", name
    assert checks["Horovod"]["value"] == "0.28.1"
    assert checks["PyTorch"]["value"].startswith("2.13.0")
    assert checks["TensorFlow"]["value"].startswith("2.21")


def test_doctor_fails_when_horovod_is_missing(monkeypatch, capsys):
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda m: None if m == "horovod" else real_version(m))
    assert doctor.main([]) == 1
    assert "Horovod" in capsys.readouterr().err


def test_doctor_fails_when_a_framework_is_not_built_in(monkeypatch):
    monkeypatch.setattr(doctor, "horovod_build",
                        lambda: {"TensorFlow": True, "PyTorch": False, "MPI": True, "Gloo": True})
    checks = {c.name: c for c in doctor.collect()}
    assert not checks["Horovod built with PyTorch"].ok and checks["Horovod built with PyTorch"].required
    assert doctor.main([]) == 1

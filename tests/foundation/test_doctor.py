"""`ranger-hvd doctor` on the real environment, and its verdict when a required part is missing,
broken or crashes on import."""
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
    assert checks["Horovod"]["value"] == checks["horovodrun"]["value"] == "0.28.1"
    assert checks["PyTorch"]["value"].startswith("2.13.0")
    assert checks["TensorFlow"]["value"].startswith("2.21")


def _fake_frameworks(monkeypatch, tmp_path, sources: dict[str, str]) -> None:
    """Modules in ``tmp_path`` standing for the frameworks and their Horovod extensions."""
    for module, source in sources.items():
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(doctor, "FRAMEWORKS", {"PyTorch": ("fake_torch", "fake_hvd_torch"),
                                               "TensorFlow": ("fake_tf", "fake_hvd_tf")})


def test_unbuilt_broken_and_crashing_frameworks_are_named(monkeypatch, tmp_path):
    """PyTorch imports but Horovod's extension for it does not: required, failed, the error shown.
    A TensorFlow that raises on import, and one that kills its process: reported broken, not
    installed-and-fine, and the doctor exits 1."""
    _fake_frameworks(monkeypatch, tmp_path, {
        "fake_torch": "__version__ = '9.9'\n",
        "fake_hvd_torch": "raise ImportError('Extension horovod.torch has not been built')\n",
        "fake_tf": "raise RuntimeError('bad ABI')\n"})
    found = doctor.probe_frameworks()
    assert found["PyTorch"] == {"version": "9.9",
                                "error": "ImportError: Extension horovod.torch has not been built"}
    assert found["TensorFlow"] == {"broken": "RuntimeError: bad ABI"}
    checks = {c.name: c for c in doctor.collect()}
    built = checks["Horovod built with PyTorch"]
    assert not built.ok and built.required and "has not been built" in built.value
    assert checks["TensorFlow"].value == "RuntimeError: bad ABI"
    assert doctor.main([]) == 1

    (tmp_path / "fake_tf.py").write_text("import os\nos.abort()\n")
    assert doctor.probe_frameworks()["TensorFlow"]["broken"].startswith("a process importing it exited with -")


def test_built_controllers_come_from_any_framework(monkeypatch, tmp_path):
    _fake_frameworks(monkeypatch, tmp_path, {
        "fake_torch": "__version__ = '1'\n",
        "fake_hvd_torch": "mpi_built = lambda: False\ngloo_built = lambda: True\n",
        "fake_tf": "__version__ = '2'\n",
        "fake_hvd_tf": "mpi_built = lambda: True\ngloo_built = lambda: False\n"})
    assert doctor.horovod_build() == {"PyTorch": True, "TensorFlow": True, "MPI": True, "Gloo": True}


def test_doctor_fails_when_horovod_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "horovod_version", lambda: None)
    monkeypatch.setattr(doctor, "probe_frameworks", lambda: {"PyTorch": {}, "TensorFlow": {}})
    assert doctor.main([]) == 1
    err = capsys.readouterr().err
    assert "Horovod" in err and "at least one framework" in err


def test_without_horovod_the_extension_rows_say_so_once(monkeypatch):
    """PyTorch installed, Horovod not: the extension row names the missing Horovod, not the import
    error of horovod.torch that follows from it."""
    monkeypatch.setattr(doctor, "horovod_version", lambda: None)
    monkeypatch.setattr(doctor, "probe_frameworks", lambda: {
        "PyTorch": {"version": "2.0", "error": "ModuleNotFoundError: No module named 'horovod'"},
        "TensorFlow": {}})
    checks = {c.name: c for c in doctor.collect()}
    row = checks["Horovod built with PyTorch"]
    assert row.value == "no: Horovod is not installed" and not row.ok and row.required
    assert not checks["Horovod"].ok

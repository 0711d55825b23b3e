"""The package's layering, checked on the source: the launcher and the reference jobs never import each
other (both import downward: ranger_hvd.config, ranger_hvd.rundir), and the run directory's file names
are spelled in one module, ranger_hvd/rundir/layout.py."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ranger_hvd"
RUN_DIR_NAMES = {"config.yaml", "summary.json", "metrics.jsonl", "command.txt", "horovodrun.log",
                 "checkpoints", "tensorboard", "timeline.json", "autotune.csv", "job.sbatch", "slurm.json"}


def modules(sub: str):
    return sorted((PACKAGE / sub).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("sub,forbidden", [("jobs", "ranger_hvd.launcher"), ("launcher", "ranger_hvd.jobs"),
                                           ("config", "ranger_hvd.launcher"), ("config", "ranger_hvd.jobs"),
                                           ("rundir", "ranger_hvd.launcher"), ("rundir", "ranger_hvd.jobs")])
def test_no_import_across_the_layers(sub, forbidden):
    bad = {str(p.relative_to(PACKAGE)): sorted(m for m in imported(p) if m == forbidden or m.startswith(forbidden + "."))
           for p in modules(sub)}
    assert not {k: v for k, v in bad.items() if v}


def _code_strings(path: Path) -> set[str]:
    """String constants of the code; docstrings and record field names (dict keys, subscripts such as
    ``summary["tensorboard"]``) left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    skip |= {id(k) for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None}
    skip |= {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip}


def test_run_directory_names_are_spelled_in_layout_only():
    layout = PACKAGE / "rundir" / "layout.py"
    assert RUN_DIR_NAMES <= _code_strings(layout)
    spelled = {str(p.relative_to(PACKAGE)): sorted(RUN_DIR_NAMES & _code_strings(p))
               for p in sorted(PACKAGE.rglob("*.py")) if p != layout}
    assert not {k: v for k, v in spelled.items() if v}


def test_the_checker_sees_a_violation(tmp_path):
    """The two checks above can fail: a module importing across and spelling a name is caught."""
    p = tmp_path / "ranger_hvd" / "jobs" / "x.py"
    p.parent.mkdir(parents=True)
    p.write_text('"""doc: metrics.jsonl"""\nfrom ranger_hvd.launcher.run import command\nNAME = "metrics.jsonl"\n'
                 'FIELDS = {"tensorboard": 1}\n')
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ranger_hvd"
    try:
        assert "ranger_hvd.launcher.run.command" in imported(p)
        assert _code_strings(p) == {"metrics.jsonl"}      # the docstring's mention does not count
    finally:
        PACKAGE = saved

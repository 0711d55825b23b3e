"""The one rule for values on their way to a shell: each is quoted for the shell that reads it, here, or
refused when the config is validated (``config/safety.py``: control characters, names by their grammar,
plain paths).  No config value is ever run as a command; ``cluster.slurm.setup`` is the one key whose
lines are shell, and the sbatch script holding them must pass ``bash -n``.

Where a value meets a shell, and what this module does about it:

* horovodrun 0.28.1 builds ``/bin/sh -c`` lines from some of its arguments without quoting them:
  ``--host-discovery-script`` (run as a command), ``--mpi-args`` (pasted into the mpirun line),
  ``--output-filename`` under ``--mpi`` (pasted into the mpirun line; under Gloo it is only a path),
  ``-i`` (pasted into ssh lines, and under MPI inside ``"..."`` that Open MPI splits at spaces: no
  quoting serves both, so the path must be plain, see ``safety.PLAIN_PATH``), host names and interface
  names (grammars with no shell character), the names of exported variables (``NAME`` grammar; their
  values horovodrun quotes itself).  :func:`for_horovodrun` quotes the first three.  The job's own
  command line (a user's ``job.command`` included) horovodrun quotes itself, item by item, so it is
  passed as it is: quoting it here too would hand the program the quotes;
* the sbatch script: ``#SBATCH`` lines are split into words by sbatch itself (quotes and backslashes
  group, ``#`` starts a comment, but not as in a shell: a backslash escapes inside quotes too, and old
  Slurm versions know only double quotes) and its file names expand ``%`` patterns:
  :func:`sbatch_word` and :func:`sbatch_path`; the script's own commands are joined with
  :func:`shlex.join`;
* the elastic discovery script and the preflight's remote command: :func:`shlex.quote` and
  :func:`shlex.join`.
"""

from __future__ import annotations

import re
import shlex

# horovodrun's flags whose value it pastes unquoted into a shell line (see above)
PASTED_ALWAYS = ("--host-discovery-script", "--mpi-args")
PASTED_UNDER_MPI = ("--output-filename",)


def pasted_flags(controller: str) -> tuple[str, ...]:
    return PASTED_ALWAYS + (PASTED_UNDER_MPI if controller == "mpi" else ())


def for_horovodrun(value: str) -> str:
    """A value that horovodrun pastes into ``sh -c``: the shell gives the program ``value`` unchanged."""
    return shlex.quote(value)


def mpi_args_value(args: list[str]) -> str:
    """``--mpi-args``'s value: each argument quoted, so mpirun receives exactly these arguments."""
    return " ".join(shlex.quote(a) for a in args)


def sbatch_word(text: str) -> str:
    """``text`` as one word of an ``#SBATCH`` line: each character that sbatch's word splitting treats
    specially (white space, quotes, backslash, '#') escaped with a backslash, which every Slurm version
    reads as "this character itself"."""
    return re.sub(r"([\s'\"\\#])", r"\\\1", text)


def sbatch_path(directory: str, pattern: str = "") -> str:
    """A file name on an ``#SBATCH`` line: ``directory`` with '%' doubled (sbatch expands ``%j`` and its
    other patterns in file names), then ``pattern`` (e.g. ``slurm-%j.out``) kept as a pattern."""
    path = directory.replace("%", "%%") + (("/" + pattern) if pattern else "")
    return sbatch_word(path)

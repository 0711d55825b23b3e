"""What odd or hostile input cannot get past, checked once for every config (the launcher's and the
run directory's ``config.yaml`` the jobs read):

* files are regular files (not ``/dev/zero``, not a pipe), read with a size limit, and UTF-8 text;
* no string holds a control character (newline, carriage return, NUL, tab, the other C0 and C1 codes,
  Unicode's line and paragraph separators), except ``cluster.slurm.setup``, the one key whose lines
  are shell (it may span lines, and the sbatch script must still pass ``bash -n``);
* strings and lists have a length limit, and integers fit in 64 bits (what the jobs hand to NumPy,
  PyTorch and Horovod);
* paths that horovodrun pastes unquoted into more than one kind of command line (the ssh identity file
  and known_hosts file) are plain: letters, digits and ``_ . / + @ , : = -`` only.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from ranger_hvd.config.problems import ConfigError, Problem, short_repr

MAX_CONFIG_BYTES = 1 << 20         # a config file or a hostfile
MAX_STRING = 4096                  # PATH_MAX; any single string value
MAX_SHELL_TEXT = 65536             # one entry of cluster.slurm.setup
MAX_LIST = 4096                    # items of any list (hosts, env entries, sbatch lines, ...)
MAX_NAME_BYTES = 255               # one component of a path (NAME_MAX)
INT_LIMIT = 1 << 63                # every integer: |x| < 2**63
SHELL_KEYS = ("cluster.slurm.setup",)   # the only keys whose values are shell text
# horovodrun writes -i FILE unquoted into sh -c lines and, under MPI, inside "..." that Open MPI splits
# at spaces; ssh expands % in both: only plain characters survive all of them unchanged
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+@,:=-]+")


def is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029"


def control_chars(text: str, allowed: str = "") -> list[str]:
    """The control characters in ``text`` (not in ``allowed``), as escapes such as '\\n'."""
    found = []
    for ch in text:
        if is_control(ch) and ch not in allowed:
            esc = repr(ch)[1:-1]
            if esc not in found:
                found.append(esc)
    return found


def read_bounded(path: Path, what: str, limit: int = MAX_CONFIG_BYTES, display: str | None = None) -> str:
    """The text of a small regular file (a config, a hostfile): at most ``limit`` bytes of UTF-8 (a device
    such as /dev/zero, or a pipe that may never end or never be written, is refused).  Raises OSError (as
    open() does) or ValueError with a message that names the file."""
    name = display or str(path)
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {name} is not a regular file (a device, pipe or socket)")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {name} is larger than {limit // 1024} KiB (is it the right file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{what} {name} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


def read_text_problem(path: Path, what: str, display: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it cannot be read), for files read during validation."""
    try:
        return read_bounded(path, what, display=display), None
    except FileNotFoundError:
        return None, f"{what} not found: {display}"
    except IsADirectoryError:
        return None, f"{what} {display} is a directory"
    except OSError as exc:
        return None, f"cannot read {what} {display}: {exc.strerror or exc}"
    except ValueError as exc:
        return None, str(exc)


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, bool]]:
    """(dotted path, value, is it a key) of every node below ``node`` (lists cut after MAX_LIST + 1)."""
    yield path, node, False
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str):
                yield path or "(config)", k, True
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:MAX_LIST + 1]):
            yield from _walk(v, f"{path}[{i}]")


def _value_problem(path: str, value: Any, is_key: bool) -> str | None:
    if isinstance(value, str):
        shell = not is_key and re.sub(r"\[\d+\]", "", path) in SHELL_KEYS
        limit = MAX_SHELL_TEXT if shell else MAX_STRING
        what = "a key" if is_key else "the value"
        if len(value) > limit:
            return f"{what} is {len(value)} characters long, more than the {limit} allowed: {short_repr(value)}"
        bad = control_chars(value, allowed="\n\t" if shell else "")
        if bad:
            return (f"{what} holds control characters ({', '.join(bad)}), which only "
                    f"{', '.join(SHELL_KEYS)} may hold (as lines of shell): {short_repr(value)}")
    elif isinstance(value, list) and len(value) > MAX_LIST:
        return f"more than {MAX_LIST} entries"
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
        return f"{short_repr(value)} is out of range (integers must be within ±2**63)"
    return None


def raw_value_problems(data: dict, where) -> list[Problem]:
    """Control characters, over-long strings and lists, and out-of-range integers anywhere in the raw
    config, found before the schema runs, so that no later check or message meets them."""
    problems: list[Problem] = []
    for path, value, is_key in _walk(data, ""):
        why = _value_problem(path, value, is_key)
        if why is not None:
            problems.append(Problem(path or "(config)", why, where(path)))
            if len(problems) >= 100:
                break
    return problems


def check_raw(data: dict, where) -> None:
    problems = raw_value_problems(data, where)
    if problems:
        raise ConfigError(problems)


def plain_path_problem(path: str) -> str | None:
    """Why an absolute path cannot travel through horovodrun's and mpirun's ssh command lines (None: it can)."""
    if PLAIN_PATH.fullmatch(path):
        return None
    odd = sorted({c for c in path if not PLAIN_PATH.fullmatch(c)})
    return (f"{short_repr(path)} holds {' '.join(repr(c) for c in odd[:8])}: horovodrun pastes this path "
            f"unquoted into its ssh and mpirun command lines, so it may hold only letters, digits and "
            f"_ . / + @ , : = - (rename or link the file)")


def name_too_long(path: Path) -> str | None:
    """The first component of ``path`` longer than NAME_MAX bytes, or None."""
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            return part
    return None

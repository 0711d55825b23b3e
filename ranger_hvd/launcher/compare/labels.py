"""Short names for runs being compared: the config keys that differ between them.

The compression part reads like the user thinks of it ("none m=0.9", "fp16 m=0.9", "ranger d=0.01
m=0.9@optimizer"): the type, then the options of that type that differ between runs of that type; when the
types differ, the headline options (density, momentum) are shown too.  Momentum is one quantity wherever it
is applied, so the label says where: ``@optimizer`` (SGD momentum after the exchange, ``train.momentum``),
``@DGC`` (in the compressor, with DGC's momentum factor masking) or ``@compressor`` (in the compressor,
unmasked); dense and fp16 runs can only apply it after the exchange, so theirs is a bare ``m=``.  Any other
differing key follows as ``name=value`` (the last part of its dotted path, or the whole path where two
differing keys share a last part).
"""

from __future__ import annotations

from typing import Any, Optional

from ranger_hvd.config import COMPRESSION

ABBREVIATIONS = {"density": "d", "momentum": "m"}   # compression options shown in every label of their type
IGNORED = ("output.dir", "job.entry")              # where a run is written says nothing about what it does
MOMENTUM_KEYS = ("momentum", "momentum_masking")   # folded into one "momentum" entry that says where


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (hashable, comparable)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: tuple(d) if isinstance(d, list) else d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def fmt_label_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return ",".join(fmt_label_value(x) for x in v)
    return str(v)


def momentum_text(config: dict, ctype: str, comp: dict) -> Optional[str]:
    """The run's momentum and where it is applied ('0.9@DGC', '0.9@compressor', '0.9@optimizer', '0.9' for a
    dense or fp16 run, '0' for none); None when the config does not say (a user command's optimizer)."""
    inside = comp.get("momentum") if ctype == "ranger" else None
    if isinstance(inside, (int, float)) and inside > 0:
        return f"{fmt_label_value(inside)}@" + ("DGC" if comp.get("momentum_masking", True) else "compressor")
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    outside = train.get("momentum")
    if not isinstance(outside, (int, float)):
        return None
    if outside == 0 or ctype != "ranger":
        return fmt_label_value(outside)
    return f"{fmt_label_value(outside)}@optimizer"


def compression_of(config: dict, fallback: Optional[str] = None) -> tuple[str, dict[str, Any]]:
    """(type, {option: value}) of a run's config: only the options of its own type count, whatever
    other keys (other types' options, nulls) the section holds; the momentum options become one
    ``momentum`` entry saying where it is applied (:func:`momentum_text`), for every type."""
    comp = config.get("compression") if isinstance(config.get("compression"), dict) else {}
    ctype = str(comp.get("type") or fallback or "?")
    own = COMPRESSION.options(ctype) if ctype in COMPRESSION.members else []
    momentum = momentum_text(config, ctype, comp)
    opts: dict[str, Any] = {}
    for k in [*own, "momentum"]:        # in the type's order; a dense type's momentum comes last
        if k == "momentum" and momentum is not None:
            opts.setdefault("momentum", momentum)
        elif k in comp and k not in MOMENTUM_KEYS:
            opts[k] = comp[k]
    return ctype, opts


def _option_text(name: str, value: Any) -> str:
    return f"{ABBREVIATIONS.get(name, name)}={fmt_label_value(value)}"


def compression_labels(comps: list[tuple[str, dict]]) -> list[str]:
    """The compression part of each label ('' for all when every run compresses the same way)."""
    if len({(t, repr(sorted(o.items(), key=str))) for t, o in comps}) <= 1:
        return [""] * len(comps)
    types_differ = len({t for t, _ in comps}) > 1
    out = []
    for ctype, opts in comps:
        peers = [o for t, o in comps if t == ctype]
        differing = [k for k in opts if len({repr(p.get(k)) for p in peers}) > 1]
        shown = [k for k in opts if k in differing or (types_differ and k in ABBREVIATIONS)]
        out.append(" ".join([ctype, *(_option_text(k, opts[k]) for k in shown)]))
    return out


def other_labels(flats: list[dict[str, Any]]) -> list[str]:
    """The ``name=value`` part of each label, from the differing keys outside ``compression``."""
    keys = sorted(set().union(*flats)) if flats else []
    differing = [k for k in keys if k not in IGNORED and not k.startswith(f"{COMPRESSION.section}.")
                 and k != "train.momentum" and len({repr(f.get(k)) for f in flats}) > 1]
    last = [k.rsplit(".", 1)[-1] for k in differing]
    names = [k if last.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1] for k in differing]
    return [" ".join(f"{n}={fmt_label_value(f.get(k))}" for n, k in zip(names, differing) if k in f)
            for f in flats]


def run_labels(configs: list[dict], names: list[str], fallbacks: Optional[list[Optional[str]]] = None) -> list[str]:
    """One label per run from its resolved config; ``names`` (e.g. 'job/timestamp') label runs whose
    configs are identical, and tell apart runs that would otherwise share a label."""
    fallbacks = fallbacks or [None] * len(configs)
    comps = [compression_of(c, f) for c, f in zip(configs, fallbacks)]
    parts = zip(compression_labels(comps), other_labels([flatten(c) for c in configs]))
    labels = [" ".join(p for p in pair if p) for pair in parts]
    if len(configs) == 1 or not any(labels):
        return list(names)
    counts = {lab: labels.count(lab) for lab in labels}
    return [name if not lab else f"{lab} ({name})" if counts[lab] > 1 else lab for lab, name in zip(labels, names)]

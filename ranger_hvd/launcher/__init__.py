"""The ranger-hvd launcher: YAML experiment configs -> horovodrun, supervised, with a run directory.

Modules: ``config`` (a package: schema, config groups, YAML, overrides, checks, sources, ``show``),
``command`` (config -> horovodrun argv and environment, a pure function), ``rundir`` (where runs and
reports go, the files written there), ``launch`` (one run), ``supervisor`` (start, watch, stop),
``processes`` (the process tree and stopping it), ``progress`` (live view of metrics.jsonl),
``ranklogs`` (rank logs and failure reports), ``summary`` (summary.json and the closing message),
``formatting``, ``labels`` (naming runs by what differs), ``report`` (tables and plots), ``sweep``
and ``cli`` (the ``ranger-hvd`` command).
"""

"""The ranger-hvd launcher: YAML experiment configs -> horovodrun, supervised, with a run directory.

Modules: ``config`` (strict schema, overrides, sources), ``command`` (config -> horovodrun argv and
environment, a pure function), ``rundir``, ``supervisor`` (start, progress, signals, failures),
``report`` (tables and plots), ``sweep`` and ``cli`` (the ``ranger-hvd`` command).
"""

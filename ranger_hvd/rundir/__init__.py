"""The run directory contract, shared by the launcher, the reference jobs and :mod:`ranger_hvd.run`:
``layout`` (file names, environment, events), ``metrics`` (the ``metrics.jsonl`` writer), ``records``
(reading what a run directory holds, damaged or not) and ``checkpoint`` (save-point naming, which set is
complete, and trimming records on resume).  It imports nothing from the launcher or the jobs."""

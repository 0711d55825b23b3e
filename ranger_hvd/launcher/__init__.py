"""The ranger-hvd launcher: YAML experiment configs -> horovodrun (or Slurm), supervised, with a run directory.

Sub-packages: ``run`` (one run: command, preflight, supervision, restarts, elastic, logs, summary),
``slurm`` (batch script, submission, status, the allocation side) and ``compare`` (labels, report, sweep);
``cli`` is the ``ranger-hvd`` command and ``quoting`` the shell quoting for horovodrun's ``sh -c`` lines.
Below it, shared with the reference jobs: :mod:`ranger_hvd.config` (the schema and its checks) and
:mod:`ranger_hvd.rundir` (the run directory's files and records).
"""

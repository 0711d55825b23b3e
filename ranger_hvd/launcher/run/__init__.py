"""One run of a config, from argv to summary: ``command`` (config -> horovodrun argv and environment, a pure
function), ``preflight`` (checks before anything starts), ``rundir`` (creating the run directory and the
files the launcher writes there), ``launch`` (one run, restarts included), ``supervisor`` (start, watch,
stop), ``processes`` (the process tree and stopping it), ``stall`` (stall limits, and reading job errors and
ssh failures out of the logs), ``restart`` (when and from which checkpoint), ``elastic`` (horovodrun's
elastic mode), ``ranklogs`` (per-rank logs), ``progress`` (the live line), ``summary`` (``summary.json`` and
the closing message), ``tensorboard`` (event files from the metrics records)."""

"""Comparing runs: ``labels`` (naming runs by what differs), ``report`` (tables and plots over run
directories) and ``sweep`` (one run per combination of override values, then a report)."""

"""The experiment config: schema, YAML with line numbers, overrides, checks, sources and ``show``.

Modules, one job each: ``schema`` (the pydantic models and every default), ``groups`` (config groups
such as ``compression``, whose selector picks the options that apply), ``yamlfile`` (reading YAML with
the line of each key), ``overrides`` (``KEY=VALUE``), ``sources`` (where each value came from),
``translate`` (pydantic errors as dotted-path problems), ``hosts`` (host lists and hostfiles),
``checks`` (checks across keys and on files), ``resolve`` (all of it together, for the launcher and
for the jobs) and ``show``.
"""

from ranger_hvd.config.hosts import split_list
from ranger_hvd.config.overrides import parse_override
from ranger_hvd.config.problems import ConfigError, Problem
from ranger_hvd.config.resolve import Inactive, Resolved, job_config, load_config, read_run_config
from ranger_hvd.config.schema import (COMPRESSION, DEFAULT_ENTRY, ClusterSection, CompressionSection, Config, DataSection,
                     HorovodSection, JobSection, OutputSection, TrainSection)
from ranger_hvd.config.show import show_lines, show_text
from ranger_hvd.config.yamlfile import yaml_scalar

__all__ = [
    "COMPRESSION", "DEFAULT_ENTRY", "ClusterSection", "CompressionSection", "Config", "ConfigError",
    "DataSection", "HorovodSection", "Inactive", "JobSection", "OutputSection", "Problem", "Resolved",
    "TrainSection", "job_config", "load_config", "parse_override", "read_run_config", "show_lines",
    "show_text", "split_list", "yaml_scalar",
]

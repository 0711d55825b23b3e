"""The ``sh -c`` lines horovodrun 0.28.1 builds from an argv, made by Horovod's own functions (nothing is
run): the mpirun line, a Gloo rank's command (local and over ssh), the ssh check and the elastic
discovery command.  Tests parse them back with ``shlex`` to see what each program would receive."""

from __future__ import annotations

import os
import sys
from shlex import quote
from unittest import mock

from horovod.runner import gloo_run, launch, mpi_run
from horovod.runner.common.util import hosts as hvd_hosts
from horovod.runner.common.util import settings as hvd_settings
from horovod.runner.util.remote import get_remote_command


def parse_horovodrun(argv: list[str]):
    """horovodrun's own reading of ``argv`` (its argparse namespace)."""
    assert argv[0].endswith("horovodrun"), argv
    with mock.patch.object(sys, "argv", ["horovodrun", *argv[1:]]):
        return launch.parse_args()


def mpirun_line(argv: list[str], env: dict[str, str]) -> str:
    """The line horovodrun hands to /bin/sh -c to start mpirun (Open MPI)."""
    args = parse_horovodrun(argv)
    settings = hvd_settings.Settings(ssh_port=args.ssh_port, ssh_identity_file=args.ssh_identity_file,
                                     extra_mpi_args=args.mpi_args, num_proc=args.num_proc, hosts=args.hosts,
                                     output_filename=args.output_filename, nics=args.nics,
                                     prefix_output_with_timestamp=args.prefix_output_with_timestamp)
    nics = sorted(args.nics) if args.nics else None
    seen: list[str] = []

    def execve(path, argv_, env_):
        seen.append(argv_[2])

    flags = (list(mpi_run._OMPI_FLAGS), list(mpi_run._NO_BINDING_ARGS), mpi_run._OMPI_IMPL)
    with mock.patch.object(mpi_run, "_get_mpi_implementation_flags", return_value=flags), \
            mock.patch.object(os, "execve", execve):
        mpi_run.mpi_run(settings, nics, dict(env), args.command)
    return seen[0]


def gloo_rank_lines(argv: list[str], env: dict[str, str], host: str = "localhost") -> tuple[str, str]:
    """(the command a Gloo rank runs on this host, the ssh line that runs it on ``host``)."""
    args = parse_horovodrun(argv)
    run_command = gloo_run.get_run_command(args.command, "127.0.0.1", ["lo"], 12345)
    slot = hvd_hosts.SlotInfo(hostname=host, rank=0, local_rank=0, cross_rank=0, size=1, local_size=1,
                              cross_size=1)
    local = gloo_run._slot_info_to_command_fn(run_command, dict(env))(slot)
    remote = get_remote_command(quote(f"cd {os.getcwd()} > /dev/null 2>&1 ; {local}"), host=host,
                                port=args.ssh_port, identity_file=args.ssh_identity_file)
    return local, remote


def ssh_check_line(argv: list[str], host: str) -> str:
    """horovodrun's ssh check of a remote host."""
    args = parse_horovodrun(argv)
    return get_remote_command("true", host=host, port=args.ssh_port, identity_file=args.ssh_identity_file,
                              timeout_s=10)


def discovery_line(argv: list[str]) -> str:
    """What horovodrun runs with sh -c to discover hosts in elastic mode."""
    return parse_horovodrun(argv).host_discovery_script

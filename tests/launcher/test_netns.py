"""A real 2-host job: two network namespaces with sshd (launch/netns-hosts.sh), the default CNN config
on synthetic data, ranks on different "hosts" reached over ssh, Gloo traffic across the bridge.

Needs root, ``ip netns`` and sshd; skipped otherwise.  Deselect with ``-m 'not netns'``.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from .conftest import REPO, needs_horovod, netns_script, netns_unusable

pytestmark = [pytest.mark.netns, pytest.mark.horovod, needs_horovod]

@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = netns_unusable("rhvd")
    if why:
        pytest.skip(why)
    state = tmp_path_factory.mktemp("netns")
    up = netns_script("up", state)
    if up.returncode != 0:
        netns_script("down", state)
        pytest.skip(f"could not create the test hosts: {up.stderr[-2000:]}")
    yield state
    netns_script("down", state)


def test_two_host_real_job(hosts, tmp_path):
    pytest.importorskip("ranger_hvd.jobs")
    key = hosts / "id_ed25519"
    out = tmp_path / "runs"
    argv = ["ip", "netns", "exec", "rhvd-ns1", sys.executable, "-m", "ranger_hvd.launcher.cli", "launch",
            str(REPO / "configs" / "cnn-digits.yaml"), "cluster.hosts=[10.77.0.11:1,10.77.0.12:1]",
            "cluster.ssh_port=2222", f"cluster.ssh_identity_file={key}", "cluster.network_interfaces=rhvd0",
            "cluster.start_timeout=120", "train.epochs=1", "data.dataset=synthetic", "data.synthetic_samples=256",
            "train.batch_size=32", f"output.dir={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    run = next((out / "cnn-digits").iterdir())
    cmd = shlex.split((run / "command.txt").read_text().splitlines()[0])
    assert cmd[:6] == ["horovodrun", "-np", "2", "-H", "10.77.0.11:1,10.77.0.12:1", "--gloo"]
    assert cmd[6:12] == ["-p", "2222", "-i", str(key), "--network-interfaces", "rhvd0"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    end = recs[-1]
    assert end["event"] == "end" and end["size"] == 2 and end["params_identical"] is True
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["hosts"] == ["10.77.0.11:1", "10.77.0.12:1"]
    assert (run / "logs" / "rank.1" / "stdout").exists()

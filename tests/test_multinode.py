"""Multi-node on one machine (issue 24): a head and a worker raylet with a fake GPU each, the app
deployed with `serve deploy`, replicas on both nodes, one proxy per node, and requests through both
proxies succeed. scripts/multinode_local.py does it (and prints the report by hand); it takes 3-6
minutes on 2 shared cores, so it runs only with GENSERVE_MULTINODE_TEST=1."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("GENSERVE_MULTINODE_TEST") != "1",
                                                   reason="set GENSERVE_MULTINODE_TEST=1 (3-6 min)")]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "multinode_local.py"


def test_two_nodes_serve_through_both_proxies(tiny_models_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("multinode_local", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.run(nodes=2, requests=16)
    assert len(report["nodes"]) == 2, report
    assert report["checks"] == {k: True for k in report["checks"]}, report
    assert len(report["nodes_of"]["ProxyActor"]) == 2 and report["responses"] == {"200": 16}

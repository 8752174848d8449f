"""`dvc exp run -S profile=paper` as a knob, offline.

The paper profile (GPT-J 6B + BEiT-large + LiMBeR on COCO) cannot run here: no hub, no
GPU. What must hold offline: the switch reaches the stages (download_coco fetches COCO
from the `coco` source, here a 127.0.0.1 mirror of coco-mini), and the first
model-loading stage stops with one clear line naming the missing model, no traceback,
no partial output, and no connection to anything but 127.0.0.1 — every Python process of
the run gets an audit hook (a ``sitecustomize`` on ``PYTHONPATH``) that refuses and logs
any other DNS lookup or connection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from coco_server import coco_server, require_coco_mini
from helpers.pipeline import copy_repo, env, ran, run
from mmn.params import load_params

pytestmark = pytest.mark.slow

SUBSET = 3
LIMBER_PATH = "/limber_weights/beit_linear/proj.ckpt"  # not served by the mirror (404)

_NETGUARD = '''\
"""Network guard of tests/test_paper_profile.py: refuse and log non-loopback networking."""
import os
import sys

_LOG = os.environ["MMN_NETGUARD_LOG"]
_EVENTS = {"socket.connect": 1, "socket.sendto": 1, "socket.getaddrinfo": 0,
           "socket.gethostbyname": 0, "socket.gethostbyaddr": 0}


def _write(line):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {line}\\n")


def _host(event, args):
    arg = args[_EVENTS[event]]
    if event in ("socket.connect", "socket.sendto"):
        arg = arg[0] if isinstance(arg, tuple) and arg else None  # str/bytes: AF_UNIX path
    return arg.decode(errors="replace") if isinstance(arg, bytes) else arg


def _hook(event, args):
    if event not in _EVENTS:
        return
    host = _host(event, args)
    if not isinstance(host, str) or host in ("", "localhost", "::1") or host.startswith(("127.", "::ffff:127.")):
        return
    _write(f"BLOCKED {event} {host!r} in {getattr(sys, 'orig_argv', '?')}")
    raise OSError(f"network access to {host!r} blocked by the test guard")


_write(f"armed {getattr(sys, 'orig_argv', '?')}")
sys.addaudithook(_hook)
'''


def _offline_env(tmp_path: Path) -> tuple[dict, Path, Path]:
    """Offline hub, an empty HF_HOME, and the network guard on PYTHONPATH."""
    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NETGUARD)
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    netlog = tmp_path / "net.log"
    offline = env()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE",
                "HF_ENDPOINT", "PYTHONPATH"):
        offline.pop(var, None)
    offline.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(guard),
                   MMN_NETGUARD_LOG=str(netlog), MMN_CACHE=str(tmp_path / "mmn_cache"))
    return offline, hf_home, netlog


def test_paper_profile_offline_stops_clearly_at_the_first_model(tmp_path):
    mini = require_coco_mini()
    repo = copy_repo(tmp_path / "repo")
    offline, hf_home, netlog = _offline_env(tmp_path)
    with coco_server(tmp_path / "mirror") as srv:
        limber_url = srv.base_url + LIMBER_PATH
        t0 = time.monotonic()
        r = run(["dvc", "exp", "run", "-S", "profile=paper",
                 "-S", f"data.coco.base_url='{srv.base_url}'",
                 "-S", f"data.coco.annotations_sha1='{srv.sha1}'",
                 "-S", f"data.coco.subset={SUBSET}",
                 "-S", f"profiles.paper.limber_url='{limber_url}'"], repo, env=offline, timeout=600)
        elapsed = time.monotonic() - t0
        served = [q.path for q in srv.requests]
    out = r.stdout + r.stderr
    print(out[-4000:], f"\n[dvc exp run: {elapsed:.1f} s]")

    # the knob reached the stages: params.yaml of the run, then download_coco on the paper's `coco` source
    p = load_params(repo / "params.yaml")
    assert p.profile == "paper" and p.model.data_source == "coco" and p.model.limber_url == limber_url
    assert p.data.coco.base_url == srv.base_url and p.data.coco.subset == SUBSET
    assert ran(r.stdout) == {"download_coco", "download_train", "load_projection"}, out[-3000:]
    assert "[download_coco] source=coco" in out
    instances = json.loads((repo / "data/coco/annotations/instances.json").read_text())
    names = sorted(im["file_name"] for im in instances["images"])
    assert len(names) == SUBSET
    assert sorted(f.name for f in (repo / "data/coco/images").iterdir()) == names
    for name in names:
        assert (repo / "data/coco/images" / name).read_bytes() == (mini / "images" / name).read_bytes()
    assert "/annotations/annotations_trainval2017.zip" in served
    assert all(any(path.endswith("/" + name) for path in served) for name in names)  # from the mirror

    # then load_projection stops at its first model (the LM, loaded before encoder and LiMBeR) ...
    assert r.returncode != 0
    errors = [line for line in out.splitlines() if "error:" in line.lower() and "[load_projection]" in line]
    assert len(errors) == 1, out[-3000:]
    line = errors[0]
    assert line.startswith("[load_projection] error: language model 'EleutherAI/gpt-j-6B' (revision 'float16')")
    assert "offline" in line and "HF_HOME" in line and str(hf_home) in line
    assert "failed to reproduce 'load_projection'" in out
    assert LIMBER_PATH not in served  # never got that far
    # ... clearly: one line, no traceback, no partial output, nowhere but 127.0.0.1
    assert "Traceback" not in out
    assert not (repo / "data/projection").exists()
    assert not list((repo / "data").glob(".tmp-projection-*")) and not (repo / ".cache/limber").exists()
    log = netlog.read_text().splitlines()
    assert not [entry for entry in log if " BLOCKED " in entry], log
    assert any("stages.load_projection" in entry for entry in log if " armed " in entry), log  # guard was on


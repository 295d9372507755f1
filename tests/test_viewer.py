"""The HTML tree viewer: parsed back with html.parser; rendered by headless Chromium when present."""

import asyncio
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ets.config import SearchConfig
from ets.runner import RunConfig
from ets.engines.mock import MockPolicy
from ets.prm.mock import MockPRM
from ets.report.viewer import render_record
from ets.runner import Job, run_jobs
from ets.runs import RunDir
from ets.tasks import load_dataset


class Nodes(HTMLParser):
    """Collects the class lists of the node boxes and any script / external reference."""

    def __init__(self):
        super().__init__()
        self.nodes: dict[str, list[str]] = {}
        self.external: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "div" and "node" in (a.get("class") or "").split():
            self.nodes[a["id"]] = a["class"].split()
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith("#"):
                self.external.append(a[k])


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("view")
    data = tmp / "toy.jsonl"
    data.write_text(json.dumps({"id": "v1", "question": "What is 6*7? <b>bold</b>", "answer": "42"}) + "\n")
    task, problems = load_dataset(str(data), id_field="id")
    cfg = SearchConfig(strategy="ets", width=6, strategy_params={"embedder": "hash"})
    rc = RunConfig(policy="mock", prm="mock", embedder="hash", runs_dir=str(tmp / "runs"))
    run = RunDir.prepare(rc.runs_dir, rc.identity(cfg, task.to_dict()), rc.to_dict())
    asyncio.run(run_jobs([[Job(problems[0], cfg, run)]], task, MockPolicy(p_correct=0.6), MockPRM(), progress=False))
    return run.load_problem("v1")


def test_html_parses_and_shows_every_node(record):
    page = render_record(record)
    p = Nodes()
    p.feed(page)
    nodes = record["tree"]["nodes"]
    assert len(p.nodes) == len(nodes)
    pruned = {f"n{n['id']}" for n in nodes if n["alloc"] == 0}
    assert pruned and {k for k, c in p.nodes.items() if "pruned" in c} == pruned
    sols = {f"n{n['id']}" for n in nodes if n["finish"] == "answer"}
    assert {k for k, c in p.nodes.items() if {"sol-ok", "sol-bad"} & set(c)} == sols
    chosen = record["answer"]["node_id"]
    assert "chosen" in p.nodes[f"n{chosen}"] and "chosen" in p.nodes["n0"]
    assert any(n["cluster"] is not None for n in nodes) and "cluster " in page
    assert "script" not in p.tags and p.external == []  # self-contained
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # text is escaped, not interpreted
    verdict = "right" if record["correct"] else "wrong"
    assert f"chosen: <b>{record['answer']['answer']}</b> <span class='{'ok' if record['correct'] else 'bad'}'>{verdict}" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render with")
def test_renders_in_headless_chromium(record, tmp_path):
    html_path = tmp_path / "tree.html"
    html_path.write_text(render_record(record))
    png = tmp_path / "tree.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,1600",
                    html_path.as_uri()], capture_output=True, timeout=120)
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image

    img = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    # the pruned grey (#f3f3f3) and a solution background (#e6f4ea right / #fce8e6 wrong) were drawn
    assert (243, 243, 243) in colours
    assert (230, 244, 234) in colours or (252, 232, 230) in colours
    assert img.std() > 10  # not a blank page

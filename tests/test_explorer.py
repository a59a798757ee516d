"""``tokenmdp explain``'s credit explorer, in a real headless browser (Debian's chromium).

The test drives chromium itself over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: the browser reads commands on its fd 3 and writes replies and
events on its fd 4, JSON messages ended by a NUL byte), with the standard library only. It
fails, not skips, when chromium is missing: ``.ci/run`` installs it (docs/testing.md).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import math
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import attrs
import pytest
import torch

from tokenmdp.mdp.solver import solve, tree_logprobs
from tokenmdp.reports.explain import TRUE_ROW, explain, load_run, token_label
from tokenmdp.reports.explorer import colour_of, colour_table, embed_json, page_data, render

#: A delayed reward and an EOS token (as tests/test_explain.py): responses of several lengths.
DELAYED = ["env.id=tokenmdp/SumThreshold-v0", "env.eos_token=0"]
FLAGS = [
    "--headless",
    "--no-sandbox",  # as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-color-profile=srgb",  # the screenshot's pixels are the page's sRGB colours
]
WIDTH, HEIGHT = 1200, 900
#: What a command or a page load may take on a loaded 2-core machine (a wait, not an assertion).
WAIT = 30.0


def chromium_binary() -> str:
    for name in (os.environ.get("TOKENMDP_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail(
        "chromium is not installed: the explorer's browser test needs Debian's chromium "
        "(`apt-get install -y chromium`, as .ci/run does), or TOKENMDP_CHROMIUM=/path/to/chrome",
        pytrace=False,
    )


class BrowserError(RuntimeError):
    pass


class Browser:
    """One chromium process; :meth:`open` gives a tab (a DevTools session)."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def wire():  # in the child, before exec: the pipes become its fds 3 and 4
            r = fcntl.fcntl(to_child, fcntl.F_DUPFD_CLOEXEC, 10)
            w = fcntl.fcntl(from_child, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.log = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=wire,
                close_fds=False,  # os.pipe()'s fds are close-on-exec; only fds 3 and 4 stay open
            )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise BrowserError(f"chromium did not answer within {WAIT:g} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited: {self.log.read_text(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write, data) :]
        deadline = time.monotonic() + WAIT
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + WAIT
        while True:
            for k, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self.events.pop(k)
            self.events.append(self._message(deadline))

    def open(self) -> Tab:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Tab(self, session)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except BrowserError:
            pass
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._read)
        os.close(self._write)


class Tab:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        # window.onerror's view of the page, besides the protocol's exception events
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": "window.__errors = []; addEventListener('error', e => __errors.push(String(e.message)));"},
        )

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, self.session)

    def load(self, page: Path) -> None:
        self.browser.events.clear()
        self.call("Page.navigate", {"url": page.resolve().as_uri()})
        self.browser.wait_for("Page.loadEventFired", self.session)
        assert self.js("document.body.dataset.ready") == "1", self.errors()

    def js(self, expression: str):
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def errors(self) -> list[str]:
        """The page's script errors and console errors so far."""
        self.js("0")  # drain the events sent before this reply
        found = []
        for event in self.browser.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found + self.js("window.__errors")

    def requests(self) -> list[str]:
        self.js("0")
        return [
            e["params"]["request"]["url"] for e in self.browser.events if e.get("method") == "Network.requestWillBeSent"
        ]

    def centre(self, selector: str) -> tuple[float, float, dict]:
        """Scroll the element into view; its centre in the viewport and its rect."""
        rect = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            "return {x: r.x, y: r.y, w: r.width, h: r.height}; })()"
        )
        return rect["x"] + rect["w"] / 2, rect["y"] + rect["h"] / 2, rect

    def hover(self, selector: str) -> None:
        x, y, _ = self.centre(selector)
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, selector: str) -> None:
        x, y, _ = self.centre(selector)
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def screenshot(self):
        """The viewport as an ``[H, W, 3]`` uint8 array."""
        from matplotlib.image import imread

        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = imread(io.BytesIO(png), format="png")  # floats in [0, 1]
        return (pixels[..., :3] * 255).round().astype("uint8")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    folder = tmp_path_factory.mktemp("chromium")
    chromium = Browser(binary, folder / "profile", folder / "chromium.log")
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def tab(browser):
    return browser.open()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from helpers import TINY

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    path = tmp_path_factory.mktemp("explorer") / "run"
    Trainer(load_config(None, [*TINY, *DELAYED, f"run.dir={path}"])).train()
    return path


@pytest.fixture(scope="module")
def explained(run_dir, tmp_path_factory):
    return explain(run_dir, samples=4, seed=1, out=tmp_path_factory.mktemp("explorer_out"))


def page_json(page: Path) -> dict:
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(found.group(1))


def scaled(explained, label: str, row: int) -> torch.Tensor:
    """A response's credit on its row's own scale, as the page colours it."""
    length = int(explained.batch.response_mask[row].sum())
    values = explained.credit[label][row, :length]
    top = float(values.abs().max())
    return values / top if top > 0 else values * 0


def expected_colours(explained, label: str) -> list[list[str]]:
    table = colour_table()
    return [[colour_of(float(x), table) for x in scaled(explained, label, row)] for row in explained.shown]


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[k : k + 2], 16) for k in (1, 3, 5))


def backgrounds(tab) -> list[list[str]]:
    return tab.js(
        "Array.from(document.querySelectorAll('.tokens')).map(s => Array.from(s.querySelectorAll('.tok'))"
        ".map(b => getComputedStyle(b).backgroundColor))"
    )


def css_rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*rgb(hex_colour))


def number(text: str) -> float:
    return float(text.split("\u00b1")[0].replace("\u2212", "-"))


def test_the_page_loads_without_errors_and_needs_no_other_file(tab, explained, run_dir):
    tab.load(explained.html)
    assert tab.errors() == []
    assert all(url.startswith(("file://", "data:")) for url in tab.requests()), tab.requests()
    labels = tab.js("Array.from(document.querySelectorAll('#estimator option')).map(o => o.value)")
    assert labels == explained.labels  # every estimator, then the ground truth
    # the correlation table stays on the page, one row per estimator
    rows = tab.js("Array.from(document.querySelectorAll('#correlations tr')).slice(1).map(r => r.innerText)")
    for label, text in zip(explained.labels, rows):
        corr = explained.correlations[label]
        assert text.startswith(label) and (f"{corr:.3f}" in text if math.isfinite(corr) else "n/a" in text)
    # one box per real token of each shown response, in order
    tokens = tab.js(
        "Array.from(document.querySelectorAll('.tokens')).map(s => Array.from(s.querySelectorAll('.txt'))"
        ".map(t => t.textContent))"
    )
    batch, task = explained.batch, load_run(run_dir)[2]
    for row, shown in zip(explained.shown, tokens):
        length = int(batch.response_mask[row].sum())
        assert shown == [token_label(task, a) for a in batch.response_ids[row, :length].tolist()]


def test_switching_the_estimator_recolours_the_tokens(tab, explained):
    tab.load(explained.html)
    first, other = explained.labels[0], "RLOO"
    assert backgrounds(tab) == [[css_rgb(c) for c in row] for row in expected_colours(explained, first)]
    tab.js(
        f"(() => {{ const s = document.getElementById('estimator'); s.value = {json.dumps(other)};"
        "s.dispatchEvent(new Event('change')); })()"
    )
    after = backgrounds(tab)
    assert after == [[css_rgb(c) for c in row] for row in expected_colours(explained, other)]
    assert after != [[css_rgb(c) for c in row] for row in expected_colours(explained, first)]
    assert tab.errors() == []


def test_hovering_a_token_shows_its_probabilities_and_every_credit(tab, explained):
    tab.load(explained.html)
    batch = explained.batch
    assert tab.js("document.getElementById('panel').hidden")
    for r, row in enumerate(explained.shown):
        for t in range(int(batch.response_mask[row].sum())):
            tab.hover(f".tok[data-r='{r}'][data-t='{t}']")
            assert not tab.js("document.getElementById('panel').hidden")
            cells = tab.js(
                "Object.fromEntries(Array.from(document.querySelectorAll('#panel td[data-field]'))"
                ".map(td => [td.parentNode.dataset.label || td.dataset.field, td.textContent]))"
            )
            text = tab.js("document.getElementById('panel').innerText")
            assert f"t={t}" in text and f"token id {int(batch.response_ids[row, t])}" in text
            policy, reference = batch.logprobs[row, t].exp(), batch.ref_logprobs[row, t].exp()
            assert number(cells["policy_prob"]) == pytest.approx(float(policy), abs=1.5e-4)
            assert number(cells["ref_prob"]) == pytest.approx(float(reference), abs=1.5e-4)
            for label in explained.labels:  # every estimator and the ground truth, A*
                assert number(cells[label]) == pytest.approx(float(explained.credit[label][row, t]), abs=1.5e-4)
                assert label in text
    assert tab.errors() == []


def test_the_prefix_tree_expands_on_click(tab, explained, run_dir):
    config, _, task, policy, reference, _ = load_run(run_dir)
    solution = solve(task, reference, config.train.beta)
    policy_logp = tree_logprobs(policy, task)
    tab.load(explained.html)
    data = page_json(explained.html)
    tree = data["trees"][0]
    p = tree["prompt_index"]
    assert p == int(explained.batch.prompt_index[explained.shown[0]])
    assert "Embedded: 52 of this prompt's 52 branches" in tab.js("document.getElementById('tree-cut').innerText")

    def shown_nodes():
        return tab.js("Array.from(document.querySelectorAll('#tree li[data-node]')).map(li => Number(li.dataset.node))")

    root = tree["nodes"][0]
    assert shown_nodes() == [0, *root["kids"]]  # the root starts expanded
    node = next(tree["nodes"][k] for k in root["kids"] if tree["nodes"][k]["kids"])
    tab.click(f"#tree li[data-node='{node['id']}'] > .node")
    at = root["kids"].index(node["id"]) + 1
    assert shown_nodes() == [0, *root["kids"][:at], *node["kids"], *root["kids"][at:]]  # its children, below it
    a0 = node["id_token"]
    for kid in node["kids"]:
        a1 = tree["nodes"][kid]["id_token"]
        fields = tab.js(
            f"Object.fromEntries(Array.from(document.querySelectorAll(\"#tree li[data-node='{kid}'] > .node .v\"))"
            ".filter(v => v.dataset.field).map(v => [v.dataset.field, v.textContent.split(' ').pop()]))"
        )
        state = a0  # the state after token a0, in the solver's tree order
        assert number(fields["pi"]) == pytest.approx(float(policy_logp[1][p, state, a1].exp()), abs=1.5e-4)
        assert number(fields["ref"]) == pytest.approx(float(solution.ref_logp[1][p, state, a1].exp()), abs=1.5e-4)
        assert number(fields["opt"]) == pytest.approx(float(solution.opt_logp[1][p, state, a1].exp()), abs=1.5e-4)
        assert number(fields["a"]) == pytest.approx(float(solution.advantages(1)[p, state, a1]), abs=1.5e-4)
    tab.click(f"#tree li[data-node='{node['id']}'] > .node")  # folds it again
    assert tab.js(f"document.querySelector(\"#tree li[data-node='{node['id']}'] > ul\").hidden")
    # a token clicked in a response is found in its prompt's tree
    row = next(r for r in explained.shown if explained.batch.response_mask[r].sum() >= 2)
    r = explained.shown.index(row)
    tab.click(f".tok[data-r='{r}'][data-t='1']")
    found = tab.js("Number(document.querySelector('.node.found').dataset.node)")
    tree = data["trees"][tab.js("Number(document.getElementById('tree-prompt').value)")]
    ids = explained.batch.response_ids[row, :2].tolist()
    assert (
        tree["nodes"][found]["id_token"] == ids[1]
        and tree["nodes"][tree["nodes"][found]["parent"]]["id_token"] == ids[0]
    )
    assert tab.errors() == []


def test_a_screenshot_shows_the_credit_colours(tab, explained):
    tab.load(explained.html)
    label = explained.labels[0]
    values = [
        (float(x), r, t) for r, row in enumerate(explained.shown) for t, x in enumerate(scaled(explained, label, row))
    ]
    green, pink = max(values), min(values)
    assert green[0] > 0.3 and pink[0] < -0.3, "the fixture should have clearly positive and negative credit"
    table = colour_table()
    tab.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 1, "y": 1})  # no token hovered: no panel
    for x, r, t in (green, pink):
        _, _, box = tab.centre(f".tok[data-r='{r}'][data-t='{t}']")
        pixels = tab.screenshot()
        # the box's top padding (no text there): its background colour
        top, left = math.ceil(box["y"]) + 2, math.ceil(box["x"]) + 2
        patch = pixels[top : top + 3, left : left + int(box["w"]) - 4].reshape(-1, 3)
        want = rgb(colour_of(x, table))
        assert (abs(patch.astype(int) - want) <= 2).all(), (x, want, patch[:3].tolist())
        red, green_channel, _ = want
        assert (green_channel > red) == (x > 0)  # green above 0, pink below


def test_token_text_cannot_break_out_and_the_truth_can_carry_a_stderr(tab, explained, tmp_path):
    """A token text ``</script>...`` stays text; a Monte-Carlo ground truth (its own name, a
    standard error per token) is shown as ``value ± stderr``."""
    evil = "</script><script>window.__pwned = 1</script><b>&amp;"
    truth = "Monte-Carlo A (K=8)"

    def rename(table):
        return {truth if k == TRUE_ROW else k: v for k, v in table.items()}

    stderr = torch.full_like(explained.credit[TRUE_ROW], 0.0123) * explained.batch.response_mask
    mc = attrs.evolve(
        explained,
        labels=[truth if k == TRUE_ROW else k for k in explained.labels],
        notes=rename(explained.notes),
        credit=rename(explained.credit),
        correlations=rename(explained.correlations),
        truth=truth,
        stderr={truth: stderr},
        intervals={explained.labels[0]: (0.5, 0.75)},
    )
    data = page_data(mc, lambda a: evil if a == 0 else str(a), lambda row: "<prompt>", title="Credit </script>")
    assert "</script>" not in embed_json(data) and json.loads(embed_json(data)) == data
    page = tmp_path / "index.html"
    page.write_text(render(data), encoding="utf-8")
    assert page.read_text().count("</script>") == 2  # the data's and the code's, nothing else
    tab.load(page)
    assert tab.errors() == [] and tab.js("window.__pwned") is None
    texts = tab.js("Array.from(document.querySelectorAll('.txt')).map(t => t.textContent)")
    assert evil in texts
    assert tab.js("document.title") == "Credit </script>"
    row = explained.shown[0]
    tab.hover(".tok[data-r='0'][data-t='0']")
    cell = tab.js(f"document.querySelector(\"#panel tr[data-label='{truth}'] td.num\").textContent")
    assert cell.endswith(" \u00b1 0.0123") and number(cell) == pytest.approx(
        float(explained.credit[TRUE_ROW][row, 0]), abs=1.5e-4
    )
    assert truth in tab.js("document.getElementById('corr-title').textContent")
    assert "[0.500, 0.750]" in tab.js("document.getElementById('correlations').innerText")

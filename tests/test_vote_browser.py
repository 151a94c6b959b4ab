"""The vote page itself in headless Chromium, driven over the DevTools protocol as a rater
would: type a name, click Start, click Left, press →, click Tie; votes.jsonl then holds exactly
those three choices, on the plan's first three questions, resolved to the right runs."""

import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from vote_folders import hand_folder

from ddrl.vote.folder import VOTES
from ddrl.vote.server import VoteServer
from ddrl.vote.store import read_votes

BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
    None,
)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (apt-get install chromium)"),
]


class DevTools:
    """A headless Chromium and a DevTools-protocol session on its first page."""

    def __init__(self, profile):
        websocket = pytest.importorskip("websocket", reason="websocket-client (the dev extra)")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        flags += ["--remote-debugging-port=0", f"--user-data-dir={profile}"]
        flags += ["--window-size=1000,700", "about:blank"]
        self.proc = subprocess.Popen(
            [BROWSER, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium failed"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=20, suppress_origin=True
        )
        self.calls = 0

    def send(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events come between the answers; they are not needed here
            answer = json.loads(self.ws.recv())
            if answer.get("id") == self.calls:
                assert "error" not in answer, answer
                return answer["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def click(self, element_id: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        box = self.js(
            f"(() => {{ const e = document.getElementById('{element_id}'); "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code
            )

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # it may close the socket before answering
            pass
        self.ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def browser(tmp_path):
    b = DevTools(tmp_path / "profile")
    yield b
    b.close()


def test_a_rater_votes_with_mouse_and_keyboard(browser, tmp_path):
    m = hand_folder(tmp_path / "votes", ["A", "B"], ["a red ball", "a cat", "a tree"])
    with VoteServer(m, port=0) as server:
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait("document.readyState === 'complete' && !!document.getElementById('start')")
        browser.js("document.getElementById('rater').focus()")
        browser.send("Input.insertText", text="tester")
        browser.click("start")
        ready = (  # the question shown, its samples loaded and its buttons open
            "!document.getElementById('left').disabled && "
            "document.getElementById('progress').textContent === '{} of 3'"
        )
        browser.wait(ready.format(1))
        first = m.settings.prompts[m.questions[0]["prompt"]]
        assert browser.js("document.getElementById('prompt').textContent") == first
        browser.click("left")
        browser.wait(ready.format(2))
        browser.key("ArrowRight", 39)
        browser.wait(ready.format(3))
        browser.click("tie")
        browser.wait("document.getElementById('message').textContent.startsWith('Nothing left')")
        assert browser.js("localStorage.getItem('rater')") == "tester"
    rows = read_votes(m.root / VOTES)
    assert [(r["rater"], r["question"], r["choices"]) for r in rows] == [
        ("tester", q["id"], {"overall": c})
        for q, c in zip(m.questions, ("left", "right", "tie"), strict=True)
    ]
    for r, q in zip(rows, m.questions, strict=True):
        left = m.runs[m.media[q["left"]]["run"]]["label"]
        right = m.runs[m.media[q["right"]]["run"]]["label"]
        assert (r["left"], r["right"]) == (left, right)
    assert rows[0]["winners"] == {"overall": rows[0]["left"]}
    assert rows[1]["winners"] == {"overall": rows[1]["right"]}
    assert rows[2]["winners"] == {"overall": "tie"} and all(r["ms"] > 0 for r in rows)

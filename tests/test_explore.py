"""worldmodel explore: the API, the page in a real headless browser, and a clean Ctrl-C."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest

from worldmodel.dataset import open_dataset
from worldmodel.errors import UserError
from worldmodel.explore import (
    MAX_DEPTH,
    ApiError,
    Explorer,
    ExplorerServer,
    json_depth,
    make_server,
)
from worldmodel.vae import load_vae

SIZE = 16  # frame side of conftest's tiny configs
LATENT = 4  # latent size of conftest's tiny VAE
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def setup(reach16: Path, reach16_vae: Path) -> dict[str, Path]:
    """The session's tiny dataset and the VAE trained on it (conftest)."""
    return {"data": reach16, "vae": reach16_vae}


@pytest.fixture(scope="module")
def explorer(setup: dict[str, Path]) -> Explorer:
    return Explorer(load_vae(setup["vae"]), open_dataset(setup["data"]), max_frames=200)


@pytest.fixture
def server(setup: dict[str, Path]) -> Iterator[ExplorerServer]:
    """The explorer on a free port, serving from a thread."""
    srv = make_server(setup["vae"], setup["data"], port=0, max_frames=200)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _image(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(iio.imread(base64.b64decode(uri[len(prefix):]), extension=".png"))


def _rgb(image: np.ndarray) -> np.ndarray:
    return image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, -1)


# ------------------------------------------------------------------------------------------
# The API, without HTTP


def test_info_sorts_sliders_by_kl_and_spans_the_data(explorer: Explorer) -> None:
    info = explorer.info()
    assert info["latent_dim"] == LATENT and info["image_shape"] == [SIZE, SIZE, 3]
    kl = np.array(info["kl"])
    assert sorted(info["order"]) == list(range(LATENT))
    assert list(kl[info["order"]]) == sorted(kl, reverse=True)
    np.testing.assert_allclose(info["centre"], explorer.mu.mean(0), rtol=1e-5, atol=1e-6)
    assert len(info["episodes"]) == 4 and info["sample_frames"] == len(explorer.mu)


def test_decode_gives_the_vae_image_and_changes_with_z(explorer: Explorer) -> None:
    z = np.array(explorer.info()["centre"], np.float32)
    image = _image(explorer.decode(z.tolist())["image"])
    np.testing.assert_array_equal(image, explorer.vae.decode(z[None])[0])
    top = explorer.info()["order"][0]
    z2 = z.copy()
    z2[top] += 3 * explorer.std[top]
    assert np.abs(_image(explorer.decode(z2.tolist())["image"]).astype(int) - image).mean() > 1
    for bad in ([0.0] * (LATENT + 1), "abc", [float("nan")] * LATENT):
        with pytest.raises(ApiError, match="z must be") as info:
            explorer.decode(bad)
        assert info.value.status == 400


def test_frame_is_the_dataset_frame_and_its_reconstruction(setup: dict[str, Path],
                                                          explorer: Explorer) -> None:
    ep = open_dataset(setup["data"]).episode(2)
    f = explorer.frame(2, 5)
    assert f["length"] == ep.length and f["reward"] == pytest.approx(float(ep.reward[5]))
    np.testing.assert_array_equal(_image(f["original"]), ep.obs[5])
    np.testing.assert_array_equal(_image(f["recon"]), explorer.vae.reconstruct(ep.obs[5:6])[0])
    assert ep.state is not None
    assert f["state"] == pytest.approx(ep.state[5].tolist())
    for episode, t in ((9, 0), (2, ep.length)):
        with pytest.raises(ApiError) as info:
            explorer.frame(episode, t)
        assert info.value.status == 404


def test_neighbours_are_the_nearest_sampled_frames(explorer: Explorer) -> None:
    f = explorer.frame(1, 3)
    out = explorer.neighbours(1, 3, k=5)
    items = out["items"]
    assert len(items) == 5
    assert all((it["episode"], it["t"]) != (1, 3) for it in items)
    distances = [it["distance"] for it in items]
    assert distances == sorted(distances)
    z = np.array(f["z"])
    all_d = np.linalg.norm(explorer.mu - z, axis=1)
    assert distances[-1] <= np.sort(all_d)[6] + 1e-5  # nothing closer was left out
    assert explorer.sample is not None
    first = items[0]
    i = np.flatnonzero((explorer.sample.episode == first["episode"]) &
                       (explorer.sample.t == first["t"]))[0]
    np.testing.assert_array_equal(_image(first["image"]), explorer.sample.frames[i])


def test_without_data_sliders_use_the_prior(setup: dict[str, Path]) -> None:
    ex = Explorer(load_vae(setup["vae"]), None)
    info = ex.info()
    assert info["episodes"] == [] and info["kl"] is None
    assert info["centre"] == [0.0] * LATENT and info["std"] == [1.0] * LATENT
    assert _image(ex.decode([0.0] * LATENT)["image"]).shape == (SIZE, SIZE, 3)
    with pytest.raises(ApiError, match="--data"):
        ex.frame(0, 0)


# ------------------------------------------------------------------------------------------
# Over HTTP


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if "json" in r.headers["Content-Type"] else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_api(server: ExplorerServer) -> None:
    url = server.url
    assert url.startswith("http://127.0.0.1:")
    status, page = _get(url)
    assert status == 200 and b"<title>worldmodel explore</title>" in page
    status, info = _get(url + "api/info")
    assert status == 200 and info["latent_dim"] == LATENT
    status, out = _post(url + "api/decode", json.dumps({"z": info["centre"]}).encode())
    assert status == 200 and _image(out["image"]).shape == (SIZE, SIZE, 3)
    assert _post(url + "api/decode", b"not json")[0] == 400
    assert _post(url + "api/decode", b'{"z": [1]}') == (
        400, {"error": f"z must be {LATENT} finite numbers, got shape [1]"})
    status, f = _get(url + "api/frame?episode=0&t=2")
    assert status == 200 and f["t"] == 2
    assert _get(url + "api/frame?episode=0&t=x")[0] == 400
    assert _get(url + "api/frame?episode=0")[0] == 400
    assert _get(url + "api/frame?episode=99&t=0")[0] == 404
    status, nb = _get(url + "api/neighbours?episode=0&t=2&k=3")
    assert status == 200 and len(nb["items"]) == 3
    assert _get(url + "nope")[0] == 404


def _raw(server: ExplorerServer, method: str, headers: dict[str, str], path: str = "/api/info",
         body: bytes | None = None) -> tuple[int, Any]:
    """One request with exactly ``headers`` (no automatic Host or Content-Length)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_bad_content_length_is_a_400(server: ExplorerServer) -> None:
    host = {"Host": "127.0.0.1"}
    for length in ("abc", "-5", str(2 << 20)):
        status, out = _raw(server, "POST", host | {"Content-Length": length}, "/api/decode",
                           b'{"z": [0]}')
        assert status == 400 and "expected a JSON body" in out["error"], length


def test_loopback_server_refuses_other_host_names(server: ExplorerServer) -> None:
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    port = server.server_address[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}",
                 f"[::1]:{port}"):
        assert _raw(server, "GET", {"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "localhost:x", "[::2]"):
        status, out = _raw(server, "GET", {"Host": host})
        assert status == 400 and "unexpected Host header" in out["error"], host
    assert _raw(server, "GET", {}, "/")[0] == 400  # no Host at all
    z = json.dumps({"z": [0.0] * LATENT}).encode()
    assert _raw(server, "POST", {"Host": "evil.example", "Content-Length": str(len(z))},
                "/api/decode", z)[0] == 400
    assert server.local_only
    anywhere = ExplorerServer(("0.0.0.0", 0), server.explorer)
    anywhere.server_close()
    assert not anywhere.local_only  # exposed on purpose: the machine's names are not known


def test_a_bug_is_a_500_with_json_and_a_log(
    server: ExplorerServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(server.explorer, "info", broken)
    with caplog.at_level(logging.ERROR, logger="worldmodel"):
        status, out = _get(server.url + "api/info")
    assert (status, out) == (500, {"error": "internal error: RuntimeError: boom"})
    assert "GET /api/info failed" in caplog.text and "Traceback" in caplog.text
    assert _get(server.url + "api/frame?episode=0&t=0")[0] == 200  # the server goes on


# ------------------------------------------------------------------------------------------
# Hostile clients: deep JSON, stalled uploads, too many connections


def _nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_json_depth_counts_brackets_outside_strings() -> None:
    for depth in range(40):
        assert json_depth(json.dumps(_nested(depth)).encode()) == depth
    assert json_depth(json.dumps({"z": [0.5] * LATENT}).encode()) == 2
    assert json_depth(b'{"a": "[[[{{", "b": "\\"[[\\\\", "c": [["\\\\"]]}') == 3
    assert json_depth(json.dumps(["\u00e9[\"\\[", [["{"]]], ensure_ascii=False).encode()) == 3
    assert json_depth(b"[" * 100_000) == 100_000  # unterminated: no parser, no recursion
    assert json_depth(b"") == json_depth(b"]]]") == json_depth(b'"[[[') == 0


@contextlib.contextmanager
def _serving(explorer: Explorer, **kwargs: Any) -> Iterator[ExplorerServer]:
    """An :class:`ExplorerServer` with ``kwargs`` (short timeouts), serving from a thread."""
    srv = ExplorerServer(("127.0.0.1", 0), explorer, **kwargs)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _handler_threads(server: ExplorerServer) -> int:
    """Live threads serving a connection of ``server``."""
    name = f"explore connection :{server.server_address[1]}"
    return sum(t.name == name for t in threading.enumerate())


def _wait_for(condition: Any, limit: float) -> float:
    """Poll ``condition()`` until true; the seconds it took (fails past ``limit``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def _stall(server: ExplorerServer, n: int) -> list[socket.socket]:
    """``n`` clients that announce a 100-byte body (some send 10 bytes of it), then stop."""
    host, port = server.server_address[:2]
    socks = []
    for i in range(n):
        s = socket.create_connection((str(host), port), timeout=5)
        s.sendall(b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"
                  + b'{"z": [0, ' * (i % 2))
        socks.append(s)
    return socks


def _decode_status(server: ExplorerServer) -> tuple[int, float]:
    """Status of one valid decode request, and the seconds it took."""
    start = time.monotonic()
    status, _ = _post(server.url + "api/decode", json.dumps({"z": [0.0] * LATENT}).encode())
    return status, time.monotonic() - start


def test_deeply_nested_body_is_a_400_and_the_server_goes_on(
    explorer: Explorer, caplog: pytest.LogCaptureFixture
) -> None:
    deep = MAX_DEPTH + 1
    bodies = [
        b"[" * 200_000,  # unterminated
        b'{"z": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        json.dumps({"z": _nested(deep)}).encode(),
    ]
    with caplog.at_level(logging.DEBUG, logger="worldmodel"), _serving(explorer) as srv:
        for body in bodies:
            status, out = _post(srv.url + "api/decode", body)
            assert (status, out) == (400, {"error": f"JSON body nested deeper than "
                                                    f"{MAX_DEPTH} levels"}), body[:20]
            assert _decode_status(srv)[0] == 200  # the server goes on
        # Brackets in strings are not nesting; the limit itself is fine (then z is wrong).
        ok = json.dumps({"z": [0.0] * LATENT, "note": "[" * 1000}).encode()
        assert _post(srv.url + "api/decode", ok)[0] == 200
        status, out = _post(srv.url + "api/decode",
                            json.dumps({"z": _nested(MAX_DEPTH - 1)}).encode())
        assert status == 400 and "z must be" in out["error"]
        assert _post(srv.url + "api/decode", "{\"z\": [0, 0, 0, 0]}".encode("utf-16"))[0] == 400
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


def test_stalled_uploads_are_dropped_after_the_timeout(explorer: Explorer) -> None:
    timeout = 1.0
    with _serving(explorer, request_timeout=timeout, max_connections=64) as srv:
        host, port = srv.server_address[:2]
        assert _handler_threads(srv) == 0
        socks = _stall(srv, 60)
        # A slow-loris: one header byte at a time, each well within the socket timeout.
        loris = socket.create_connection((str(host), port), timeout=5)
        loris.sendall(b"GET /api/info HTTP/1.1\r\n")
        socks.append(loris)
        started = time.monotonic()
        _wait_for(lambda: _handler_threads(srv) == 61, 3)
        status, took = _decode_status(srv)  # served meanwhile, by a free thread
        assert status == 200 and took < timeout / 2
        trickled = 0
        while _handler_threads(srv) and time.monotonic() - started < 3 * timeout:
            with contextlib.suppress(OSError):
                loris.sendall(b"X")
                trickled += 1
            time.sleep(0.1)
        dropped_after = time.monotonic() - started
        assert _handler_threads(srv) == 0, "stalled connections still hold threads"
        assert timeout * 0.8 < dropped_after < 2.5 * timeout, dropped_after
        assert trickled >= 5  # the slow-loris kept sending, and was dropped all the same
        for s in socks:  # every stalled client sees its connection closed
            s.settimeout(1)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1024) == b""
            s.close()
        assert srv.refused_connections == 0 and srv.active_connections == 0
        status, took = _decode_status(srv)
        assert status == 200 and took < timeout / 2


def test_connections_past_the_bound_get_a_quick_503(explorer: Explorer) -> None:
    bound, timeout = 4, 1.5
    with _serving(explorer, request_timeout=timeout, max_connections=bound) as srv:
        socks = _stall(srv, bound + 6)
        peak = 0

        def threads() -> int:
            nonlocal peak
            peak = max(peak, _handler_threads(srv))
            return peak

        _wait_for(lambda: threads() == bound and srv.refused_connections == 6, 3)
        for _ in range(5):
            start = time.monotonic()
            status, out = _raw(srv, "GET", {"Host": "127.0.0.1"})
            assert status == 503 and "server busy" in out["error"]
            assert time.monotonic() - start < 0.5
            threads()
        assert _decode_status(srv)[0] == 503
        answers = []
        for s in socks:
            s.settimeout(3 * timeout)
            answers.append(s.recv(1024))  # 503 at once, or the close after the timeout
            s.close()
        assert sum(a.startswith(b"HTTP/1.1 503 ") for a in answers) == 6
        assert answers.count(b"") == bound
        _wait_for(lambda: _handler_threads(srv) == 0, 2)
        assert peak == srv.peak_connections == bound
        assert _decode_status(srv)[0] == 200  # slots free again


def test_port_in_use_is_a_user_error(setup: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_server(setup["vae"], None, port=port)


def test_missing_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        make_server(tmp_path / "nope", None, port=0)


# ------------------------------------------------------------------------------------------
# In a real browser


def _playwright() -> Any:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no {CHROMIUM}: install Debian's browser with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    return sync_playwright


def test_browser_slider_decodes_live(server: ExplorerServer, setup: dict[str, Path]) -> None:
    sync_playwright = _playwright()
    reader = open_dataset(setup["data"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            assert page.locator("#sliders input[type=range]").count() == LATENT
            first = page.get_attribute("#decoded", "src")
            assert first and first.startswith("data:image/png;base64,")

            # Move the most informative latent's slider to its maximum, with the keyboard.
            top = server.explorer.info()["order"][0]
            page.locator(f"#z-{top}").press("End")
            page.wait_for_function("(old) => document.getElementById('decoded').src !== old",
                                   arg=first, timeout=10_000)
            page.wait_for_function("() => Number(document.body.dataset.decodes) >= 2")
            moved = page.get_attribute("#decoded", "src")
            assert moved is not None
            assert np.abs(_image(moved).astype(int) - _image(first)).mean() > 1
            value = float(page.input_value(f"#z-{top}"))
            assert value > server.explorer.centre[top] + 2 * server.explorer.std[top]

            # "centre" brings back exactly the first image.
            page.click("#reset")
            page.wait_for_function("(old) => document.getElementById('decoded').src === old",
                                   arg=first, timeout=10_000)

            # Browse: the next frame of episode 0 is the dataset's frame 1.
            page.wait_for_function("() => document.body.dataset.frame === '0:0'")
            page.click("#next")
            page.wait_for_function("() => document.body.dataset.frame === '0:1'")
            shown = page.get_attribute("#orig", "src")
            assert shown is not None
            np.testing.assert_array_equal(_rgb(_image(shown)), reader.episode(0).obs[1])

            # Click the frame: its nearest neighbours appear.
            page.click("#orig")
            page.wait_for_function(
                "() => document.querySelectorAll('#neighbours img').length === 8")
            assert not errors, errors
        finally:
            browser.close()


def test_browser_visualize_page_leads_with_the_verdict(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """In Chromium: the verdict is the first thing on the page, the raw summary the last."""
    import json
    import shutil

    from worldmodel import visualize

    sync_playwright = _playwright()
    vae = Path(shutil.copytree(setup["vae"], tmp_path / "vae"))
    (vae / "summary.json").write_text(json.dumps({  # what train-vae writes, in brief
        "steps": 200, "val_mse_per_pixel": 0.004, "mean_image_mse": 0.02, "active_units": 4}))
    page_file = visualize.run(vae, setup["data"], tmp_path / "vis", max_frames=64)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_file.as_uri())
            order = page.evaluate("""() => {
                const all = [...document.body.querySelectorAll('*')];
                const at = (el) => el ? all.indexOf(el) : -1;
                const details = document.querySelector('details#run-summary');
                return {
                    verdict: at(document.querySelector('p.verdict')),
                    firstImage: at(document.querySelector('img, video')),
                    details: at(details),
                    lastSection: at([...document.body.children].at(-1)),
                    open: details ? details.open : null,
                    tableInDetails: !!(details && details.querySelector('table')),
                };
            }""")
            assert 0 <= order["verdict"] < order["firstImage"], order
            assert order["details"] > order["firstImage"] and order["tableInDetails"], order
            assert order["open"] is False, order  # collapsed
            assert page.locator("p.verdict").inner_text().strip()
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------
# The command, stopped with Ctrl-C


def test_cli_serves_until_ctrl_c(setup: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldmodel", "-q", "explore", str(setup["vae"]),
         "--data", str(setup["data"]), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    watchdog = threading.Timer(60, proc.kill)  # never hang the test run
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert line.startswith("explore: serving http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        assert _get(url + "api/info")[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "explore: stopped" in out
    assert "Traceback" not in err


def test_cli_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worldmodel.cli import main

    assert main(["explore", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("worldmodel explore: error:") and "\n" not in err



# --------------------------------------------------------------------------------------------
# The dream tab (--memory)

MEMORY_TINY = [
    "env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4",
    "memory.hidden_size=16", "memory.mixtures=2", "memory.batch_size=2", "memory.seq_len=8",
    "memory.steps=12", "memory.val_every=4", "memory.log_every=2", "memory.lr=3e-3",
    "data.val_fraction=0.25", "memory.device=cpu",
]


@pytest.fixture(scope="module")
def dream_runs(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    """A tiny M trained (as tests/test_memory.py does) on a copy of the session's VAE."""
    import shutil

    from worldmodel import train_memory
    from worldmodel.config import resolve_config

    root = tmp_path_factory.mktemp("explore-dream")
    vae = Path(shutil.copytree(setup["vae"], root / "vae"))
    memory = train_memory.run(resolve_config(None, MEMORY_TINY), setup["data"], vae,
                              root / "memory")
    return {**setup, "vae": vae, "memory": memory}


@pytest.fixture
def dream_server(dream_runs: dict[str, Path]) -> Iterator[ExplorerServer]:
    srv = make_server(dream_runs["vae"], dream_runs["data"], port=0, max_frames=200,
                      memory=dream_runs["memory"])
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_dream_steps_are_m_steps_decoded(dream_runs: dict[str, Path]) -> None:
    import torch

    from worldmodel.memory import load_memory, mixture_mean

    vae = load_vae(dream_runs["vae"])
    memory = load_memory(dream_runs["memory"])
    ex = Explorer(vae, open_dataset(dream_runs["data"]), max_frames=200, memory=memory)
    info = ex.info()
    assert info["dream"]["action_space"]["type"] == "Discrete"
    start = ex.dream_start(0, 2)
    z0 = vae.encode(open_dataset(dream_runs["data"]).episode(0).obs[2:3])[0]
    np.testing.assert_allclose(start["z"], z0, atol=1e-5)
    assert start["h"] == [0.0] * memory.hidden_size
    out = ex.dream_step(start["z"], start["h"], start["c"], 3)
    pred, (h, _) = memory.step(z0[None], memory.actions(np.array([3])),
                               memory.initial_state(1))
    want = mixture_mean(pred)[0].numpy()
    np.testing.assert_allclose(out["z"], want, atol=1e-5)
    np.testing.assert_allclose(out["h"], h.view(-1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(_image(out["image"]), vae.decode(want[None])[0])
    assert 0 <= out["done_prob"] <= 1 and math.isfinite(out["reward"])
    torch.manual_seed(0)
    drawn = ex.dream_step(start["z"], start["h"], start["c"], 3, sample=True)
    assert drawn["z"] != out["z"]
    with pytest.raises(ApiError, match="does not fit"):
        ex.dream_step(start["z"], start["h"], start["c"], 7)
    with pytest.raises(ApiError, match="h must be 16"):
        ex.dream_step(start["z"], [0.0], start["c"], 0)
    no_memory = Explorer(vae, None)
    assert no_memory.info()["dream"] is None
    with pytest.raises(ApiError, match="--memory"):
        no_memory.dream_start()


def test_dream_http_api_and_refusals(dream_server: ExplorerServer,
                                     dream_runs: dict[str, Path], tmp_path: Path) -> None:
    url = dream_server.url
    status, start = _post(url + "api/dream/start", b'{"episode": 0, "t": 0}')
    assert status == 200 and len(start["z"]) == LATENT
    body = {"z": start["z"], "h": start["h"], "c": start["c"], "action": 1}
    status, out = _post(url + "api/dream/step", json.dumps(body).encode())
    assert status == 200 and _image(out["image"]).shape == (SIZE, SIZE, 3)
    assert len(out["h"]) == len(start["h"]) and out["z"] != start["z"]
    assert _post(url + "api/dream/step", b'{"z": [0]}')[0] == 400
    assert _post(url + "api/dream/step", json.dumps({**body, "action": 9}).encode())[0] == 400
    assert _post(url + "api/dream/start", b'{"episode": 99}')[0] == 404
    assert _post(url + "api/dream/start", b'[1]')[0] == 400
    with pytest.raises(UserError, match="--memory") as info:
        make_server(dream_runs["vae"], None, port=0, memory=dream_runs["vae"])
    assert "\n" not in str(info.value)


def test_browser_dream_tab_plays_with_the_keyboard(dream_server: ExplorerServer) -> None:
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(dream_server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            assert page.is_visible("#dream-panel")
            page.wait_for_function("() => document.body.dataset.dreamSteps === '0'",
                                   timeout=10_000)
            first = page.get_attribute("#dream-img", "src")
            assert first and first.startswith("data:image/png;base64,")
            page.click("#dream-img")
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => document.body.dataset.dreamSteps === '1'",
                                   timeout=10_000)
            page.keyboard.press("ArrowDown")
            page.wait_for_function("() => document.body.dataset.dreamSteps === '2'",
                                   timeout=10_000)
            assert "step 2" in page.inner_text("#dream-info")
            page.click("#dream-start")
            page.wait_for_function("() => document.body.dataset.dreamSteps === '0'",
                                   timeout=10_000)
            assert not errors, errors
        finally:
            browser.close()

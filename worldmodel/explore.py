"""``worldmodel explore``: a local web page to play with a VAE's latent space.

The page (``worldmodel/static/explore.html``, one file with inline JavaScript) talks to a small
JSON API served by the standard library's :class:`~http.server.ThreadingHTTPServer`:

``GET /``
    the page.
``GET /api/info``
    latent size, image shape, slider centre/range and KL of every latent dimension (from an
    encoded sample of the dataset when there is one, else the prior ``N(0, 1)``), and the
    episodes of the dataset.
``POST /api/decode`` with ``{"z": [Z floats]}``
    ``{"image": "data:image/png;base64,..."}``, the decoded frame.
``GET /api/frame?episode=I&t=T``
    the dataset frame, its reconstruction, its latent mean, reward and true state.
``GET /api/neighbours?episode=I&t=T&k=K``
    the ``K`` frames of the encoded sample nearest to that frame in latent space
    (``sklearn.neighbors.NearestNeighbors``, Euclidean on the posterior means).
``POST /api/dream/start`` with ``{"episode": I, "t": T}`` (``{}``: the sample's mean latent)
    with a memory run (``--memory``): the dream's first step, ``{"z", "h", "c", "image"}``
    (``z`` the frame's latent mean, ``h`` and ``c`` M's zero LSTM state).
``POST /api/dream/step`` with ``{"z", "h", "c", "action", "sample": false}``
    one step of M: ``z_{t+1}`` (its mixture mean, or with ``"sample": true`` a draw at the
    run's ``memory.temperature``), the new ``h`` and ``c``, the decoded frame, the predicted
    reward and ``p(done)``. The page keeps the state, so the server holds none: the dream tab
    plays inside M with the keyboard.

Errors come back as ``{"error": "..."}`` with status 400 or 404 (500, logged, for a bug). The
server binds 127.0.0.1 unless told otherwise, and Ctrl-C stops it cleanly. Bound to a loopback
address, it answers only requests whose ``Host`` is ``127.0.0.1``, ``localhost`` or ``[::1]``
(any port): a web page elsewhere cannot reach it through DNS rebinding.

A client cannot hold the server: each request (its line, headers and body, or the idle wait
for the next request on a kept-alive connection) must arrive within ``request_timeout`` seconds
in all, else the connection is closed; at most ``max_connections`` connections are served at
once (one thread each), and a connection past that bound gets a 503 ``{"error": ...}`` straight
from the accepting thread. A JSON body nested deeper than :data:`MAX_DEPTH` is a 400, found by
a scan before parsing (the parser recurses).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from worldmodel.errors import UserError
from worldmodel.latents import Sample, kl_per_dim, load_inputs, posterior, sample_frames
from worldmodel.media import png_bytes

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader
    from worldmodel.memory import LoadedMemory
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

__all__ = ["MAX_DEPTH", "ApiError", "Explorer", "ExplorerServer", "json_depth", "make_server",
           "serve"]

#: Largest request body accepted (a latent vector as JSON is far smaller).
MAX_BODY = 1 << 20
#: Deepest nesting of arrays and objects accepted in a request body (``{"z": [...]}`` is 2).
MAX_DEPTH = 32
#: ``Host`` headers accepted by a server bound to a loopback address (any port).
LOCAL_HOST = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(:\d{1,5})?", re.IGNORECASE)
#: A JSON escape (``\"``, ``\\``, ...): replaced by two neutral bytes before counting depth.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)


class ApiError(Exception):
    """A request the API refuses: sent back as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the UTF-8 JSON text ``raw``, without parsing it.

    Brackets inside strings do not count. Linear time, no recursion, whatever ``raw`` holds:
    for a valid JSON prefix this is exactly the parser's depth, so the parser (which stops at
    the first error) never goes deeper than this says.
    """
    flat = np.frombuffer(_ESCAPE.sub(b"__", raw), np.uint8)  # escaped quotes gone
    inside = np.cumsum(flat == ord('"'), dtype=np.int32) % 2 == 1  # in a string (or its quote)
    step = np.isin(flat, (ord("["), ord("{"))).astype(np.int32)
    step -= np.isin(flat, (ord("]"), ord("}")))
    step[inside] = 0
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def _png_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class Explorer:
    """What the explorer page asks for, independent of HTTP.

    :param vae: the loaded VAE.
    :param reader: the dataset to browse, or ``None``.
    :param max_frames: frames encoded for the nearest-neighbour index and the slider ranges.
    :param seed: which frames are sampled.
    """

    def __init__(self, vae: LoadedVAE, reader: DatasetReader | None, max_frames: int = 2000,
                 seed: int = 0, memory: LoadedMemory | None = None) -> None:
        self.vae, self.reader, self.memory = vae, reader, memory
        self._lock = threading.Lock()  # one model call / dataset read at a time
        self._episodes: OrderedDict[int, tuple[Any, np.ndarray]] = OrderedDict()
        z = vae.latent_dim
        self.centre, self.std = np.zeros(z, np.float32), np.ones(z, np.float32)
        self.kl: np.ndarray | None = None
        self.mu = np.zeros((0, z), np.float32)
        self._nn: Any = None
        self.sample: Sample | None = None
        if reader is not None:
            self.sample = sample_frames(reader, max_frames, seed)
            post = posterior(vae, self.sample.frames)
            self.mu = post.mu
            self.centre = post.mu.mean(0)
            self.std = np.maximum(post.mu.std(0), 1e-3)
            self.kl = kl_per_dim(post.mu, post.logvar)
            from sklearn.neighbors import NearestNeighbors

            self._nn = NearestNeighbors().fit(self.mu)

    def info(self) -> dict[str, Any]:
        """What the page needs to build its controls."""
        order = (np.argsort(-self.kl, kind="stable") if self.kl is not None
                 else np.arange(self.vae.latent_dim))
        episodes: list[dict[str, Any]] = []
        if self.reader is not None:
            episodes = [{"id": int(e["id"]), "length": int(e["length"]),
                         "return": float(e.get("return", 0.0))}
                        for e in self.reader.episode_index()]
        run_dir = self.vae.run_dir
        return {
            "vae_run": str(run_dir) if run_dir is not None else None,
            "latent_dim": self.vae.latent_dim,
            "image_shape": list(self.vae.image_shape),
            "centre": [float(v) for v in self.centre],
            "std": [float(v) for v in self.std],
            "kl": None if self.kl is None else [float(v) for v in self.kl],
            "order": [int(d) for d in order],
            "range_source": "the dataset sample (mean ± 3 std of mu)" if self.kl is not None
            else "the prior N(0, 1)",
            "episodes": episodes,
            "sample_frames": len(self.mu),
            "dream": None if self.memory is None else {
                "memory_run": str(self.memory.run_dir), "action_space": self.memory.action_space,
                "hidden_size": self.memory.hidden_size, "temperature": self.memory.temperature,
            },
        }

    def _memory(self) -> LoadedMemory:
        if self.memory is None:
            raise ApiError(404, "no memory model: start explore with --memory MEMORY_RUN to "
                                "dream")
        return self.memory

    def _vector(self, value: Any, size: int, name: str) -> np.ndarray:
        try:
            vec = np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise ApiError(400, f"{name} must be a list of numbers") from None
        if vec.shape != (size,) or not np.isfinite(vec).all():
            raise ApiError(400, f"{name} must be {size} finite numbers, got shape "
                                f"{list(vec.shape)}")
        return vec

    def dream_start(self, episode: int | None = None, t: int = 0) -> dict[str, Any]:
        """The dream's start: a dataset frame's latent (or the sample's mean) and zero state."""
        memory = self._memory()
        if episode is None:
            z = self.centre.astype(np.float32)
        else:
            ep, mu = self._episode(int(episode))
            if not 0 <= t < ep.length:
                raise ApiError(404, f"episode {episode} has frames 0..{ep.length - 1}, not {t}")
            z = mu[t]
        zeros = [0.0] * memory.hidden_size
        with self._lock:
            image = self.vae.decode(z[None])[0]
        return {"z": [float(v) for v in z], "h": zeros, "c": list(zeros),
                "image": _png_uri(image)}

    def dream_step(self, z: Any, h: Any, c: Any, action: Any,
                   sample: bool = False) -> dict[str, Any]:
        """One step of M from ``(z, h, c)`` with an env action (see the module docstring)."""
        import torch

        from worldmodel.memory import mixture_mean

        memory = self._memory()
        zv = self._vector(z, memory.latent_dim, "z")
        hv = self._vector(h, memory.hidden_size, "h")
        cv = self._vector(c, memory.hidden_size, "c")
        try:
            a = memory.actions(np.asarray([action]))
        except (UserError, TypeError, ValueError, IndexError, KeyError):
            raise ApiError(400, f"action {action!r} does not fit the action space "
                                f"{memory.action_space}") from None
        if a.shape != (1, memory.action_dim) or not np.isfinite(a).all():
            raise ApiError(400, f"action {action!r} does not fit the action space "
                                f"{memory.action_space}")
        state = (torch.from_numpy(hv)[None, None], torch.from_numpy(cv)[None, None])
        with self._lock:
            out, (h2, c2) = memory.step(zv[None], a, state)
            nxt = memory.sample(out) if sample else mixture_mean(out)
            znext = nxt[0].cpu().numpy()
            image = self.vae.decode(znext[None])[0]
        return {"z": [float(v) for v in znext], "h": [float(v) for v in h2.view(-1)],
                "c": [float(v) for v in c2.view(-1)], "image": _png_uri(image),
                "reward": float(out.reward[0]), "done_prob": float(out.done_prob[0])}

    def decode(self, z: Any) -> dict[str, Any]:
        """Decode one latent vector.

        :param z: ``Z`` numbers.
        :return: ``{"image": PNG data URI}``.
        """
        try:
            vec = np.asarray(z, np.float32)
        except (TypeError, ValueError):
            raise ApiError(400, "z must be a list of numbers") from None
        if vec.shape != (self.vae.latent_dim,) or not np.isfinite(vec).all():
            raise ApiError(400, f"z must be {self.vae.latent_dim} finite numbers, got shape "
                                f"{list(vec.shape)}")
        with self._lock:
            image = self.vae.decode(vec[None])[0]
        return {"image": _png_uri(image)}

    def _episode(self, i: int) -> tuple[Any, np.ndarray]:
        """Episode ``i`` and its latent means (the last few are cached)."""
        if self.reader is None:
            raise ApiError(404, "no dataset: start explore with --data DATA to browse episodes")
        if not 0 <= i < self.reader.num_episodes:
            raise ApiError(404, f"episode {i} out of range (0..{self.reader.num_episodes - 1})")
        with self._lock:
            if i not in self._episodes:
                ep = self.reader.episode(i)
                self._episodes[i] = (ep, self.vae.encode(ep.obs))
                while len(self._episodes) > 4:
                    self._episodes.popitem(last=False)
            self._episodes.move_to_end(i)
            return self._episodes[i]

    def frame(self, episode: int, t: int) -> dict[str, Any]:
        """Frame ``t`` of episode ``episode``, its reconstruction and latent."""
        ep, mu = self._episode(episode)
        if not 0 <= t < ep.length:
            raise ApiError(404, f"episode {episode} has frames 0..{ep.length - 1}, not {t}")
        with self._lock:
            recon = self.vae.decode(mu[t : t + 1])[0]
        state = None if ep.state is None else [float(v) for v in np.ravel(ep.state[t])]
        return {
            "episode": episode, "t": t, "length": ep.length,
            "original": _png_uri(ep.obs[t]), "recon": _png_uri(recon),
            "z": [float(v) for v in mu[t]], "reward": float(ep.reward[t]), "state": state,
        }

    def neighbours(self, episode: int, t: int, k: int = 8) -> dict[str, Any]:
        """The ``k`` sampled frames nearest to frame ``(episode, t)`` in latent space."""
        ep, mu = self._episode(episode)
        if not 0 <= t < ep.length:
            raise ApiError(404, f"episode {episode} has frames 0..{ep.length - 1}, not {t}")
        assert self.sample is not None  # a dataset is open
        k = min(int(k), 64, len(self.mu) - 1)
        if k < 1:
            return {"episode": episode, "t": t, "items": []}
        dist, idx = self._nn.kneighbors(mu[t : t + 1], n_neighbors=k + 1)
        items: list[dict[str, Any]] = []
        for d, i in zip(dist[0], idx[0], strict=True):
            e, s = int(self.sample.episode[i]), int(self.sample.t[i])
            if (e, s) == (episode, t) or len(items) == k:
                continue
            items.append({"episode": e, "t": s, "distance": float(d),
                          "image": _png_uri(self.sample.frames[i])})
        return {"episode": episode, "t": t, "items": items}


class ExplorerServer(ThreadingHTTPServer):
    """The HTTP server; :attr:`explorer` answers the API calls.

    :param address: ``(host, port)``; port 0 picks a free port.
    :param explorer: the state behind the API.
    :param request_timeout: seconds a client has to send each whole request (line, headers,
        body), counted from the end of the previous one; also the socket timeout of every
        read and write. A stalled client is disconnected after this.
    :param max_connections: connections served at once, one thread each; a connection past
        the bound gets an immediate 503 from the accepting thread, no thread of its own.
    """

    daemon_threads = True
    block_on_close = False  # Ctrl-C does not wait for kept-alive browser connections
    request_queue_size = 128  # listen backlog: a burst of connects is accepted, then refused

    def __init__(self, address: tuple[str, int], explorer: Explorer,
                 request_timeout: float = 5.0, max_connections: int = 32) -> None:
        from importlib.resources import files

        if request_timeout <= 0 or max_connections < 1:
            raise ValueError("request_timeout must be > 0 and max_connections >= 1")
        self.explorer = explorer
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._count_lock = threading.Lock()
        #: Connections being served now, and the most served at once so far.
        self.active_connections = self.peak_connections = 0
        #: Connections refused with a 503 so far.
        self.refused_connections = 0
        # Refused sockets, kept open a moment so the client reads the 503 (closing a socket
        # whose request is still arriving resets the connection and loses the answer).
        self._refused: deque[tuple[float, socket.socket]] = deque()
        self.page = files("worldmodel").joinpath("static", "explore.html").read_bytes()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        host = self.server_address[0]
        host = host if isinstance(host, str) else host.decode()
        #: Whether requests must name a local ``Host`` (no DNS rebinding).
        self.local_only = ipaddress.ip_address(host.split("%")[0]).is_loopback

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own, or refuse it (503) past the bound."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._count_lock:
            self.active_connections += 1
            self.peak_connections = max(self.peak_connections, self.active_connections)
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True,
                                  name=f"explore connection :{self.server_address[1]}")
        try:
            thread.start()
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.active_connections -= 1
        self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 without reading the request; close the socket a little later."""
        body = json.dumps({"error": f"server busy: {self.max_connections} connections "
                                    "open already, try again"}).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n")
        with self._count_lock:
            self.refused_connections += 1
        try:
            request.setblocking(False)  # never wait in the accepting thread
            request.send(head.encode() + body)  # a fresh socket's buffer takes it whole
            request.shutdown(socket.SHUT_WR)
        except OSError:
            self.shutdown_request(request)
            return
        self._refused.append((time.monotonic() + 0.5, request))
        while len(self._refused) > 256:  # a flood: close the oldest now
            self._close_refused(self._refused.popleft()[1])
        self.service_actions()

    def _close_refused(self, request: socket.socket) -> None:
        try:
            for _ in range(16):  # the request, so that closing sends no reset (bounded work)
                if not request.recv(65536):
                    break
        except OSError:
            pass
        request.close()

    def service_actions(self) -> None:
        """Close refused sockets whose moment has passed (called by ``serve_forever``)."""
        now = time.monotonic()
        while self._refused and self._refused[0][0] <= now:
            self._close_refused(self._refused.popleft()[1])

    def server_close(self) -> None:
        """Stop listening and close refused sockets (served ones end by their timeout)."""
        super().server_close()
        while self._refused:
            self._close_refused(self._refused.popleft()[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke is a debug line; anything else is logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("explore: connection from %s dropped: %r", client_address, error)
        else:
            log.exception("explore: error serving %s", client_address)

    @property
    def url(self) -> str:
        """Where the page is served."""
        host, port = self.server_address[:2]
        shown = host if isinstance(host, str) else host.decode()
        if shown in ("0.0.0.0", ""):
            shown = "127.0.0.1"
        elif shown == "::":
            shown = "::1"
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def _int_arg(query: dict[str, list[str]], name: str, default: int | None = None) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise ApiError(400, f"missing query parameter {name!r}")
        return default
    try:
        return int(values[0])
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {values[0]!r}") from None


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each allowed only the time left until :attr:`deadline`."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self.sock, self.timeout = sock, timeout
        #: ``time.monotonic()`` by which the current request must have arrived.
        self.deadline = time.monotonic() + timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(min(left, self.timeout))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # writes keep the whole timeout


class _Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """Time out the socket, and read through a :class:`_DeadlineReader`."""
        super().setup()
        timeout = self.server.request_timeout
        self.connection.settimeout(timeout)  # every read and write
        self.rfile.close()  # the socket's own reader: replaced (the socket stays open)
        self._reader = _DeadlineReader(self.connection, timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """Give the next request :attr:`ExplorerServer.request_timeout` to arrive, whole."""
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _answer(self, call: Any) -> None:
        try:
            body = json.dumps(call()).encode()
        except ApiError as e:
            self._json(e.status, {"error": str(e)})
        except UserError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:  # a bug: answer (the page shows it) and log the traceback
            log.exception("explore: %s %s failed", self.command, self.path)
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        else:
            self._send(200, body, "application/json")

    def _host_refused(self) -> bool:
        """Answer 400 when a loopback server gets a request for another host name."""
        host = self.headers.get("Host") or ""
        if not self.server.local_only or LOCAL_HOST.fullmatch(host):
            return False
        self._json(400, {"error": f"unexpected Host header {host!r}: open the page at "
                                  "http://127.0.0.1:PORT/ or http://localhost:PORT/"})
        self.close_connection = True  # a request body, if any, is left unread
        return True

    def do_GET(self) -> None:
        """Serve the page and the read-only API."""
        if self._host_refused():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        ex = self.server.explorer
        if url.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._answer(ex.info)
        elif url.path == "/api/frame":
            self._answer(lambda: ex.frame(_int_arg(query, "episode"), _int_arg(query, "t")))
        elif url.path == "/api/neighbours":
            self._answer(lambda: ex.neighbours(_int_arg(query, "episode"),
                                               _int_arg(query, "t"), _int_arg(query, "k", 8)))
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, {"error": f"no such page {url.path}"})

    def do_POST(self) -> None:
        """Decode a latent vector (``{"z": [...]}`` -> ``{"image": data URI}``), or dream."""
        if self._host_refused():
            return
        path = urlsplit(self.path).path
        if path not in ("/api/decode", "/api/dream/start", "/api/dream/step"):
            self._json(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._json(400, {"error": "expected a JSON body {\"z\": [...]}"})
            self.close_connection = True  # the body, if any, is left unread
            return
        raw = self.rfile.read(length)  # TimeoutError past the deadline: connection closed
        if len(raw) < length:  # the client closed its side early
            self._json(400, {"error": f"body has {len(raw)} bytes, not Content-Length {length}"})
            self.close_connection = True
            return
        if json_depth(raw) > MAX_DEPTH:
            self._json(400, {"error": f"JSON body nested deeper than {MAX_DEPTH} levels"})
            return
        ex = self.server.explorer
        try:
            body = json.loads(raw.decode("utf-8"))
            if path == "/api/dream/start":
                episode = body.get("episode")
                t = int(body.get("t", 0))
                episode = None if episode is None else int(episode)
                self._answer(lambda: ex.dream_start(episode, t))
                return
            if path == "/api/dream/step":
                args = (body["z"], body["h"], body["c"], body["action"])
                sample = bool(body.get("sample", False))
                self._answer(lambda: ex.dream_step(*args, sample=sample))
                return
            z = body["z"]
        except (ValueError, KeyError, TypeError, AttributeError):
            what = "{\"z\": [...]}" if path == "/api/decode" else "of the dream API"
            self._json(400, {"error": f"expected a JSON body {what}"})
            return
        self._answer(lambda: ex.decode(z))

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines go to the debug log, not stderr."""
        log.debug("explore: %s %s", self.address_string(), format % args)


def make_server(
    vae_run: Path,
    data: Path | None,
    host: str = "127.0.0.1",
    port: int = 8765,
    max_frames: int = 2000,
    seed: int = 0,
    request_timeout: float = 5.0,
    max_connections: int = 32,
    memory: Path | None = None,
) -> ExplorerServer:
    """Load the VAE (and dataset), encode a sample and bind the server (not yet serving).

    :param vae_run: a ``worldmodel train-vae`` run folder.
    :param data: a dataset to browse, or ``None`` (sliders only).
    :param host: interface to bind; ``127.0.0.1`` keeps the page local to this machine.
    :param port: TCP port; 0 picks a free one (see :attr:`ExplorerServer.url`).
    :param request_timeout: seconds each request has to arrive whole (see
        :class:`ExplorerServer`).
    :param max_connections: connections served at once; more get a 503.
    :param memory: a ``train-memory`` run on this VAE's weights: the page's dream tab.
    :raises UserError: bad run or dataset, a memory run of other VAE weights, or a port that
        is taken.
    """
    vae, reader = load_inputs(Path(vae_run), None if data is None else Path(data))
    loaded = None
    if memory is not None:
        from worldmodel.dreamviz import check_memory

        loaded = check_memory(Path(memory), vae, Path(vae_run))
    if reader is not None:
        log.info("explore: encoding up to %d frames of %s", max_frames, data)
    explorer = Explorer(vae, reader, max_frames=max_frames, seed=seed, memory=loaded)
    try:
        return ExplorerServer((host, port), explorer, request_timeout=request_timeout,
                              max_connections=max_connections)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another "
                        "--port, or --port 0 for any free one") from e


def serve(vae_run: Path, data: Path | None, host: str = "127.0.0.1", port: int = 8765,
          memory: Path | None = None) -> None:
    """Serve the explorer until Ctrl-C (then shut down cleanly and return).

    :param vae_run: a ``worldmodel train-vae`` run folder.
    :param data: a dataset to browse, or ``None``.
    :param host: interface to bind (``0.0.0.0`` exposes the page to the network).
    :param port: TCP port (0: any free one).
    :param memory: a ``train-memory`` run on this VAE (the dream tab), or ``None``.
    """
    server = make_server(vae_run, data, host, port, memory=memory)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("explore: listening on %s: anyone who can reach this machine can use it",
                    host)
    print(f"explore: serving {server.url} (Ctrl-C to stop)", flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` stops it cleanly too
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("explore: stopped", flush=True)
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

"""The model store: add / list / remove / resolve, pull over real HTTP on loopback, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rentahal.models import registry
from rentahal.models.cli_models import models_app
from rentahal.models.registry import (
    ModelError,
    add_model,
    gguf_layer_count,
    list_models,
    pull,
    remove_model,
    resolve,
)
from rentahal.models.smoke.tiny_llama import write_tiny_llama

WHISPER_MAGIC = struct.pack("<I", 0x67676D6C)


# --- a real HTTP server on 127.0.0.1 ---------------------------------------------------------------
@dataclass
class Behaviour:
    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None  # send this many body bytes of the next GET, then hang up
    stall_after: int | None = None  # send this many body bytes of the next GET, then go silent
    etags: bool = False  # send an ETag (the content's sha256) and honour If-Range
    release: threading.Event = field(default_factory=threading.Event)
    ignore_range: bool = False
    status: dict[str, int] = field(default_factory=dict)  # path -> forced status
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    json: dict[str, Any] = field(default_factory=dict)  # path -> a JSON answer
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    headers: list[dict[str, str]] = field(default_factory=list)
    body_bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(b: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            rng = self.headers.get("Range")
            with b.lock:
                b.requests.append((path, rng))
                b.headers.append(dict(self.headers))
            if path in b.json:  # a hub API answer (huggingface_hub's model_info)
                body = json.dumps(b.json[path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if path in b.redirects:
                self.send_response(302)
                self.send_header("Location", b.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path in b.status or path not in b.files:
                status = b.status.get(path, 404)
                body = b"nope\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            data = b.files[path]
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            if_range = self.headers.get("If-Range")
            if b.etags and if_range is not None and if_range != etag:
                m = None  # RFC 9110: the representation changed, send all of it
            if m and not b.ignore_range:
                start = int(m[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            if b.etags:
                self.send_header("ETag", etag)
            self.end_headers()
            with b.lock:
                drop, b.drop_after = b.drop_after, None
                stall, b.stall_after = b.stall_after, None
            if drop is not None:
                body = body[:drop]
                self.close_connection = True
            if stall is not None:
                self.wfile.write(body[:stall])
                self.wfile.flush()
                with b.lock:
                    b.body_bytes_sent += stall
                b.release.wait(10)
                self.close_connection = True
                return
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                self.wfile.write(piece)
                with b.lock:
                    b.body_bytes_sent += len(piece)
            self.wfile.flush()

    return Handler


@dataclass
class Server:
    url: str
    b: Behaviour


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up early (on a 404, a drop, a timeout) is expected here; socketserver's
    default handle_error prints a traceback to sys.stderr, which CliRunner may be capturing."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server() -> Iterator[Server]:
    b = Behaviour()
    httpd = _QuietServer(("127.0.0.1", 0), _handler(b))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", b)
    finally:
        b.release.set()
        httpd.shutdown()
        httpd.server_close()


def gguf_blob(size: int = 300_000, seed: int = 1) -> bytes:
    import random

    return b"GGUF" + random.Random(seed).randbytes(size - 4)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- pull --------------------------------------------------------------------------------------------
def test_pull_full_download_verified(tmp_path: Path, server: Server) -> None:
    data = gguf_blob()
    server.b.files["/m/Tiny-Chat.Q4.gguf"] = data
    info = pull(tmp_path, "chat", f"{server.url}/m/Tiny-Chat.Q4.gguf", sha256=sha(data).upper())
    assert info.name == "tiny-chat.q4" and info.realm == "chat" and info.format == "gguf"
    assert info.path == tmp_path / "models" / "chat" / "tiny-chat.q4" / "Tiny-Chat.Q4.gguf"
    assert info.path.read_bytes() == data and info.size == len(data) and info.verified
    manifest = json.loads((info.dir / "model.json").read_text())
    assert manifest["files"] == [{"path": "Tiny-Chat.Q4.gguf", "size": len(data), "sha256": sha(data)}]
    assert manifest["source"] == f"{server.url}/m/Tiny-Chat.Q4.gguf"
    assert sorted(p.name for p in info.dir.iterdir()) == ["Tiny-Chat.Q4.gguf", "model.json"]
    assert [m.name for m in list_models(tmp_path, verify=True)] == ["tiny-chat.q4"]
    assert resolve(tmp_path, "chat", "store:tiny-chat.q4") == info.path
    with pytest.raises(ModelError, match="already exists"):
        pull(tmp_path, "chat", f"{server.url}/m/Tiny-Chat.Q4.gguf")


def test_pull_resumes_an_interrupted_download(tmp_path: Path, server: Server) -> None:
    data = gguf_blob(600_000)
    server.b.files["/big.gguf"] = data
    third = len(data) // 3
    server.b.drop_after = third
    with pytest.raises(ModelError, match="resume") as err:
        pull(tmp_path, "chat", f"{server.url}/big.gguf", name="big", sha256=sha(data))
    assert "\n" not in str(err.value)
    part = tmp_path / "models" / "chat" / "big" / "big.gguf.part"
    assert part.stat().st_size == third
    assert list_models(tmp_path) == []
    assert registry.partial_downloads(tmp_path) == [("chat", "big", third, f"{server.url}/big.gguf")]

    info = pull(tmp_path, "chat", f"{server.url}/big.gguf", name="big", sha256=sha(data))
    assert server.b.requests[-1] == ("/big.gguf", f"bytes={third}-")
    assert server.b.body_bytes_sent == len(data) < 2 * len(data)
    assert info.path.read_bytes() == data and not part.exists()
    assert registry.partial_downloads(tmp_path) == []


def test_pull_stalled_then_resumed(tmp_path: Path, server: Server) -> None:
    data = gguf_blob(500_000, seed=3)
    server.b.files["/s.gguf"] = data
    server.b.stall_after = 200_000
    with pytest.raises(ModelError, match="stalled for 0.5s; run the pull again to resume"):
        pull(tmp_path, "chat", f"{server.url}/s.gguf", timeout=0.5)
    server.b.release.set()
    info = pull(tmp_path, "chat", f"{server.url}/s.gguf", sha256=sha(data), timeout=5)
    assert server.b.requests[-1] == ("/s.gguf", "bytes=200000-") and info.path.read_bytes() == data


def test_pull_resume_of_a_changed_file_starts_again(tmp_path: Path, server: Server) -> None:
    """If-Range: the server sends the whole new file when the one resumed has changed."""
    server.b.etags = True
    old, new = gguf_blob(300_000, seed=1), gguf_blob(300_000, seed=2)
    server.b.files["/c.gguf"] = old
    server.b.drop_after = 100_000
    with pytest.raises(ModelError):
        pull(tmp_path, "chat", f"{server.url}/c.gguf")
    server.b.files["/c.gguf"] = new
    info = pull(tmp_path, "chat", f"{server.url}/c.gguf")
    assert server.b.headers[-1]["If-Range"] == f'"{sha(old)}"' and server.b.headers[-1]["Range"] == "bytes=100000-"
    assert info.path.read_bytes() == new and info.files[0].sha256 == sha(new)


def test_pull_of_another_source_under_the_same_name_starts_again(tmp_path: Path, server: Server) -> None:
    a, b = gguf_blob(300_000, seed=4), gguf_blob(300_000, seed=5)
    server.b.files["/a/m.gguf"], server.b.files["/b/m.gguf"] = a, b
    server.b.drop_after = 100_000
    with pytest.raises(ModelError):
        pull(tmp_path, "chat", f"{server.url}/a/m.gguf", name="m")
    info = pull(tmp_path, "chat", f"{server.url}/b/m.gguf", name="m")
    assert server.b.requests[-1] == ("/b/m.gguf", None)
    assert info.path.read_bytes() == b and info.source == f"{server.url}/b/m.gguf"
    assert sorted(p.name for p in info.dir.iterdir()) == ["m.gguf", "model.json"]


def test_pull_sha256_mismatch_discards(tmp_path: Path, server: Server) -> None:
    data = gguf_blob()
    server.b.files["/x.gguf"] = data
    wrong = "0" * 64
    with pytest.raises(ModelError) as err:
        pull(tmp_path, "chat", f"{server.url}/x.gguf", sha256=wrong)
    msg = str(err.value)
    assert wrong in msg and sha(data) in msg and "\n" not in msg
    assert list_models(tmp_path) == []
    assert not (tmp_path / "models" / "chat" / "x").exists()
    with pytest.raises(ModelError, match="64 hex"):
        pull(tmp_path, "chat", f"{server.url}/x.gguf", sha256="abc")


def test_pull_http_error(tmp_path: Path, server: Server) -> None:
    url = f"{server.url}/missing.gguf"
    with pytest.raises(ModelError) as err:
        pull(tmp_path, "chat", url)
    assert "404" in str(err.value) and url in str(err.value)
    server.b.files["/busy.gguf"] = gguf_blob()
    server.b.status["/busy.gguf"] = 503
    with pytest.raises(ModelError, match="HTTP 503"):
        pull(tmp_path, "chat", f"{server.url}/busy.gguf")
    assert list_models(tmp_path) == [] and not (tmp_path / "models" / "chat" / "missing").exists()


def test_pull_server_ignoring_range_restarts(tmp_path: Path, server: Server) -> None:
    data = gguf_blob(400_000, seed=7)
    server.b.files["/r.gguf"] = data
    server.b.drop_after = 100_000
    with pytest.raises(ModelError):
        pull(tmp_path, "chat", f"{server.url}/r.gguf", sha256=sha(data))
    server.b.ignore_range = True
    seen: list[tuple[int, int | None]] = []
    info = pull(tmp_path, "chat", f"{server.url}/r.gguf", sha256=sha(data), progress=lambda d, t: seen.append((d, t)))
    assert server.b.requests[-1] == ("/r.gguf", "bytes=100000-")  # asked to resume, got a 200
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert info.path.read_bytes() == data and info.verified


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(server: Server, files: dict[str, bytes], *, revision: str = "main", commit: str = COMMIT) -> None:
    """owner/repo on the test hub: what huggingface_hub's model_info reads, and the files at the commit."""
    server.b.json[f"/api/models/owner/repo/revision/{revision}"] = {
        "id": "owner/repo", "sha": commit, "siblings": [{"rfilename": name} for name in files],
    }  # fmt: skip
    for name, data in files.items():
        server.b.files[f"/owner/repo/resolve/{commit}/{name}"] = data


def test_pull_hub_id_pins_the_revision(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    data = WHISPER_MAGIC + b"\x00" * 5000
    hub_repo(server, {"sub/ggml-tiny.en.bin": data, "README.md": b"hi"})
    monkeypatch.setenv("RENTAHAL_HUB_URL", server.url + "/")
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    ref = "hf:owner/repo/sub/ggml-tiny.en.bin"
    info = pull(tmp_path, "speech", ref, sha256=sha(data))
    assert info.name == "ggml-tiny.en" and info.format == "ggml-whisper" and info.source == ref
    # The file was fetched at the commit "main" named when the pull asked, and that is recorded.
    assert server.b.requests[-1][0] == f"/owner/repo/resolve/{COMMIT}/sub/ggml-tiny.en.bin"
    assert json.loads((info.dir / "model.json").read_text())["revision"] == COMMIT
    assert server.b.headers[-1].get("Authorization") == "Bearer secret-token"
    assert resolve(tmp_path, "speech", ref) == info.path
    with pytest.raises(ModelError, match="bad hub id"):
        pull(tmp_path, "speech", "hf:owner/repo")
    with pytest.raises(ModelError, match="no file sub/other.bin in owner/repo at main"):
        pull(tmp_path, "speech", "hf:owner/repo/sub/other.bin")
    with pytest.raises(ModelError, match="has no owner/repo at v9"):
        pull(tmp_path, "speech", "hf:owner/repo/sub/ggml-tiny.en.bin@v9", name="v9")
    # An LFS file redirects to another host (a CDN): the token stays with the hub.
    hub_repo(server, {"big.bin": b""}, revision="lfs", commit="e" * 40)
    cdn = server.url.replace("127.0.0.1", "localhost") + "/cdn/big.bin"
    server.b.redirects[f"/owner/repo/resolve/{'e' * 40}/big.bin"] = cdn
    server.b.files["/cdn/big.bin"] = data
    pull(tmp_path, "speech", "hf:owner/repo/big.bin@lfs", name="lfs")
    assert server.b.requests[-1][0] == "/cdn/big.bin" and "Authorization" not in server.b.headers[-1]
    assert server.b.headers[-2].get("Authorization") == "Bearer secret-token"  # the hub's own answer
    hub_repo(server, {"sub/ggml-tiny.en.bin": data}, revision="v1", commit="f" * 40)
    pinned = pull(tmp_path, "speech", "hf:owner/repo/sub/ggml-tiny.en.bin@v1", name="v1")
    assert server.b.requests[-1][0] == f"/owner/repo/resolve/{'f' * 40}/sub/ggml-tiny.en.bin" and pinned.verified


def test_pull_progress_increases_to_total(tmp_path: Path, server: Server) -> None:
    data = gguf_blob(1_000_000)
    server.b.files["/p.gguf"] = data
    seen: list[tuple[int, int | None]] = []
    pull(tmp_path, "chat", f"{server.url}/p.gguf", progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert len(seen) > 2 and done == sorted(done) and done[0] == 0
    assert seen[-1] == (len(data), len(data)) and {t for _, t in seen} == {len(data)}


def test_pull_redirects(tmp_path: Path, server: Server) -> None:
    data = gguf_blob()
    server.b.files["/real.gguf"] = data
    server.b.redirects["/go.gguf"] = "/real.gguf"
    server.b.redirects["/evil.gguf"] = "file:///etc/passwd"
    info = pull(tmp_path, "chat", f"{server.url}/go.gguf", sha256=sha(data))
    assert info.path.read_bytes() == data
    with pytest.raises(ModelError, match="only http"):
        pull(tmp_path, "chat", f"{server.url}/evil.gguf")


def test_pull_refusals(tmp_path: Path, server: Server) -> None:
    server.b.files["/page.gguf"] = b"<html>sign in</html>" * 100
    with pytest.raises(ModelError, match="not a GGUF file"):
        pull(tmp_path, "chat", f"{server.url}/page.gguf")
    assert not (tmp_path / "models" / "chat" / "page").exists()
    for bad in ("ftp://example.org/x.gguf", "file:///etc/passwd", "x.gguf"):
        with pytest.raises(ModelError, match="http"):
            pull(tmp_path, "chat", bad)
    with pytest.raises(ModelError, match="diffusers"):
        pull(tmp_path, "imagine", f"{server.url}/sd.bin")
    with pytest.raises(ModelError, match="unknown realm"):
        pull(tmp_path, "audio", f"{server.url}/a.gguf")
    with pytest.raises(ModelError, match="bad model name"):
        pull(tmp_path, "chat", f"{server.url}/a.gguf", name="Bad Name")


def test_pull_part_already_whole(tmp_path: Path, server: Server) -> None:
    """A crash after the last byte but before the rename: the 416 answer finishes the pull."""
    data = gguf_blob()
    server.b.files["/w.gguf"] = data
    folder = tmp_path / "models" / "chat" / "w"
    folder.mkdir(parents=True)
    (folder / "w.gguf.part").write_bytes(data)
    info = pull(tmp_path, "chat", f"{server.url}/w.gguf", sha256=sha(data))
    assert server.b.body_bytes_sent == 0 and info.path.read_bytes() == data


# --- add / list / remove / resolve ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "Tiny-Llama.gguf")


def test_add_copy_list_remove(tmp_path: Path, tiny_gguf: Path) -> None:
    data_dir = tmp_path / "home"
    info = add_model(data_dir, "chat", "tiny", tiny_gguf)
    assert info.format == "gguf" and info.verified and info.source == str(tiny_gguf)
    assert info.path == data_dir / "models" / "chat" / "tiny" / "Tiny-Llama.gguf"
    assert not info.path.is_symlink() and info.path.read_bytes() == tiny_gguf.read_bytes()
    assert info.files[0].sha256 == sha(tiny_gguf.read_bytes()) and info.size == tiny_gguf.stat().st_size
    assert gguf_layer_count(info.path) == 2
    assert [(m.realm, m.name, m.verified) for m in list_models(data_dir)] == [("chat", "tiny", True)]
    assert resolve(data_dir, "chat", "store:tiny") == info.path
    remove_model(data_dir, "chat", "tiny")
    assert list_models(data_dir) == [] and tiny_gguf.exists()
    assert not any((data_dir / "models" / "chat").iterdir())  # no staging or trash left behind
    with pytest.raises(ModelError, match="no chat model 'tiny'"):
        remove_model(data_dir, "chat", "tiny")


def test_add_link(tmp_path: Path, tiny_gguf: Path) -> None:
    src = tmp_path / "keep.gguf"
    src.write_bytes(tiny_gguf.read_bytes())
    info = add_model(tmp_path, "chat", "linked", src, link=True)
    assert info.path.is_symlink() and info.path.resolve() == src.resolve() and info.linked
    remove_model(tmp_path, "chat", "linked")
    assert src.exists()


def test_pull_a_diffusers_folder_from_the_hub(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """imagine models are folders: every file of the repo's folder, at one commit."""
    monkeypatch.setenv("RENTAHAL_HUB_URL", server.url + "/")
    files = {
        "sd/model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "sd/unet/config.json": b"{}",
        "sd/unet/diffusion_pytorch_model.safetensors": b"\x00" * 4096,
        "README.md": b"a card",
        "sd/sample.png": b"picture",
        "other/model_index.json": b"{}",
    }
    hub_repo(server, files)
    info = pull(tmp_path, "imagine", "hf:owner/repo/sd", name="tiny-sd")
    assert info.format == "diffusers" and info.verified and info.source == "hf:owner/repo/sd"
    assert sorted(f.path for f in info.files) == [
        "tiny-sd/model_index.json", "tiny-sd/unet/config.json", "tiny-sd/unet/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert json.loads((info.dir / "model.json").read_text())["revision"] == COMMIT
    assert resolve(tmp_path, "imagine", "store:tiny-sd") == info.path
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".pull-")]  # staging gone
    with pytest.raises(ModelError, match="not a diffusers pipeline"):
        pull(tmp_path, "imagine", "hf:owner/repo/sd/unet", name="unet-only")


def test_add_folder_formats(tmp_path: Path, tiny_gguf: Path) -> None:
    sd = tmp_path / "sd-tiny"
    (sd / "unet").mkdir(parents=True)
    (sd / "model_index.json").write_text("{}")
    (sd / "unet" / "config.json").write_text("{}")
    (sd / ".cache").mkdir()
    (sd / ".cache" / "junk").write_text("x")
    info = add_model(tmp_path, "imagine", "sd-tiny", sd)
    assert info.format == "diffusers" and info.path == info.dir / "sd-tiny" and info.path.is_dir()
    assert sorted(f.path for f in info.files) == ["sd-tiny/model_index.json", "sd-tiny/unet/config.json"]
    assert resolve(tmp_path, "imagine", "store:sd-tiny") == info.path

    vision = tmp_path / "llava"
    vision.mkdir()
    (vision / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    (vision / "mmproj-f16.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    v = add_model(tmp_path, "vision", "llava", vision)
    assert v.format == "gguf+mmproj" and v.path.name == "model.gguf" and v.mmproj and v.mmproj.name == "mmproj-f16.gguf"
    assert registry.get_model(tmp_path, "vision", "llava").mmproj == v.mmproj

    whisper = tmp_path / "ggml-tiny.bin"
    whisper.write_bytes(WHISPER_MAGIC + b"\x01" * 100)
    w = add_model(tmp_path, "speech", "tiny-en", whisper)
    assert w.format == "ggml-whisper"
    assert [(m.realm, m.name) for m in list_models(tmp_path)] == [
        ("vision", "llava"),
        ("imagine", "sd-tiny"),
        ("speech", "tiny-en"),
    ]


def test_add_refusals(tmp_path: Path, tiny_gguf: Path) -> None:
    add_model(tmp_path, "chat", "tiny", tiny_gguf)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    whisper = tmp_path / "w.bin"
    whisper.write_bytes(WHISPER_MAGIC + b"\x00" * 10)
    no_index = tmp_path / "not-sd"
    no_index.mkdir()
    (no_index / "unet.bin").write_bytes(b"x")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(tiny_gguf.read_bytes())
    (two / "b.gguf").write_bytes(tiny_gguf.read_bytes())
    proj = tmp_path / "mmproj-model.gguf"
    proj.write_bytes(b"GGUF" + b"\x00" * 64)
    cases = [
        (("chat", "tiny", tiny_gguf), "already exists"),
        (("audio", "x", tiny_gguf), "unknown realm"),
        (("chat", "x", tmp_path / "nope.gguf"), "no such file"),
        (("chat", "x", junk), "not a model file"),
        (("chat", "x", whisper), "a chat model must be a GGUF file"),
        (("speech", "x", tiny_gguf), "a speech model must be a whisper.cpp ggml"),
        (("imagine", "x", tiny_gguf), "must be a diffusers folder"),
        (("imagine", "x", no_index), "no model found"),
        (("chat", "x", two), "several model GGUFs"),
        (("chat", "x", proj), "projector"),
    ]
    for name in ("", "Tiny", "-x", ".x", "a/b", "..", "x" * 65, "a b", "é"):
        cases.append((("chat", name, tiny_gguf), "bad model name"))
    for args, match in cases:
        with pytest.raises(ModelError, match=match) as err:
            add_model(tmp_path, *args)
        assert "\n" not in str(err.value), args
    assert [m.name for m in list_models(tmp_path)] == ["tiny"]
    assert sorted(p.name for p in (tmp_path / "models" / "chat").iterdir()) == ["tiny"]


def test_list_reports_damage(tmp_path: Path, tiny_gguf: Path) -> None:
    a = add_model(tmp_path, "chat", "a", tiny_gguf)
    b = add_model(tmp_path, "chat", "b", tiny_gguf)
    c = add_model(tmp_path, "chat", "c", tiny_gguf)
    raw = bytearray(b.path.read_bytes())
    raw[-1] ^= 0xFF
    b.path.write_bytes(bytes(raw))  # same size, different bytes: only a full verify sees it
    c.path.unlink()
    (tmp_path / "models" / "chat" / "d").mkdir()
    (tmp_path / "models" / "chat" / "d" / "model.json").write_text("{not json")
    (tmp_path / "models" / "smoke-test").mkdir()  # the executor's smoke-test models are not listed
    quick = {m.name: m for m in list_models(tmp_path)}
    assert quick["a"].verified and quick["b"].verified
    assert not quick["c"].verified and "missing" in (quick["c"].problem or "")
    assert not quick["d"].verified and "unreadable" in (quick["d"].problem or "")
    full = {m.name: m for m in list_models(tmp_path, verify=True)}
    assert full["a"].verified and not full["b"].verified and "sha256" in (full["b"].problem or "")
    with pytest.raises(ModelError, match="damaged"):
        resolve(tmp_path, "chat", "store:c")
    assert a.path.exists()


def test_resolve(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve(tmp_path, "chat", "") is None
    assert resolve(tmp_path, "chat", str(tiny_gguf)) == tiny_gguf
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    assert resolve(tmp_path, "chat", "mine.gguf") == tmp_path / "mine.gguf"  # relative to the data dir
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve(tmp_path, "chat", "~/mine.gguf") == tmp_path / "mine.gguf"
    cases = [
        ("nope.gguf", "no such file"),
        ("store:ghost", "no chat model 'ghost'"),
        ("store:Bad!", "bad model name"),
        ("hf:o/r/f.gguf", "models pull chat hf:o/r/f.gguf"),
        ("hf:o/r", "bad hub id"),
        ("https://example.org/m.gguf", "pull"),
    ]
    for ref, match in cases:
        with pytest.raises(ModelError, match=re.escape(match)) as err:
            resolve(tmp_path, "chat", ref)
        assert str(err.value).startswith(f"realms.chat.model = {ref!r}: ") and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="unknown realm"):
        resolve(tmp_path, "audio", "x")


def test_hub_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RENTAHAL_HUB_URL", raising=False)
    assert registry.hub_url("hf:TheBloke/Some-GGUF/q4/model name.gguf") == (
        "https://huggingface.co/TheBloke/Some-GGUF/resolve/main/q4/model%20name.gguf"
    )


def test_gguf_metadata_never_raises(tmp_path: Path) -> None:
    for i, blob in enumerate([b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, os.urandom(200)]):
        p = tmp_path / f"{i}.gguf"
        p.write_bytes(blob)
        assert registry.gguf_metadata(p) == {} and gguf_layer_count(p) is None


# --- the CLI sub-app -------------------------------------------------------------------------------
def test_cli(tmp_path: Path, tiny_gguf: Path, server: Server) -> None:
    runner = CliRunner()
    home = str(tmp_path / "home")
    r = runner.invoke(models_app, ["list", "--json", "--data-dir", home])
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    r = runner.invoke(models_app, ["list"], env={"RENTAHAL_HOME": home})
    assert r.exit_code == 0 and "no models" in r.stderr

    r = runner.invoke(models_app, ["add", "chat", str(tiny_gguf), "--data-dir", home])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "store:tiny-llama"
    r = runner.invoke(models_app, ["list", "--json"], env={"RENTAHAL_HOME": home})
    rows = json.loads(r.stdout)
    assert [(m["realm"], m["name"], m["format"], m["verified"]) for m in rows] == [("chat", "tiny-llama", "gguf", True)]
    r = runner.invoke(models_app, ["list", "--data-dir", home])
    assert "tiny-llama" in r.stdout and "yes" in r.stdout

    data = gguf_blob()
    server.b.files["/pulled.gguf"] = data
    r = runner.invoke(
        models_app, ["pull", "chat", f"{server.url}/pulled.gguf", "--sha256", sha(data), "--data-dir", home]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "store:pulled" and sha(data) in r.stderr

    r = runner.invoke(models_app, ["remove", "chat", "tiny-llama", "--data-dir", home])
    assert r.exit_code == 0
    r = runner.invoke(models_app, ["list", "--json", "--data-dir", home])
    assert [m["name"] for m in json.loads(r.stdout)] == ["pulled"]

    for args in (
        ["remove", "chat", "tiny-llama"],
        ["add", "chat", str(tmp_path / "missing.gguf")],
        ["add", "audio", str(tiny_gguf), "--name", "x"],
        ["pull", "chat", f"{server.url}/absent.gguf"],
    ):
        r = runner.invoke(models_app, [*args, "--data-dir", home])
        assert r.exit_code == 2, (args, r.output)
        assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr

    r = runner.invoke(models_app, ["gpus", "--json", "--data-dir", home])
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout)["gpus"], list)

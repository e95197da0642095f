"""The model store: models per realm under ``<data dir>/models/<realm>/<name>/``.

Each model is a folder holding its files and a ``model.json`` manifest::

    {"schema": 1, "name": "tinyllama", "realm": "chat", "format": "gguf",
     "source": "hf:owner/repo/file.gguf", "added_at": "2025-01-01T00:00:00Z",
     "entry": "file.gguf", "mmproj": null, "linked": false,
     "files": [{"path": "file.gguf", "size": 123, "sha256": "..."}]}

The manifest is written last: a folder without one is an unfinished ``pull`` (its ``.part``
file is resumed by the next pull of the same name) or an interrupted ``add``, never a model.

``entry`` is what a backend loads (the ``.gguf`` or whisper file, or the diffusers folder);
``mmproj`` is a vision model's projector, when the model came as a folder with one.

Formats are checked by content, not by name: GGUF (magic ``GGUF``), a diffusers folder
(``model_index.json``), a whisper.cpp ggml file (magic 0x67676d6c, little-endian), and a
vision folder with a model GGUF plus its ``mmproj`` projector GGUF (``gguf+mmproj``).

Everything here is synchronous file and network I/O: the CLI calls it directly, the node calls
it in a worker thread. Every failure is a :class:`ModelError` whose ``str()`` is one line.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..realms.catalog import CATALOG, REALMS

FORMATS = ("gguf", "diffusers", "ggml-whisper", "gguf+mmproj")
# What each realm's store takes, from its catalog entry (realms/catalog.py).
REALM_FORMATS: dict[str, tuple[str, ...]] = {name: r.store_formats for name, r in CATALOG.items()}
FORMAT_WORDS = {
    "gguf": "a GGUF file",
    "gguf+mmproj": "a folder with a model GGUF and its mmproj projector GGUF",
    "diffusers": "a diffusers folder (with model_index.json)",
    "ggml-whisper": "a whisper.cpp ggml model file",
}
MANIFEST = "model.json"
SCHEMA = 1
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
GGUF_MAGIC = b"GGUF"
GGML_MAGIC = struct.pack("<I", 0x67676D6C)  # b"lmgg"
DEFAULT_HUB_URL = "https://huggingface.co"
HUB_ENV = "RENTAHAL_HUB_URL"
HUB_TOKEN_ENV = "HF_TOKEN"  # sent to the hub's own host only, never to a redirect target
MAX_REDIRECTS = 10
CHUNK = 1024 * 1024
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

Progress = Callable[[int, "int | None"], None]


class ModelError(Exception):
    """A model store operation failed; ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model's folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """A model in the store. ``path`` is what a backend loads (file, or folder for diffusers)."""

    name: str
    realm: str
    path: Path
    size: int
    format: str
    source: str
    verified: bool  # the files match the manifest (sizes; digests too when listed with verify)
    dir: Path = field(default=Path())
    mmproj: Path | None = None
    added_at: str = ""
    linked: bool = False
    files: tuple[ModelFile, ...] = ()
    problem: str | None = None  # why it is not verified

    @property
    def ref(self) -> str:
        """What to write in node.toml's ``realms.<realm>.model`` to serve it."""
        return f"store:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "realm": self.realm,
            "ref": self.ref,
            "path": str(self.path),
            "mmproj": str(self.mmproj) if self.mmproj else None,
            "size": self.size,
            "format": self.format,
            "source": self.source,
            "added_at": self.added_at,
            "linked": self.linked,
            "verified": self.verified,
            "problem": self.problem,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


# --- names, realms, folders ----------------------------------------------------------------------
def store_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "models"


def _check_realm(realm: str) -> None:
    if realm not in REALMS:
        raise ModelError(f"unknown realm {realm!r}; expected one of {', '.join(REALMS)}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelError(f"bad model name {name!r}: use 1-64 characters a-z 0-9 . _ -, starting with a letter or digit")


def default_name(source: str) -> str:
    """A store name from a file name, path, URL or hub id ("Llama-3.2-1B.Q4_K_M.gguf" ->
    "llama-3.2-1b.q4_k_m"); "" when nothing usable is left."""
    base = source.strip().rstrip("/\\")
    if "://" in base:
        base = unquote(urlsplit(base).path).rstrip("/")
    base = re.split(r"[/\\:]", base)[-1]
    split = _SPLIT_RE.search(base)
    if split:
        base = base[: split.start()]
    else:
        stem, dot, ext = base.rpartition(".")
        if dot and ext.lower() in ("gguf", "bin", "ggml", "safetensors", "ckpt"):
            base = stem
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).lstrip("._-")[:64]
    return name if NAME_RE.fullmatch(name) else ""


def _model_dir(data_dir: Path, realm: str, name: str) -> Path:
    _check_realm(realm)
    _check_name(name)
    return store_dir(data_dir) / realm / name


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _oserr(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _lock(folder: Path, what: str) -> Iterator[None]:
    """An exclusive, non-blocking lock on a model folder (one pull or removal at a time)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelError(f"a pull of {what} is running") from None
        yield
    finally:
        os.close(fd)


# --- content checks --------------------------------------------------------------------------------
def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({_oserr(exc)})") from None


def file_format(path: Path) -> str | None:
    """The format of a single model file by its first bytes: "gguf", "ggml-whisper" or None."""
    magic = _magic(path)
    if magic == GGUF_MAGIC:
        return "gguf"
    if magic == GGML_MAGIC:
        return "ggml-whisper"
    return None


def gguf_metadata(path: Path, *, max_kv: int = 4096) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file, read by gguf's own GGUFReader (memory-mapped:
    tensors are not read); arrays are left out. ``max_kv`` bounds the entries kept. Never raises:
    {} when the file is not a GGUF the reader can parse."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path, "r")
        out: dict[str, Any] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or not field.types or field.types[0] is GGUFValueType.ARRAY:
                continue
            out[name] = field.contents()
            if len(out) >= max_kv:
                break
        return out
    except Exception:  # a truncated or hostile file: the reader raises ValueError, IndexError, ...
        return {}


def gguf_layer_count(path: Path) -> int | None:
    """``<arch>.block_count`` of a GGUF model (its number of layers), or None."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    count = meta.get(f"{arch}.block_count") if isinstance(arch, str) else None
    if count is None:
        count = next((v for k, v in meta.items() if k.endswith(".block_count")), None)
    return int(count) if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _is_mmproj(path: Path) -> bool:
    if "mmproj" in path.name.lower():
        return True
    return gguf_metadata(path).get("general.architecture") == "clip"


def _visible(folder: Path) -> list[Path]:
    """The files of a folder (recursively, following links; dotfiles and dot-folders skipped)."""
    out: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def detect_format(source: Path) -> tuple[str, str, str | None]:
    """(format, entry, mmproj) of a file or folder by content; entry and mmproj are relative to
    ``source`` ("" = the source itself). Raises ModelError when it is no model format known."""
    if source.is_file():
        fmt = file_format(source)
        if fmt is None:
            raise ModelError(f"{source}: not a model file this node knows (neither GGUF nor whisper ggml)")
        return fmt, "", None
    if not source.is_dir():
        raise ModelError(f"{source}: not a file or folder")
    if (source / "model_index.json").is_file():
        return "diffusers", "", None
    ggufs = [p for p in _visible(source) if p.suffix.lower() == ".gguf" and file_format(p) == "gguf"]
    projectors = [p for p in ggufs if _is_mmproj(p)]
    models = [p for p in ggufs if p not in projectors]
    if len(projectors) > 1:
        raise ModelError(f"{source}: holds {len(projectors)} mmproj projector GGUFs; keep one")
    if len(models) > 1:
        firsts = [p for p in models if (m := _SPLIT_RE.search(p.name)) and int(m[1]) == 1]
        if len(firsts) == 1 and all(_SPLIT_RE.search(p.name) for p in models):
            models = firsts  # a split GGUF: llama.cpp loads it by its first part
        else:
            names = ", ".join(p.name for p in models[:4]) + (", ..." if len(models) > 4 else "")
            raise ModelError(f"{source}: holds several model GGUFs ({names}); add the one you want")
    if models:
        entry = models[0].relative_to(source).as_posix()
        if projectors:
            return "gguf+mmproj", entry, projectors[0].relative_to(source).as_posix()
        return "gguf", entry, None
    whispers = [p for p in _visible(source) if file_format(p) == "ggml-whisper"]
    if len(whispers) == 1:
        return "ggml-whisper", whispers[0].relative_to(source).as_posix(), None
    raise ModelError(f"{source}: no model found in this folder (no model_index.json, no GGUF, no whisper ggml file)")


def _check_realm_format(realm: str, fmt: str, what: str) -> None:
    if fmt not in REALM_FORMATS[realm]:
        want = " or ".join(FORMAT_WORDS[f] for f in REALM_FORMATS[realm])
        raise ModelError(f"{what} is {FORMAT_WORDS[fmt]}, but a {realm} model must be {want}")


# --- manifests and listing -------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _inside(folder: Path, rel: str) -> Path | None:
    """``folder / rel`` if ``rel`` is a plain relative path (no "..", not absolute)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        return None
    return folder / rel


def _load(folder: Path, realm: str, *, verify: bool = False) -> ModelInfo:
    name = folder.name
    try:
        data = json.loads((folder / MANIFEST).read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
        files = tuple(ModelFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data.get("files", []))
        fmt, source = str(data["format"]), str(data.get("source", ""))
        entry, mmproj = str(data.get("entry", "")), data.get("mmproj")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return ModelInfo(
            name, realm, folder, 0, "unknown", "", False, dir=folder, problem=f"unreadable {MANIFEST} ({exc})"
        )
    problem = None
    for f in files:
        path = _inside(folder, f.path)
        try:
            if path is None:
                problem = f"bad file path {f.path!r} in {MANIFEST}"
            elif not path.is_file():
                problem = f"file missing: {f.path}"
            elif path.stat().st_size != f.size:
                problem = f"file changed: {f.path} is {path.stat().st_size} bytes, expected {f.size}"
            elif verify and _sha256_file(path) != f.sha256:
                problem = f"file changed: {f.path} does not match its sha256"
        except OSError as exc:
            problem = f"cannot read {f.path} ({_oserr(exc)})"
        if problem:
            break
    entry_path = _inside(folder, entry) if entry else folder
    if entry_path is None:
        entry_path, problem = folder, problem or f"bad entry {entry!r} in {MANIFEST}"
    mmproj_path = _inside(folder, str(mmproj)) if mmproj else None
    return ModelInfo(
        name=name,
        realm=realm,
        path=entry_path,
        size=sum(f.size for f in files),
        format=fmt,
        source=source,
        verified=problem is None,
        dir=folder,
        mmproj=mmproj_path,
        added_at=str(data.get("added_at", "")),
        linked=bool(data.get("linked", False)),
        files=files,
        problem=problem,
    )


def list_models(data_dir: Path, *, verify: bool = False) -> list[ModelInfo]:
    """Every model in the store, by realm then name. ``verify`` re-hashes every file (slow for
    big models); without it a model is verified when its files exist with the recorded sizes."""
    out: list[ModelInfo] = []
    for realm in REALMS:
        folder = store_dir(data_dir) / realm
        if not folder.is_dir():
            continue
        for sub in sorted(folder.iterdir()):
            if sub.name.startswith(".") or not sub.is_dir() or not (sub / MANIFEST).exists():
                continue
            out.append(_load(sub, realm, verify=verify))
    return out


def get_model(data_dir: Path, realm: str, name: str, *, verify: bool = False) -> ModelInfo:
    """One model of the store; ModelError when there is none of that name."""
    folder = _model_dir(data_dir, realm, name)
    if not (folder / MANIFEST).exists():
        raise ModelError(f"no {realm} model {name!r} in the store ({folder.parent})")
    return _load(folder, realm, verify=verify)


# --- add and remove --------------------------------------------------------------------------------
def _refuse_existing(folder: Path, realm: str, name: str) -> None:
    if (folder / MANIFEST).exists():
        raise ModelError(f"a {realm} model named {name!r} already exists; remove it first or choose another name")


def _copy_hashing(src: Path, dst: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, h.hexdigest()


def add_model(data_dir: Path, realm: str, name: str, source_path: Path | str, *, link: bool = False) -> ModelInfo:
    """Copy (or, with ``link``, symlink) a local model file or folder into the store."""
    folder = _model_dir(data_dir, realm, name)
    _refuse_existing(folder, realm, name)
    source = Path(source_path).expanduser()
    if not source.exists():
        raise ModelError(f"{source}: no such file or folder")
    source = source.resolve()
    if folder.exists():
        raise ModelError(
            f"{folder} exists without a manifest (an unfinished pull?); "
            f"remove it with: rentahal-node models remove {realm} {name}"
        )
    fmt, entry, mmproj = detect_format(source)
    _check_realm_format(realm, fmt, str(source))
    if fmt == "gguf":
        target = source / entry if entry else source
        if _is_mmproj(target):
            raise ModelError(f"{target}: is a multimodal projector (mmproj), not a {realm} model")
    base = source.name
    if base == MANIFEST or base.startswith("."):
        base = "_" + base.lstrip(".")
    stage = folder.parent / f".{name}.add-{secrets.token_hex(4)}"
    files: list[ModelFile] = []
    try:
        stage.mkdir(parents=True)
        dest = stage / base
        if link:
            dest.symlink_to(source, target_is_directory=source.is_dir())
        if source.is_file():
            if link:
                size, digest = source.stat().st_size, _sha256_file(source)
            else:
                size, digest = _copy_hashing(source, dest)
            files.append(ModelFile(base, size, digest))
        else:
            for path in _visible(source):
                rel = path.relative_to(source)
                if link:
                    size, digest = path.stat().st_size, _sha256_file(path)
                else:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    size, digest = _copy_hashing(path, dest / rel)
                files.append(ModelFile(f"{base}/{rel.as_posix()}", size, digest))
        manifest = {
            "schema": SCHEMA,
            "name": name,
            "realm": realm,
            "format": fmt,
            "source": str(source),
            "added_at": _now(),
            "entry": f"{base}/{entry}" if entry else base,
            "mmproj": f"{base}/{mmproj}" if mmproj else None,
            "linked": link,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        }
        _write_json(stage / MANIFEST, manifest)
        try:
            os.rename(stage, folder)
        except OSError:
            _refuse_existing(folder, realm, name)
            raise
    except OSError as exc:
        raise ModelError(f"cannot add {source} as {realm}/{name}: {_oserr(exc)}") from None
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return _load(folder, realm)


def remove_model(data_dir: Path, realm: str, name: str) -> None:
    """Remove a model (or an unfinished pull) from the store. A linked model's source stays."""
    folder = _model_dir(data_dir, realm, name)
    if not folder.is_dir():
        raise ModelError(f"no {realm} model {name!r} in the store ({folder.parent})")
    with _lock(folder, f"{realm}/{name}"):
        trash = folder.parent / f".{name}.remove-{secrets.token_hex(4)}"
        try:
            os.rename(folder, trash)
        except OSError as exc:
            raise ModelError(f"cannot remove {folder}: {_oserr(exc)}") from None
    shutil.rmtree(trash, ignore_errors=True)


# --- resolving node.toml's realms.<realm>.model ---------------------------------------------------
def _parse_hub_id(ref: str) -> tuple[str, str, str, str]:
    """``hf:owner/repo/path/in/repo[@revision]`` -> (owner, repo, path, revision or "main")."""
    try:
        owner, repo, path, revision = _parse_hub_repo(ref)
    except ModelError:
        path = ""
    if not path:
        raise ModelError(f"bad hub id {ref!r}: expected hf:owner/repo/path/to/file[@revision]")
    return owner, repo, path, revision


def _hub_base() -> str:
    return (os.environ.get(HUB_ENV) or DEFAULT_HUB_URL).rstrip("/")


def hub_url(ref: str, revision: str | None = None) -> str:
    """The download URL of a hub id (huggingface_hub's ``hf_hub_url``), at ``revision`` (a
    commit, once pinned) or the one the id names."""
    from huggingface_hub import hf_hub_url

    owner, repo, path, named = _parse_hub_id(ref)
    return hf_hub_url(f"{owner}/{repo}", path, revision=revision or named, endpoint=_hub_base())


def pin_hub_file(ref: str, token: str = "") -> tuple[str, str]:
    """(download URL at a commit, that commit) for a hub id: the hub is asked (huggingface_hub's
    ``model_info``) which commit its revision names now, and whether the file is there, so a
    pull fetches exactly one version of the file and records which."""
    owner, repo, path, revision = _parse_hub_id(ref)
    commit, names = _hub_commit(ref, f"{owner}/{repo}", revision, token)
    if path not in names:
        raise ModelError(f"{ref}: no file {path} in {owner}/{repo} at {revision} ({commit[:12]})")
    return hub_url(ref, commit), commit


def _hub_commit(ref: str, repo_id: str, revision: str, token: str) -> tuple[str, set[str]]:
    """(the commit ``revision`` names now, the repository's file names at it)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=_hub_base(), token=token or False).model_info(repo_id, revision=revision)
    except RepositoryNotFoundError:
        raise ModelError(f"{ref}: no repository {repo_id} on {_hub_base()} (or it needs {HUB_TOKEN_ENV})") from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref}: {repo_id} has no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) == 404:
            raise ModelError(f"{ref}: the hub has no {repo_id} at {revision} (or it needs {HUB_TOKEN_ENV})") from None
        raise ModelError(f"{ref}: the hub at {_hub_base()} refused: {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{ref}: the hub at {_hub_base()} did not answer ({type(exc).__name__}: {exc})") from None
    if not info.sha:
        raise ModelError(f"{ref}: the hub named no commit for {repo_id}@{revision}")
    return info.sha, {s.rfilename for s in info.siblings or ()}


def _parse_hub_repo(ref: str) -> tuple[str, str, str, str]:
    """``hf:owner/repo[/folder][@revision]`` -> (owner, repo, folder or "", revision or "main")."""
    body, at, revision = ref[3:].strip("/").partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not all(parts) or any(p in (".", "..") for p in parts) or (at and not revision):
        raise ModelError(f"bad hub id {ref!r}: expected hf:owner/repo[/folder][@revision]")
    return parts[0], parts[1], "/".join(parts[2:]), revision or "main"


_HUB_SKIP = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp")  # a repo's card and pictures


def _pull_hub_folder(data_dir: Path, realm: str, ref: str, name: str | None, client: Any, timeout: float) -> ModelInfo:
    """A diffusers pipeline (imagine) from the hub: every file of the repo (or of its folder) at
    one commit, downloaded, then added to the store like a local folder, with the hub id and the
    commit in its manifest."""
    import httpx
    from huggingface_hub import hf_hub_url

    owner, repo, folder, revision = _parse_hub_repo(ref)
    repo_id = f"{owner}/{repo}"
    token = os.environ.get(HUB_TOKEN_ENV, "").strip()
    commit, names = _hub_commit(ref, repo_id, revision, token)
    prefix = f"{folder}/" if folder else ""
    wanted = sorted(
        n for n in names if n.startswith(prefix) and not Path(n).name.startswith(".") and not n.endswith(_HUB_SKIP)
    )
    if f"{prefix}model_index.json" not in wanted:
        raise ModelError(f"{ref}: no {prefix}model_index.json at {commit[:12]}: not a diffusers pipeline")
    name = name or default_name(f"{repo}{'-' + folder.replace('/', '-') if folder else ''}")
    _refuse_existing(_model_dir(data_dir, realm, name), realm, name)
    base = _hub_base()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    stage = Path(data_dir) / "models" / f".pull-{realm}-{name}-{secrets.token_hex(4)}"
    own = client is None
    if own:
        client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=MAX_REDIRECTS)
    try:
        for n in wanted:
            url = hf_hub_url(repo_id, n, revision=commit, endpoint=base)
            target = stage / name / n[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                response = _open_stream(client, url, {}, auth, urlsplit(base).netloc)
                try:
                    if response.status_code != 200:
                        raise ModelError(f"{ref}: {n}: the hub answered {response.status_code}")
                    with open(target, "wb") as f:
                        for chunk in response.iter_bytes(CHUNK):
                            f.write(chunk)
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                raise ModelError(f"{ref}: {n}: download failed ({type(exc).__name__}: {exc})") from None
        info = add_model(data_dir, realm, name, stage / name)
        manifest = json.loads((info.dir / MANIFEST).read_text())
        manifest.update(source=ref, revision=commit)
        _write_json(info.dir / MANIFEST, manifest)
        return _load(info.dir, realm)
    except OSError as exc:
        raise ModelError(f"cannot pull {ref}: {_oserr(exc)}") from None
    finally:
        if own:
            client.close()
        shutil.rmtree(stage, ignore_errors=True)


def resolve(data_dir: Path, realm: str, ref: str) -> Path | None:
    """What ``realms.<realm>.model`` names, as a path to load; None for "" (the caller's smoke-test
    model). ``ref`` is a path (relative: to the data dir, where node.toml is), ``store:<name>``,
    or a hub id ``hf:owner/repo/file`` already pulled into the store."""
    _check_realm(realm)
    key = f"realms.{realm}.model = {ref!r}"
    ref = ref.strip()
    if not ref:
        return None
    if ref.startswith("store:"):
        name = ref[len("store:") :]
        try:
            info = get_model(data_dir, realm, name)
        except ModelError as exc:
            raise ModelError(f"{key}: {exc} (see: rentahal-node models list)") from None
        if not info.verified:
            raise ModelError(f"{key}: the stored model is damaged: {info.problem}")
        return info.path
    if ref.startswith("hf:"):
        try:
            _parse_hub_id(ref)
        except ModelError as exc:
            raise ModelError(f"{key}: {exc}") from None
        for info in list_models(data_dir):
            if info.realm == realm and info.source == ref:
                if not info.verified:
                    raise ModelError(f"{key}: the stored model is damaged: {info.problem}")
                return info.path
        raise ModelError(f"{key}: not downloaded yet; run: rentahal-node models pull {realm} {ref}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref):
        raise ModelError(
            f"{key}: a URL is not loaded directly; run: rentahal-node models pull {realm} {ref} "
            f"and set the model to store:<name>"
        )
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(data_dir).expanduser() / path
    if not path.exists():
        raise ModelError(f"{key}: {path}: no such file or folder")
    return path


# --- pull ------------------------------------------------------------------------------------------
PULL_STATE = ".pull.json"  # beside a .part: what it is a download of, and the server's validator


def _file_name(url: str, name: str) -> str:
    """The file name to store a download under: the URL's last path segment, made safe."""
    last = unquote(urlsplit(url).path).rstrip("/").split("/")[-1]
    last = re.sub(r"[^A-Za-z0-9._+-]+", "_", last).lstrip(".")
    return last[:200] if last and last != MANIFEST and not last.endswith(".part") else f"{name}.bin"


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def _expected_magic(realm: str) -> tuple[bytes, str]:
    return (GGML_MAGIC, "whisper ggml") if realm == "speech" else (GGUF_MAGIC, "GGUF")


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / PULL_STATE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def partial_downloads(data_dir: Path) -> list[tuple[str, str, int, str]]:
    """(realm, name, bytes so far, source) of every unfinished pull; the same pull resumes it."""
    out = []
    for realm in REALMS:
        folder = store_dir(data_dir) / realm
        if not folder.is_dir():
            continue
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and not (sub / MANIFEST).exists():
                parts = list(sub.glob("*.part"))
                if parts:
                    done = sum(p.stat().st_size for p in parts)
                    out.append((realm, sub.name, done, str(_read_state(sub).get("source", ""))))
    return out


def pull(
    data_dir: Path,
    realm: str,
    url: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    client: Any = None,
) -> ModelInfo:
    """Download a model file over HTTP(S) (or a hub id ``hf:owner/repo/file``) into the store.

    The bytes go to ``<model dir>/<file>.part``; a later pull of the same name and source
    resumes it with a Range request (and If-Range, so a file changed on the server is fetched
    afresh; a server that ignores Range also gets a fresh download). With ``sha256`` the file is
    checked against it; a mismatch discards it. The file is renamed into place and the manifest
    written last. ``progress(done, total)`` is called as bytes arrive (total None when the server
    does not say); ``done`` starts at the resumed size, and drops to 0 on a restart.
    ``client`` is an ``httpx.Client`` to use instead of a new one (redirects are followed by
    httpx, up to its ``max_redirects``, whatever its follow_redirects setting)."""
    import httpx

    _check_realm(realm)
    source = url.strip()
    if realm == "imagine":
        if not source.startswith("hf:"):
            raise ModelError(
                "imagine models are diffusers folders: pull one from the hub (hf:owner/repo[/folder][@revision]) "
                "or download the folder and run: rentahal-node models add imagine FOLDER"
            )
        return _pull_hub_folder(data_dir, realm, source, name, client, timeout)
    auth: dict[str, str] = {}
    commit = ""
    if source.startswith("hf:"):
        token = os.environ.get(HUB_TOKEN_ENV, "").strip()
        url, commit = pin_hub_file(source, token)
        if token:
            auth = {"Authorization": f"Bearer {token}"}
    else:
        url = source
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ModelError(f"cannot pull {source!r}: expected an http(s) URL or a hub id hf:owner/repo/file")
    if name is None:
        name = default_name(source)
        if not name:
            raise ModelError(f"cannot derive a model name from {source!r}; pass --name")
    folder = _model_dir(data_dir, realm, name)
    _refuse_existing(folder, realm, name)
    want = None
    if sha256 is not None:
        want = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise ModelError(f"bad sha256 {sha256!r}: expected 64 hex digits")
    target = folder / _file_name(url, name)
    if realm == "chat" and "mmproj" in target.name.lower():
        raise ModelError(f"{target.name} is a multimodal projector (mmproj), not a chat model")
    job = _Pull(
        source=source,
        url=url,
        what=f"{realm}/{name}",
        folder=folder,
        target=target,
        auth=auth,
        auth_host=parts.netloc,
        progress=progress,
        magic=_expected_magic(realm),
    )
    own = client is None
    if own:
        client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=MAX_REDIRECTS)
    try:
        with _lock(folder, job.what):
            _refuse_existing(folder, realm, name)
            try:
                digest, size = job.download(client)
            except httpx.TimeoutException:
                raise ModelError(f"download of {url} stalled for {timeout:g}s{job.again()}") from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ModelError(f"download of {url} failed ({type(exc).__name__}: {exc}){job.again()}") from None
            except OSError as exc:
                raise ModelError(f"cannot write {job.part}: {_oserr(exc)}") from None
            if want is not None and digest != want:
                job.discard()
                raise ModelError(
                    f"sha256 mismatch for {url}: expected {want}, got {digest}; the download was discarded"
                )
            if realm == "chat" and gguf_metadata(job.part).get("general.architecture") == "clip":
                job.discard()
                raise ModelError(f"{url} is a multimodal projector (mmproj), not a chat model; discarded")
            try:
                os.replace(job.part, target)
                (folder / PULL_STATE).unlink(missing_ok=True)
                manifest = {
                    "schema": SCHEMA,
                    "name": name,
                    "realm": realm,
                    "format": "gguf" if job.magic[0] == GGUF_MAGIC else "ggml-whisper",
                    "source": source,
                    **({"revision": commit} if commit else {}),
                    "added_at": _now(),
                    "entry": target.name,
                    "mmproj": None,
                    "linked": False,
                    "files": [{"path": target.name, "size": size, "sha256": digest}],
                }
                _write_json(folder / MANIFEST, manifest)
            except OSError as exc:
                raise ModelError(f"cannot store {target}: {_oserr(exc)}") from None
        (folder / ".lock").unlink(missing_ok=True)
    except ModelError:
        _drop_if_empty(folder)
        raise
    finally:
        if own:
            client.close()
    return _load(folder, realm)


def _drop_if_empty(folder: Path) -> None:
    """Remove a model folder holding nothing worth resuming (no .part, no manifest)."""
    with contextlib.suppress(OSError):
        if folder.is_dir() and not (folder / MANIFEST).exists():
            if not any(p.name not in (".lock", PULL_STATE) for p in folder.iterdir()):
                shutil.rmtree(folder)


@dataclass
class _Pull:
    source: str
    url: str
    what: str
    folder: Path
    target: Path
    auth: dict[str, str]
    auth_host: str
    progress: Progress | None
    magic: tuple[bytes, str]

    @property
    def part(self) -> Path:
        return self.target.with_name(self.target.name + ".part")

    def again(self) -> str:
        return "; run the pull again to resume" if self.part.exists() else ""

    def discard(self) -> None:
        for p in self.folder.glob("*.part"):
            p.unlink(missing_ok=True)
        (self.folder / PULL_STATE).unlink(missing_ok=True)

    def _not_a_model(self, head: bytes) -> ModelError:
        kind, realm = self.magic[1], self.what.split("/")[0]
        return ModelError(
            f"{self.url} is not a {kind} file (it starts with {head[:16]!r}); a {realm} model must be one"
        )

    def _resumable(self) -> tuple[int, dict[str, str]]:
        """(bytes of .part worth resuming, If-Range header for them)."""
        state = _read_state(self.folder)
        stale = [p for p in self.folder.glob("*.part") if p != self.part]
        if (state and state.get("source") != self.source) or stale:
            self.discard()  # a download of something else under this name
        if not self.part.exists():
            return 0, {}
        offset = self.part.stat().st_size
        magic = self.magic[0]
        if offset and _magic(self.part)[:4] != magic[: min(offset, 4)]:
            self.discard()
            return 0, {}
        validator = state.get("etag") or state.get("last_modified")
        return offset, ({"If-Range": str(validator)} if offset and validator else {})

    def _save_state(self, response: Any) -> None:
        etag = response.headers.get("etag")
        state = {
            "source": self.source,
            "url": self.url,
            "etag": etag if etag and not etag.startswith("W/") else None,  # If-Range needs a strong one
            "last_modified": response.headers.get("last-modified"),
        }
        _write_json(self.folder / PULL_STATE, state)

    def download(self, client: Any) -> tuple[str, int]:
        """Fill the .part with the whole file, resuming what it holds. Returns (sha256, size)."""
        offset, if_range = self._resumable()
        for _attempt in range(2):
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers.update({"Range": f"bytes={offset}-", **if_range})
            response = _open_stream(client, self.url, headers, self.auth, self.auth_host)
            try:
                status = response.status_code
                if status == 416 and offset:
                    _, total = _parse_content_range(response.headers.get("content-range"))
                    if total == offset:  # the .part is already whole (stopped before the rename)
                        if self.progress:
                            self.progress(offset, total)
                        return _sha256_file(self.part), offset
                    self.discard()  # longer than the file is now: start again
                    offset, if_range = 0, {}
                    continue
                if status == 206 and offset:
                    start, total = _parse_content_range(response.headers.get("content-range"))
                    if start != offset:
                        raise ModelError(f"{self.url} answered a request for byte {offset} on with byte {start}")
                    return self._receive(response, offset, total)
                if 200 <= status < 300 and status != 206:  # fresh, changed, or Range ignored
                    length = response.headers.get("content-length")
                    total = int(length) if length and length.isdigit() else None
                    self._save_state(response)
                    return self._receive(response, 0, total)
                reason = f" {response.reason_phrase}" if response.reason_phrase else ""
                raise ModelError(f"HTTP {status}{reason} from {self.url}")
            finally:
                response.close()
        raise ModelError(f"{self.url}: could not resume the download of {self.what}")

    def _receive(self, response: Any, offset: int, total: int | None) -> tuple[str, int]:
        magic = self.magic[0]
        _check_space(self.part, None if total is None else total - offset)
        h = hashlib.sha256()
        head = b""
        if offset:
            with open(self.part, "rb") as f:
                head = f.read(len(magic))
                f.seek(0)
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        done = offset
        if self.progress:
            self.progress(done, total)
        with open(self.part, "ab" if offset else "wb") as out:
            for chunk in response.iter_raw():
                if len(head) < len(magic):
                    head = (head + chunk)[: len(magic)]
                    if head != magic[: len(head)]:
                        out.close()
                        self.discard()
                        raise self._not_a_model(chunk)
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if self.progress:
                    self.progress(done, total)
        if total is not None and done != total:
            raise ModelError(
                f"download of {self.url} ended early ({done} of {total} bytes); run the pull again to resume"
            )
        if done < len(magic):
            self.discard()
            raise self._not_a_model(head)
        return h.hexdigest(), done


def _open_stream(client: Any, url: str, headers: dict[str, str], auth: dict[str, str], auth_host: str) -> Any:
    """GET ``url`` (streaming), httpx following its redirects: http(s) only (another scheme is
    UnsupportedProtocol), at most the client's ``max_redirects``, and the Authorization header
    dropped by httpx as soon as a redirect leaves the origin it was meant for."""
    import httpx

    extra = auth if urlsplit(url).netloc == auth_host else {}
    request = client.build_request("GET", url, headers={**headers, **extra})
    try:
        return client.send(request, stream=True, follow_redirects=True)
    except httpx.TooManyRedirects:
        raise ModelError(f"too many redirects (more than {client.max_redirects}) from {url}") from None
    except httpx.UnsupportedProtocol:
        raise ModelError(f"{url} redirects to a URL that is not http(s): only http(s) is followed") from None


def _check_space(part: Path, needed: int | None) -> None:
    if not needed:
        return
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if needed > free:
        raise ModelError(
            f"not enough disk space in {part.parent}: the download needs {_human(needed)}, {_human(free)} free"
        )


__all__ = [
    "FORMATS",
    "REALMS",
    "REALM_FORMATS",
    "ModelError",
    "ModelFile",
    "ModelInfo",
    "add_model",
    "default_name",
    "detect_format",
    "file_format",
    "get_model",
    "gguf_layer_count",
    "gguf_metadata",
    "hub_url",
    "list_models",
    "partial_downloads",
    "pull",
    "remove_model",
    "resolve",
    "store_dir",
]

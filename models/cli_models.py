"""``rentahal-node models``: the model store and the GPUs of this machine.

Mounted in ``cli.py`` with ``app.add_typer(models_app, name="models")``. These commands work on
the data dir directly; no running node is needed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NoReturn

import typer

from ..node.config import resolve_data_dir

models_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Models in the node's store (list, pull, add, remove) and this machine's GPUs.",
)

DataDir = typer.Option(
    None,
    "--data-dir",
    envvar="RENTAHAL_HOME",
    help="Node data dir [default: ~/.rentahal]",
    show_default=False,
)


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _served_hint(realm: str, name: str) -> str:
    return f'serve it with: realms.{realm}.model = "store:{name}" in node.toml'


@models_app.command("list")
def list_(
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json"),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against its sha256 (slow)"),
) -> None:
    """Models in the store, per realm."""
    from .registry import ModelError, list_models, partial_downloads

    path = resolve_data_dir(data_dir)
    try:
        models = list_models(path, verify=verify)
        partial = partial_downloads(path)
    except (ModelError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no models in {path / 'models'} (add one with: rentahal-node models add chat FILE.gguf)", err=True)
    else:
        typer.echo(f"{'REALM':<8} {'NAME':<32} {'FORMAT':<12} {'SIZE':>10}  {'OK':<3} SOURCE")
        for m in models:
            ok = "yes" if m.verified else "NO"
            typer.echo(f"{m.realm:<8} {m.name:<32} {m.format:<12} {_size(m.size):>10}  {ok:<3} {m.source}")
            if m.problem:
                typer.echo(f"         {m.problem}")
    for realm, name, done, source in partial:
        again = f"rentahal-node models pull {realm} {source or 'URL'} --name {name}"
        typer.echo(f"unfinished pull: {realm}/{name} ({_size(done)} so far; resume it with: {again})", err=True)


class _Bar:
    """A progress line on stderr: redrawn in place on a terminal, a final line otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.first: int | None = None
        self.last_draw = 0.0
        self.done = 0
        self.total: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.first is None or done < self.done:  # start, or a server that restarted it
            if done > 0:
                typer.echo(f"{self.label}: resuming at {_size(done)}", err=True)
            self.first, self.start = done, time.monotonic()
        self.done, self.total = done, total
        now = time.monotonic()
        if self.tty and (now - self.last_draw >= 0.1 or done == total):
            self.last_draw = now
            sys.stderr.write("\r" + self._line(now) + "\033[K")
            sys.stderr.flush()

    def _line(self, now: float) -> str:
        rate = (self.done - (self.first or 0)) / max(now - self.start, 1e-6)
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            return (
                f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done * 100 // self.total:3d}% "
                f"{_size(self.done)}/{_size(self.total)} {_size(rate)}/s"
            )
        return f"{self.label} {_size(self.done)} {_size(rate)}/s"

    def close(self) -> None:
        if self.first is None:
            return
        if self.tty:
            sys.stderr.write("\n")
        else:
            typer.echo(self._line(time.monotonic()), err=True)


@models_app.command()
def pull(
    realm: str = typer.Argument(..., help="chat, vision, imagine or speech"),
    url: str = typer.Argument(
        ...,
        metavar="URL_OR_HUB_ID",
        help="An http(s) URL or hf:owner/repo/path/file[@revision]; for imagine hf:owner/repo[/folder][@revision]",
    ),
    data_dir: Path | None = DataDir,
    name: str | None = typer.Option(None, "--name", help="Name in the store [default: from the file name]"),
    sha256: str | None = typer.Option(None, "--sha256", help="Expected sha256 of the file (hex)"),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds without progress before giving up"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Download a model into the store (a hub id at one pinned commit); run it again to resume an
    interrupted file download."""
    from .registry import ModelError, default_name
    from .registry import pull as pull_model

    path = resolve_data_dir(data_dir)
    label = f"{realm}/{name or default_name(url) or '?'}"
    bar = _Bar(label)
    try:
        info = pull_model(path, realm, url, name=name, sha256=sha256, progress=bar, timeout=timeout)
    except ModelError as exc:
        bar.close()
        fail(str(exc))
    except KeyboardInterrupt:
        bar.close()
        fail("interrupted; run the same command again to resume", 130)
    bar.close()
    sha = info.files[0].sha256 if info.files else "?"
    if as_json:
        typer.echo(
            json.dumps({"realm": info.realm, "name": info.name, "ref": info.ref, "bytes": info.size, "sha256": sha})
        )
        return
    typer.echo(f"pulled {info.realm}/{info.name}: {_size(info.size)}, sha256 {sha}", err=True)
    typer.echo(_served_hint(info.realm, info.name), err=True)
    typer.echo(info.ref)


@models_app.command()
def add(
    realm: str = typer.Argument(..., help="chat, vision, imagine or speech"),
    source: Path = typer.Argument(..., metavar="PATH", help="A model file or folder"),
    data_dir: Path | None = DataDir,
    name: str | None = typer.Option(None, "--name", help="Name in the store [default: from the file name]"),
    link: bool = typer.Option(False, "--link", help="Symlink instead of copying (the source must stay)"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Copy (or link) a local model file or folder into the store, checking its format."""
    from .registry import ModelError, add_model, default_name

    path = resolve_data_dir(data_dir)
    if name is None:
        name = default_name(str(source))
        if not name:
            fail(f"cannot derive a model name from {str(source)!r}; pass --name")
    try:
        info = add_model(path, realm, name, source, link=link)
    except ModelError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(
            json.dumps(
                {"realm": info.realm, "name": info.name, "ref": info.ref, "bytes": info.size, "format": info.format}
            )
        )
        return
    typer.echo(
        f"added {info.realm}/{info.name}: {info.format}, {_size(info.size)}{' (linked)' if link else ''}", err=True
    )
    typer.echo(_served_hint(info.realm, info.name), err=True)
    typer.echo(info.ref)


@models_app.command()
def remove(
    realm: str = typer.Argument(...),
    name: str = typer.Argument(...),
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Remove a model (or an unfinished pull) from the store; a linked source is left alone."""
    from .registry import ModelError, remove_model

    try:
        remove_model(resolve_data_dir(data_dir), realm, name)
    except ModelError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"realm": realm, "name": name, "removed": True}))
    else:
        typer.echo(f"removed {realm}/{name}", err=True)


@models_app.command()
def gpus(
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """CUDA GPUs of this machine, their free memory, and whether llama.cpp can offload to them."""
    from .gpu import detect_gpus, diffusers_device, llama_gpu_offload_supported

    found = detect_gpus()
    offload = llama_gpu_offload_supported()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "gpus": [g.to_dict() for g in found],
                    "llama_gpu_offload": offload,
                    "diffusers_device": list(diffusers_device(found)) if found else ["cpu", "float32"],
                },
                indent=2,
            )
        )
        return
    if not found:
        typer.echo("no CUDA GPU found (nvidia-smi absent or failing, no CUDA-enabled torch): models run on the CPU")
    else:
        typer.echo(f"{'GPU':>3}  {'NAME':<32} {'TOTAL MiB':>10} {'FREE MiB':>10}")
        for g in found:
            typer.echo(f"{g.index:>3}  {g.name:<32} {g.total_mib:>10} {g.free_mib:>10}")
    typer.echo(f"llama.cpp GPU offload: {'yes' if offload else 'no (CPU build of llama-cpp-python)'}")

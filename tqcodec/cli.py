"""``tqz``: the command line, a thin shell over the Python API.

Exit status: 0 success, 1 a TqzError (one line on stderr naming the file and the
problem), 2 a usage error.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from . import api
from .errors import TqzError, fail
from .fileio import read_model, same_file, write_model

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress neural-network weights into .tqz files and back.")


def _die(exc: TqzError) -> None:
    typer.echo(f"tqz: error: {exc}", err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except TqzError as exc:
        _die(exc)
    except KeyboardInterrupt:
        typer.echo("tqz: interrupted", err=True)
        raise typer.Exit(130) from None


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Optional[Callable[[str, int, int], None]]]:
    """A rich progress bar on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  transient=True, console=None) as bar:
        task = bar.add_task("", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None, description=name[-40:])
        yield update


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def encode(
    input: Path = typer.Argument(..., help="model file: .pt/.pth (plain tensors only) or .safetensors"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output .tqz (default: INPUT with .tqz)"),
    lossless: bool = typer.Option(False, "--lossless", help="store every tensor exactly"),
    mode: str = typer.Option("auto", "--mode", help="auto, raw or uniform"),
    snr: float = typer.Option(40.0, "--snr", help="weight SQNR in dB that uniform steps aim at"),
    granularity: str = typer.Option("channel", "--granularity", help="uniform steps per 'channel' or 'tensor'"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
) -> None:
    """Encode a model file into a .tqz file."""
    with _errors():
        out = output or input.with_suffix(".tqz")
        if same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        api.EncodeOptions(mode, lossless, snr, granularity)  # options are checked before any work
        tensors = read_model(input)
        with _progress("encoding") as progress:
            size = api.save(tensors, out, mode=mode, lossless=lossless, snr_db=snr, granularity=granularity,
                            overwrite=force, progress=progress)
        params = sum(t.numel() for t in tensors.values())
        bpp = 8 * size / params if params else 0.0
        ratio = (4 * params / size) if size else 0.0
        typer.echo(f"{out}: {len(tensors)} tensors, {params} parameters, {size} bytes "
                   f"({bpp:.3f} bits/param, {ratio:.2f}x smaller than fp32)")


@app.command()
def decode(
    input: Path = typer.Argument(..., help=".tqz file"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output .pt or .safetensors (default: INPUT with .pt)"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
) -> None:
    """Decode a .tqz file into a .pt or .safetensors file."""
    with _errors():
        out = output or input.with_suffix(".pt")
        if out.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors"):
            raise fail("BAD_OPTION", "output must end in .pt, .pth, .bin or .safetensors", out)
        if same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        if out.exists() and not force:
            raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", out)
        tensors = {}
        with _progress("decoding") as progress:
            for name, t in api.iter_tensors(input):
                tensors[name] = t
                if progress:
                    progress(name, len(tensors), 0)
        write_model(tensors, out, overwrite=force)
        typer.echo(f"{out}: {len(tensors)} tensors")


@app.command()
def info(
    input: Path = typer.Argument(..., help=".tqz file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show the version, and each tensor's mode, shape, bytes and bits per weight."""
    with _errors():
        with api.open(input) as f:
            rows = []
            for name in f.keys():
                ti = f.info(name)
                rows.append({"name": name, "dtype": ti.dtype, "shape": list(ti.shape), "mode": ti.mode,
                             "bytes": ti.stored_bytes,
                             "bits_per_weight": (8 * ti.stored_bytes / ti.numel) if ti.numel else 0.0})
            params = sum(f.info(n).numel for n in f.keys())
            total = {"file_bytes": f.file_size, "tensors": len(rows), "parameters": params,
                     "bits_per_param": 8 * f.file_size / params if params else 0.0,
                     "format_version": "%d.%d" % f.version}
            metadata = {k: v for k, v in f.metadata.items() if isinstance(v, (str, int, float, bool))}
        if as_json:
            typer.echo(json.dumps({"total": total, "metadata": metadata, "tensors": rows}, indent=1))
            return
        typer.echo(f"{input}: .tqz format {total['format_version']}, {total['tensors']} tensors, "
                   f"{params} parameters, {total['file_bytes']} bytes ({_human(total['file_bytes'])}), "
                   f"{total['bits_per_param']:.3f} bits/param")
        width = max([len(r["name"]) for r in rows] + [4])
        typer.echo(f"{'name':<{width}}  {'mode':<8} {'dtype':<9} {'shape':<18} {'bytes':>10} {'bits/w':>7}")
        for r in rows:
            shape = "x".join(map(str, r["shape"])) or "()"
            typer.echo(f"{r['name']:<{width}}  {r['mode']:<8} {r['dtype']:<9} {shape:<18} {r['bytes']:>10} "
                       f"{r['bits_per_weight']:>7.3f}")


@app.command()
def verify(input: Path = typer.Argument(..., help=".tqz file")) -> None:
    """Check every CRC and structure and decode every tensor."""
    with _errors():
        with _progress("verifying") as progress:
            report = api.verify(input, progress=progress)
        typer.echo(f"{input}: OK ({report.tensors} tensors, {report.parameters} parameters, "
                   f"{report.file_bytes} bytes)")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except TqzError as exc:  # raised outside a command body
        typer.echo(f"tqz: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""``tqz``: the command line, a thin shell over the Python API.

Exit status: 0 success, 1 a TqzError (one line on stderr naming the file and the
problem), 2 a usage error.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

import typer

from . import api, parallel
from .errors import TqzError, fail
from .io.files import read_model, same_file, write_model
from .io.hf import parse_size, read_folder
from .io.remote import is_url
from .model.calibrate import Stats
from .plot import plot_allocation

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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    # on stderr: rich's default console is stdout, which may be the .tqz file (encode -o -)
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None, description=name[-40:])
        yield update


def _stdout_binary() -> BinaryIO:
    return sys.stdout.buffer


def _quiet_stdout() -> None:
    """After a failed write to stdout (a closed pipe), stop Python retrying it at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _decode_source(input: str) -> Union[str, BinaryIO]:
    """A path or URL as given, or standard input for ``-``."""
    if input != "-":
        return input
    if sys.stdin.isatty():
        raise fail("BAD_OPTION", "standard input is a terminal: pipe a .tqz file into it")
    return sys.stdin.buffer


def _default_output(input: str, suffix: str) -> Path:
    if input == "-":
        raise fail("BAD_OPTION", "give -o/--output when reading standard input")
    if is_url(input):
        name = Path(urllib.parse.urlsplit(input).path).name
        if not name:
            raise fail("BAD_OPTION", "give -o/--output: the URL names no file")
        return Path(name).with_suffix(suffix)
    return Path(input).with_suffix(suffix)


def _printable(name: str) -> str:
    """A tensor name safe to print on a terminal (spec §5.4: escape what is not printable)."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in name)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def encode(
    input: Path = typer.Argument(..., help="model file: .pt/.pth (plain tensors only) or .safetensors, or a "
                                 "Hugging Face folder (config.json + model*.safetensors [+ index])"),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="output .tqz, or - for standard output (default: INPUT with .tqz)"),
    lossless: bool = typer.Option(False, "--lossless", help="store every tensor exactly"),
    mode: str = typer.Option("auto", "--mode", help="auto, raw, uniform, tq, ecsq, kmeans, pq or dither (the last "
                             "four: float tensors of >= 2 dims and >= 256 elements; --bits per tensor)"),
    stats_path: Optional[Path] = typer.Option(None, "--stats", help="calibration statistics (.safetensors from "
                                              "tqcodec.Stats.save); selects mode tq"),
    bits: Optional[float] = typer.Option(None, "--bits", help="tq and auto: whole-file bits per parameter (within "
                                         "±3%); ecsq/kmeans/pq/dither: each tensor's bits per weight"),
    quality: Optional[float] = typer.Option(None, "--quality", help="tq: predicted output SNR in dB (output power "
                                            "over estimated output error; without --stats, weight SNR)"),
    snr: float = typer.Option(40.0, "--snr", help="weight SQNR in dB that uniform steps aim at"),
    granularity: str = typer.Option("channel", "--granularity", help="uniform steps per 'channel' or 'tensor'"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
    tq_scope: str = typer.Option("model", "--tq-scope", help="tq: 'model' (one allocation over the whole model, "
                                 "all in memory) or 'tensor' (each tensor on its own: streams, runs with -j)"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="encode tensors in N processes (0: every core); "
                             "same bytes for every N"),
) -> None:
    """Encode a model file (or a Hugging Face folder) into a .tqz file."""
    with _errors():
        to_stdout = output is not None and str(output) == "-"
        folder = input.is_dir()
        out = output or (input.parent / (input.name + ".tqz") if folder else input.with_suffix(".tqz"))
        if to_stdout and sys.stdout.isatty():
            raise fail("BAD_OPTION", "refusing to write a .tqz file to a terminal (redirect standard output)")
        if not to_stdout and same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        api.EncodeOptions(mode, lossless, snr, granularity, None, bits, quality, tq_scope)  # checked before any work
        stats = None
        if stats_path is not None:
            try:
                # tq_scope tensor streams tensor by tensor: one layer's statistics read at a time
                stats = Stats.open(str(stats_path)) if tq_scope == "tensor" else Stats.load(str(stats_path))
            except (OSError, ValueError, KeyError) as exc:
                raise fail("BAD_OPTION", f"cannot read statistics: {exc}", stats_path) from None
        files = None
        if folder:
            tensors, files = read_folder(input)  # lazy: one tensor at a time
        else:
            tensors = read_model(input)
        with _progress("encoding") as progress:
            # to standard output: the container writer spools every chunk and writes nothing
            # before the whole file is encoded, so an encoding error leaves the stream empty
            try:
                size = api.save(tensors, _stdout_binary() if to_stdout else out, mode=mode, lossless=lossless,
                                snr_db=snr, granularity=granularity, overwrite=force, progress=progress,
                                stats=stats, bits=bits, quality=quality, jobs=jobs, files=files, tq_scope=tq_scope)
                if to_stdout:
                    sys.stdout.buffer.flush()
            except OSError as exc:  # a file output turns its own OS errors into IO_ERROR
                _quiet_stdout()
                raise fail("IO_ERROR", f"cannot write to standard output: {exc.strerror or exc}") from None
        params = tensors.numel() if folder else sum(t.numel() for t in tensors.values())
        bpp = 8 * size / params if params else 0.0
        ratio = (4 * params / size) if size else 0.0
        typer.echo(f"{'<stdout>' if to_stdout else out}: {len(tensors)} tensors, {params} parameters, "
                   f"{size} bytes ({bpp:.3f} bits/param, {ratio:.2f}x smaller than fp32)", err=to_stdout)


@app.command()
def decode(
    input: str = typer.Argument(..., help=".tqz file, URL (http(s)://, s3://, ...; streamed), or - for standard input"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output .pt or .safetensors, or a folder "
                                          "(any other name): a Hugging Face folder (default: INPUT with .pt)"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="folder output: largest shard (5GB, 500MB, 2GiB)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="decode in N processes (0 or default: every core "
                                       "this process may use; a folder output: 1 by default)"),
) -> None:
    """Decode a .tqz file into a .pt or .safetensors file, or a Hugging Face folder."""
    with _errors():
        source = _decode_source(input)
        out = output or _default_output(input, ".pt")
        if isinstance(source, str) and same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        if out.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors"):
            if not isinstance(source, str):
                raise fail("BAD_OPTION", "a folder output needs a .tqz file or URL, not standard input")
            size = parse_size(shard_size)
            with _progress("decoding") as progress:
                shards = api.decode_folder(source, out, shard_size=size, overwrite=force, jobs=1 if jobs is None else jobs,
                                           progress=progress)
            typer.echo(f"{out}/: {len(shards)} shard{'s' if len(shards) > 1 else ''}")
            return
        if out.exists() and not force:
            raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", out)
        tensors = {}
        with _progress("decoding") as progress:
            try:
                for name, t in parallel.iter_decoded(source, parallel.check_jobs(jobs)):
                    tensors[name] = t
                    if progress:
                        progress(name, len(tensors), 0)
            except TqzError as exc:
                raise exc.with_path("<stdin>") if input == "-" else exc
        write_model(tensors, out, overwrite=force)
        typer.echo(f"{out}: {len(tensors)} tensors")


@app.command()
def info(
    input: str = typer.Argument(..., help=".tqz file or URL (http(s)://, s3://, ...; read by ranges)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the bit-depth map (bits per band, "
                                        "tensor by tensor, dropped bands and transforms marked) as a PNG"),
) -> None:
    """Show the version, and each tensor's mode, shape, bytes and bits per weight."""
    with _errors():
        if input == "-":
            raise fail("BAD_OPTION", "info reads the end of the file first: give a file or URL, not -")
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
            if plot is not None:
                plot_allocation(f, plot)
        if as_json:
            typer.echo(json.dumps({"total": total, "metadata": metadata, "tensors": rows}, indent=1))
            return
        typer.echo(f"{input}: .tqz format {total['format_version']}, {total['tensors']} tensors, "
                   f"{params} parameters, {total['file_bytes']} bytes ({_human(total['file_bytes'])}), "
                   f"{total['bits_per_param']:.3f} bits/param")
        names = [_printable(r["name"]) for r in rows]
        width = max([len(n) for n in names] + [4])
        typer.echo(f"{'name':<{width}}  {'mode':<8} {'dtype':<9} {'shape':<18} {'bytes':>10} {'bits/w':>7}")
        for r, name in zip(rows, names):
            shape = "x".join(map(str, r["shape"])) or "()"
            typer.echo(f"{name:<{width}}  {r['mode']:<8} {r['dtype']:<9} {shape:<18} {r['bytes']:>10} "
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

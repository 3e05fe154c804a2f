"""``tqz``: the command line, a thin shell over the Python API.

Exit status: 0 success; 1 a TqzError (one line on stderr naming the file and the problem);
2 a usage error (a wrong option or argument, ``BAD_OPTION``); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import os

# before torch loads (tqcodec's own __init__ does not load it): idle OpenMP threads sleep rather
# than spin on cores another process needs (tqcodec.threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

INTERRUPTED = "tqz: interrupted"  # the one line a Ctrl-C prints (exit status 130)

try:  # loading torch and the rest takes a second or two: a Ctrl-C then is an interruption too
    import contextlib  # noqa: E402
    import json  # noqa: E402
    import shlex  # noqa: E402
    import signal  # noqa: E402
    import subprocess  # noqa: E402
    import time  # noqa: E402
    import warnings  # noqa: E402
    import urllib.parse  # noqa: E402
    from pathlib import Path  # noqa: E402
    from typing import BinaryIO, Callable, Iterator, Optional, Union  # noqa: E402

    import click  # noqa: E402
    import typer  # noqa: E402
    from typer.core import TyperCommand  # noqa: E402

    from . import FORMAT_VERSION, __version__, api, parallel  # noqa: E402
    from . import threads as thread_budget  # noqa: E402
    from .coding import workers  # noqa: E402
    from .errors import TqzError, fail  # noqa: E402
    from .io.files import atomic_output, read_model, safetensors_bytes, same_file, write_model  # noqa: E402
    from .io.hf import parse_size, read_folder  # noqa: E402
    from .io.remote import is_url  # noqa: E402
    from .model.calibrate import Stats  # noqa: E402
    from .plot import plot_allocation  # noqa: E402
except KeyboardInterrupt:
    print(INTERRUPTED, file=sys.stderr)
    raise SystemExit(130) from None

USAGE_EXIT = 2  # a usage error: a wrong option or argument (BAD_OPTION), as click's own usage errors
DECODED = ".decoded"  # decode's default output: INPUT less .tqz, plus .decoded.pt (or .decoded/ for a folder)


class _Command(TyperCommand):
    """A command whose usage line reads ``tqz encode [OPTIONS] INPUT`` (typer writes ``{INPUT}``)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [p.replace("{", "").replace("}", "") for p in super().collect_usage_pieces(ctx)]


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Compress neural-network weights into .tqz files and back.")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tqz (tqcodec) {__version__}, .tqz format {'.'.join(map(str, FORMAT_VERSION))}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Compress neural-network weights into .tqz files and back."""


def _die(exc: TqzError) -> None:
    typer.echo(f"tqz: error: {exc}", err=True)
    raise typer.Exit(USAGE_EXIT if exc.code == "BAD_OPTION" else 1)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (no source file, no code line)."""
    typer.echo(f"tqz: warning: {message}", err=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored when the block ends
            yield
    except TqzError as exc:
        _die(exc)
    except KeyboardInterrupt:
        _interrupted()
        raise typer.Exit(130) from None


_REPORTED: list[bool] = []  # main(): a command body has reported the interruption


def _interrupted(unless_reported: bool = False) -> None:
    """Ctrl-C: end the decode workers now (the encode pool ends where it was interrupted,
    ``tqcodec.parallel.ordered_map``) and say so in one line."""
    workers.abort()
    if unless_reported and _REPORTED:
        return
    _REPORTED.append(True)
    with contextlib.suppress(OSError, ValueError):
        typer.echo(INTERRUPTED, err=True)


PROGRESS_PERIOD = 10.0  # seconds between progress lines when standard error is not a terminal


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """Progress of long work, as the API reports it (``progress(what, done, total)``, ``what``
    a stage or ``"stage: item"``): on a terminal a bar for the current stage with its counts and
    item; otherwise one line every ``PROGRESS_PERIOD`` seconds (none for quicker work), so a log
    shows that a long encode moves."""
    start = time.monotonic()
    if not sys.stderr.isatty():
        last = {"at": start}

        def line(what: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last["at"] >= PROGRESS_PERIOD:  # quick work prints nothing
                count = f"{done}/{total}" if total else f"{done}"
                typer.echo(f"tqz: {label}: {_printable(what)[:100]} {count} ({now - start:.0f} s)", err=True)
                last["at"] = now
        yield line
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    # on stderr: rich's default console is stdout, which may be the .tqz file (encode -o -)
    with Progress(TextColumn(label), TextColumn("{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=None, stage="")

        def update(what: str, done: int, total: int) -> None:
            stage, _, item = what.partition(": ")
            bar.update(task, completed=done, total=total or None, stage=stage, description=_printable(item)[-40:])
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
    # a reader of its own over the same pipe: a decode's read-ahead thread may be blocked in a
    # read when a Ctrl-C ends the run, and Python aborts ("could not acquire lock for <stdin> at
    # interpreter shutdown", SIGABRT) if that thread holds sys.stdin's buffer
    try:
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test runner's stdin)
        return sys.stdin.buffer


def _default_decode_output(input: str, folder: bool) -> Path:
    """``model.tqz`` -> ``model.decoded.pt`` (``model.decoded/`` for a file that carries a Hugging
    Face folder's files): never the name the model was encoded from, so encode and decode work in
    one folder and the lossy decode never replaces an original."""
    if input == "-":
        raise fail("BAD_OPTION", "give -o/--output when reading standard input")
    if is_url(input):
        name = Path(urllib.parse.urlsplit(input).path).name
        if not name:
            raise fail("BAD_OPTION", "give -o/--output: the URL names no file")
        path = Path(name)
    else:
        path = Path(input)
    stem = path.name[:-len(".tqz")] if path.name.lower().endswith(".tqz") else path.name
    return path.with_name(stem + DECODED + ("" if folder else ".pt"))


def _ratio_to_fp32(params: int, size: int) -> str:
    """"4.00x smaller than fp32", or "1.50x larger than fp32" for a file bigger than fp32."""
    if not size or not params:
        return "no parameters"
    ratio = 4 * params / size
    return f"{ratio:.2f}x smaller than fp32" if ratio >= 1 else f"{1 / ratio:.2f}x larger than fp32"


def _carried_note(files: list[str]) -> str:
    shown = ", ".join(files[:10]) + (", ..." if len(files) > 10 else "")
    return (f"tqz: note: the file carries {len(files)} file{'s' if len(files) > 1 else ''} ({shown}) that a single "
            "output file cannot hold: decode to a folder (-o DIR) to get them")


def _printable(name: str) -> str:
    """A tensor name safe to print on a terminal (spec §5.4: escape what is not printable)."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in name)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


INPUT = "INPUT"


def _search_options(command: Optional[str], at_least: Optional[float], at_most: Optional[float]) -> dict:
    """``save``'s evaluate/threshold/higher_is_better for ``--evaluate CMD --min X`` (or ``--max X``)."""
    if command is None:
        if at_least is not None or at_most is not None:
            raise fail("BAD_OPTION", "--min and --max go with --evaluate")
        return {}
    if not command.strip():
        raise fail("BAD_OPTION", "--evaluate needs a command")
    if (at_least is None) == (at_most is None):
        raise fail("BAD_OPTION", "--evaluate needs one of --min X (higher is better) or --max X (lower is better)")
    threshold = at_least if at_least is not None else at_most
    return {"evaluate": _command_metric(command), "threshold": threshold, "higher_is_better": at_most is None}


def _command_metric(command: str) -> Callable[[str], float]:
    """The metric of a candidate file: ``command`` run by the shell with ``{file}`` replaced by
    the file's quoted path (appended when absent); the last word it prints is the metric."""

    def metric(path: str) -> float:
        quoted = shlex.quote(path)
        line = command.replace("{file}", quoted) if "{file}" in command else f"{command} {quoted}"
        try:
            done = subprocess.run(line, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace")
        except OSError as exc:
            raise fail("EVALUATE_FAILED", f"cannot run the --evaluate command: {exc.strerror or exc}") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
            raise fail("EVALUATE_FAILED", f"the --evaluate command exited with status {done.returncode}"
                                          + (f": {tail}" if tail else ""))
        lines = [x.strip() for x in done.stdout.splitlines() if x.strip()]
        try:
            return float(lines[-1].split()[-1])  # "0.991" or "accuracy: 0.991"
        except (IndexError, ValueError):
            said = repr(lines[-1][:80]) if lines else "nothing"
            raise fail("EVALUATE_FAILED", f"the --evaluate command printed {said} as its last line, "
                                          "not a number") from None
    return metric


def _with_trials(progress: Callable[[str, int, int], None]) -> Callable[[str, int, int], None]:
    """``progress``, and each trial of the rate search as a line of its own on stderr."""

    def report(what: str, done: int, total: int) -> None:
        if what.startswith("search: "):
            typer.echo(f"tqz: {what[len('search: '):]}", err=True)
        progress(what, done, total)
    return report


@app.command(cls=_Command)
def encode(
    input: Path = typer.Argument(..., metavar=INPUT, help="model file: .pt/.pth (plain tensors only) or "
                                 ".safetensors, or a Hugging Face folder (config.json + model*.safetensors "
                                 "[+ index])"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="PATH",
                                          help="output .tqz, or - for standard output (default: INPUT with .tqz)"),
    lossless: bool = typer.Option(False, "--lossless", help="store every tensor exactly"),
    mode: Optional[str] = typer.Option(None, "--mode", metavar="MODE",
                                       help="raw, uniform, tq, auto (tq or one of the next four per tensor), ecsq, "
                                            "kmeans, pq or dither (the last four: float tensors of >= 2 dims and "
                                            ">= 256 elements)  [default: uniform; tq with --bits, --quality or "
                                            "--stats]", show_default=False),
    stats_path: Optional[Path] = typer.Option(None, "--stats", metavar="PATH",
                                              help="calibration statistics (.safetensors from "
                                                   "tqcodec.Stats.save); selects mode tq"),
    bits: Optional[float] = typer.Option(None, "--bits", metavar="B",
                                         help="whole-file bits per parameter (the file lands within ±3%)"),
    quality: Optional[float] = typer.Option(None, "--quality", metavar="DB",
                                            help="tq: predicted output SNR in dB (output power over estimated "
                                                 "output error; without --stats, weight SNR)"),
    snr: Optional[float] = typer.Option(None, "--snr", metavar="DB",
                                        help="uniform and the data-free default: the weight SQNR each step "
                                             "aims at  [default: 40]"),
    granularity: Optional[str] = typer.Option(None, "--granularity", metavar="G",
                                              help="uniform: one step per 'channel' or per 'tensor'  "
                                                   "[default: channel]"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
    tq_scope: str = typer.Option("model", "--tq-scope", metavar="SCOPE",
                                 help="tq: 'model' (one allocation over the whole model, all in memory) or "
                                      "'tensor' (each tensor on its own: streams, runs with -j)  [default: model]",
                                 show_default=False),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N", help="encode tensors in N processes (0: every core); "
                             "same bytes for every N  [default: 1]", show_default=False),
    threads: int = typer.Option(0, "--threads", metavar="N", help="threads for the whole run, shared by its "
                                "processes and the tq encoder's curves (0: every core this process may use); "
                                "same bytes for every N  [default: 0]", show_default=False),
    evaluate: Optional[str] = typer.Option(None, "--evaluate", metavar="CMD",
                                           help="the smallest tq file that keeps a metric: CMD is run on each "
                                                "candidate ({file} is its path, else appended) and prints the "
                                                "metric last; with --min or --max"),
    min_metric: Optional[float] = typer.Option(None, "--min", metavar="X",
                                               help="--evaluate: the metric must be at least X"),
    max_metric: Optional[float] = typer.Option(None, "--max", metavar="X",
                                               help="--evaluate: the metric must be at most X (lower is better)"),
) -> None:
    """Encode a model file (or a Hugging Face folder) into a .tqz file."""
    with _errors(), thread_budget.budget(threads):
        to_stdout = output is not None and str(output) == "-"
        folder = input.is_dir()
        out = output or (input.parent / (input.name + ".tqz") if folder else input.with_suffix(".tqz"))
        if to_stdout and sys.stdout.isatty():
            raise fail("BAD_OPTION", "refusing to write a .tqz file to a terminal (redirect standard output)")
        if not to_stdout and same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        options = dict(mode=mode, lossless=lossless, bits=bits, quality=quality, tq_scope=tq_scope)
        search = _search_options(evaluate, min_metric, max_metric)
        if snr is not None:
            options["snr_db"] = snr
        if granularity is not None:
            options["granularity"] = granularity
        if not search:
            api.EncodeOptions(stats=stats_path, **options)  # checked before any work (a path stands for the stats)
        stats = None
        if stats_path is not None:
            try:
                # each tensor's statistics read when the encoder needs them, not every H decoded up
                # front (a 604M-parameter Llama's: 3.8 GB of float64 beside the encoder's own)
                stats = Stats.open(str(stats_path))
            except TqzError:
                raise
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
                size = api.save(tensors, _stdout_binary() if to_stdout else out, overwrite=force,
                                progress=_with_trials(progress) if search else progress, stats=stats, jobs=jobs,
                                files=files, **options, **search)
                if to_stdout:
                    sys.stdout.buffer.flush()
            except TqzError:
                raise
            except OSError as exc:  # a file output turns its own OS errors into IO_ERROR
                _quiet_stdout()
                raise fail("IO_ERROR", f"cannot write to standard output: {exc.strerror or exc}", None,
                           exc.errno) from None
        params = tensors.numel() if folder else sum(t.numel() for t in tensors.values())
        bpp = 8 * size / params if params else 0.0
        typer.echo(f"{'<stdout>' if to_stdout else out}: {len(tensors)} tensors, {params} parameters, "
                   f"{size} bytes ({bpp:.3f} bits/param, {_ratio_to_fp32(params, size)})", err=to_stdout)


@app.command(cls=_Command)
def decode(
    input: str = typer.Argument(..., metavar=INPUT, help=".tqz file, URL (http(s)://, s3://, ...; streamed), or - "
                                                         "for standard input"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="PATH",
                                          help="output .pt or .safetensors, - for safetensors on standard output, or "
                                               "a folder (any other name): a Hugging Face folder with the files the "
                                               ".tqz carries (default: INPUT less .tqz, plus .decoded.pt, or "
                                               ".decoded/ when it carries a folder's files)"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
    shard_size: str = typer.Option("5GB", "--shard-size", metavar="SIZE",
                                   help="folder output: largest shard (5GB, 500MB, 2GiB)  [default: 5GB]",
                                   show_default=False),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", metavar="N",
                                       help="decode on N threads (0 or default: every core this process may use; "
                                            "a folder output: 1 by default)", show_default=False),
    threads: int = typer.Option(0, "--threads", metavar="N", help="threads for the whole run, shared by its "
                                "processes (0: every core this process may use)  [default: 0]", show_default=False),
) -> None:
    """Decode a .tqz file into a .pt or .safetensors file, or a Hugging Face folder.

    A tensor named __metadata__ (the key safetensors reserves for its metadata) is written to a
    .safetensors output as /__metadata__, with a warning; a folder output refuses it."""
    with _errors(), thread_budget.budget(threads):
        source = _decode_source(input)
        carried: list[str] = []
        if isinstance(source, str):  # the manifest says whether the file carries a folder's files
            with api.open(source) as f:
                carried = sorted(f.files)
        to_stdout = output is not None and str(output) == "-"
        if to_stdout and sys.stdout.isatty():
            raise fail("BAD_OPTION", "refusing to write safetensors bytes to a terminal (redirect standard output)")
        out = output or _default_decode_output(input, folder=bool(carried))
        if not to_stdout and isinstance(source, str) and same_file(out, input):
            raise fail("BAD_OPTION", "output would overwrite the input", out)
        if not to_stdout and out.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors"):
            if not isinstance(source, str):
                raise fail("BAD_OPTION", "a folder output needs a .tqz file or URL, not standard input")
            size = parse_size(shard_size)
            with _progress("decoding") as progress:
                shards = api.decode_folder(source, out, shard_size=size, overwrite=force,
                                           jobs=1 if jobs is None else jobs, progress=progress)
            typer.echo(f"{out}/: {len(shards)} shard{'s' if len(shards) > 1 else ''}"
                       + (f", {len(carried)} carried file{'s' if len(carried) > 1 else ''}" if carried else ""))
            return
        if not to_stdout and out.exists() and not force:
            raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", out)
        tensors = {}
        with _progress("decoding") as progress:
            try:
                for name, t in parallel.iter_decoded(source, parallel.check_jobs(jobs)):
                    tensors[name] = t
                    progress(f"decoding: {name}", len(tensors), 0)
            except TqzError as exc:
                raise exc.with_path("<stdin>") if input == "-" else exc
        if to_stdout:
            try:
                sys.stdout.buffer.write(safetensors_bytes(tensors))
                sys.stdout.buffer.flush()
            except OSError as exc:
                _quiet_stdout()
                raise fail("IO_ERROR", f"cannot write to standard output: {exc.strerror or exc}", None,
                           exc.errno) from None
        else:
            write_model(tensors, out, overwrite=force)
        typer.echo(f"{'<stdout>' if to_stdout else out}: {len(tensors)} tensors", err=to_stdout)
        if carried:
            typer.echo(_carried_note(carried), err=True)


def _search_log(log: object) -> Optional[dict]:
    """The metadata ``tqz.search`` (spec §5.2.1) when it has the documented form, else None (it is
    informative and comes from the file: never trusted)."""
    if not isinstance(log, dict) or not isinstance(log.get("trials"), list) or len(log["trials"]) > 1000:
        return None
    number = (int, float)
    trials = []
    for t in log["trials"]:
        if not (isinstance(t, dict) and all(isinstance(t.get(k), number) and not isinstance(t.get(k), bool)
                                            for k in ("bits", "size", "metric"))
                and isinstance(t.get("passed"), bool)):
            return None
        trials.append({k: t[k] for k in ("bits", "size", "metric", "passed")})
    chosen, threshold = log.get("chosen"), log.get("threshold")
    if not (isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < len(trials)
            and isinstance(threshold, number) and isinstance(log.get("higher_is_better"), bool)):
        return None
    return {"threshold": threshold, "higher_is_better": log["higher_is_better"], "chosen": chosen, "trials": trials}


@app.command(cls=_Command)
def info(
    input: str = typer.Argument(..., metavar=INPUT, help=".tqz file or URL (http(s)://, s3://, ...; read by ranges)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="PNG",
                                        help="also draw the bit-depth map (bits per band, tensor by tensor, dropped "
                                             "bands and transforms marked) as a PNG"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing --plot file"),
) -> None:
    """Show the version, the carried files, and each tensor's mode, shape, bytes and bits per weight."""
    with _errors():
        if input == "-":
            raise fail("BAD_OPTION", "info reads the end of the file first: give a file or URL, not -")
        if plot is not None and plot.exists() and not force:
            raise fail("OUTPUT_EXISTS", "the --plot file exists (use --force to overwrite)", plot)
        with api.open(input) as f:
            rows = []
            for name in f.keys():
                ti = f.info(name)
                rows.append({"name": name, "dtype": ti.dtype, "shape": list(ti.shape), "mode": ti.mode,
                             "coding": _coding(ti.mode, ti.params), "bytes": ti.stored_bytes,
                             "bits_per_weight": (8 * ti.stored_bytes / ti.numel) if ti.numel else 0.0})
            params = sum(f.info(n).numel for n in f.keys())
            total = {"file_bytes": f.file_size, "tensors": len(rows), "parameters": params,
                     "bits_per_param": 8 * f.file_size / params if params else 0.0,
                     "format_version": "%d.%d" % f.version, "manifest_bytes": f.manifest_bytes[0],
                     "manifest_compressed": f.manifest_bytes[1]}
            metadata = {k: v for k, v in f.metadata.items() if isinstance(v, (str, int, float, bool))}
            files = [{"name": n, "bytes": len(b)} for n, b in sorted(f.files.items())]
            search = _search_log(f.metadata.get("tqz.search"))
            if plot is not None:
                plot_allocation(f, plot, overwrite=force)
        if as_json:
            typer.echo(json.dumps({"total": total, "metadata": metadata, "files": files, "search": search,
                                   "tensors": rows}, indent=1))
        else:
            typer.echo(f"{input}: .tqz format {total['format_version']}, {total['tensors']} tensors, "
                       f"{params} parameters, {total['file_bytes']} bytes ({_human(total['file_bytes'])}), "
                       f"{total['bits_per_param']:.3f} bits/param; manifest {total['manifest_bytes']} bytes"
                       + (" (zstd)" if total["manifest_compressed"] else ""))
            if files:
                typer.echo(f"carried files ({len(files)}; tqz decode -o DIR writes them): "
                           + ", ".join(f"{_printable(x['name'])} ({x['bytes']} B)" for x in files))
            if search:
                typer.echo(f"rate search for a metric {'>=' if search['higher_is_better'] else '<='} "
                           f"{search['threshold']:g}: {len(search['trials'])} trials"
                           + "".join(f"\n  {'*' if i == search['chosen'] else ' '} {t['bits']:.3f} bits/param, "
                                     f"{t['size']} bytes, metric {t['metric']:.6g} "
                                     f"{'passes' if t['passed'] else 'fails'}"
                                     for i, t in enumerate(search["trials"])))
            names = [_printable(r["name"]) for r in rows]
            width = max([len(n) for n in names] + [4])
            typer.echo(f"{'name':<{width}}  {'mode':<8} {'dtype':<9} {'shape':<18} {'bytes':>10} {'bits/w':>7}  coding")
            for r, name in zip(rows, names):
                shape = "x".join(map(str, r["shape"])) or "()"
                typer.echo(f"{name:<{width}}  {r['mode']:<8} {r['dtype']:<9} {shape:<18} {r['bytes']:>10} "
                           f"{r['bits_per_weight']:>7.3f}  {r['coding']}".rstrip())
        if plot is not None:
            typer.echo(f"bit-depth map: {plot}", err=as_json)


def _coding(mode: str, params: object) -> str:
    """How a tensor is coded, in a few words: for ``tq`` its bands (runs of rows, or sets of rows
    by ``row_band``), its transform and layout; for ``uniform`` its granularity."""
    if not isinstance(params, dict):
        return ""
    if mode == "tq":
        bands = params.get("band_rows", [])
        words = [f"{len(bands)} band{'s' if len(bands) != 1 else ''}"
                 + (" of rows by row_band" if "row_band" in params else "")]
        if params.get("transform", "none") != "none":
            words.append(f"transform {params['transform']} k={sum(bands)}")
        if params.get("layout", "out_in") != "out_in":
            words.append(f"layout {params['layout']}")
        return ", ".join(words)
    if mode == "uniform":
        return f"per {params.get('granularity', 'tensor')}"
    return ""


@app.command(cls=_Command)
def verify(input: str = typer.Argument(..., metavar=INPUT, help=".tqz file, or - for standard input")) -> None:
    """Check every CRC and structure and decode every tensor."""
    with _errors():
        source = _decode_source(input)
        with _progress("verifying") as progress:
            try:
                report = api.verify(source, progress=progress)
            except TqzError as exc:
                raise exc.with_path("<stdin>") if input == "-" else exc
        typer.echo(f"{'<stdin>' if input == '-' else input}: OK ({report.tensors} tensors, "
                   f"{report.parameters} parameters, {report.file_bytes} bytes)")


@app.command("calibrate", cls=_Command)
def calibrate_command(
    input: Path = typer.Argument(..., metavar=INPUT, help="a Hugging Face folder with a model definition: "
                                 "config.json, safetensors weights, and a tokenizer for --text"),
    text: Optional[Path] = typer.Option(None, "--text", metavar="FILE",
                                        help="calibration text, one sequence per line (empty lines skipped); a "
                                             "model that generates text (GPT-2, Llama) reads it as running text, "
                                             "in windows of its length (default: synthetic token sequences the "
                                             "codec makes)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="PATH",
                                          help="statistics file (default: INPUT.stats.safetensors beside INPUT)"),
    samples: Optional[int] = typer.Option(None, "--samples", metavar="N", help="what to run: the first N "
                                          "non-empty lines of --text (the tokens of every line are counted), or N "
                                          "synthetic ones  [default: 128 lines, 512 synthetic]", show_default=False),
    seed: int = typer.Option(0, "--seed", metavar="S", help="seed of the synthetic sequences and of the "
                             "sensitivity probes  [default: 0]", show_default=False),
    precision: str = typer.Option("compact", "--precision", metavar="P",
                                  help="how H is stored: compact, float64 (lossless), float32, float16 or eig  "
                                       "[default: compact]", show_default=False),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output"),
    threads: int = typer.Option(0, "--threads", metavar="N", help="threads for the run (0: every core this "
                                "process may use)  [default: 0]", show_default=False),
) -> None:
    """Calibration statistics (for encode --stats) of a Hugging Face folder's model, run offline on
    lines of text or on synthetic token sequences; batches of 16 (fewer for a large vocabulary's
    logits), padding masked."""
    with _errors(), thread_budget.budget(threads):
        from .model.calibrate import calibrate_folder
        from .model.stats import PRECISIONS
        if precision not in PRECISIONS:
            raise fail("BAD_OPTION", f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if samples is not None and samples < 1:
            raise fail("BAD_OPTION", f"--samples must be at least 1, not {samples}")
        out = output or input.parent / (input.name.rstrip("/") + ".stats.safetensors")
        if out.exists() and not force:
            raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", out)
        if same_file(out, input) or (text is not None and same_file(out, text)):
            raise fail("BAD_OPTION", "output would overwrite an input", out)
        with _progress("calibrating") as progress:
            stats, summary = calibrate_folder(input, text, samples=samples, seed=seed, progress=progress)
        data = stats.to_bytes(precision=precision)
        with atomic_output(out, overwrite=force) as f:
            f.write(data)
        source = "synthetic sequences" if summary["synthetic"] else f"lines of {text}"
        if summary.get("packed"):  # a generator reads the lines as running text, in windows of its length
            source = f"windows of {summary['lines']} lines of {text}"
        counted = (f"; tokens counted in {summary['counted_lines']} lines ({summary['counted_tokens']} tokens)"
                   if summary["counted_lines"] > summary.get("lines", summary["sequences"]) else "")
        typer.echo(f"{out}: statistics of {summary['tensors']} of {summary['weights']} tensors from "
                   f"{summary['sequences']} {source} ({summary['tokens']} tokens){counted}, {len(data)} bytes")


def main() -> None:
    """Console entry point."""
    _REPORTED.clear()
    try:
        app()
    except TqzError as exc:  # raised outside a command body
        typer.echo(f"tqz: error: {exc}", err=True)
        sys.exit(USAGE_EXIT if exc.code == "BAD_OPTION" else 1)
    except SystemExit as exc:  # typer turns a Ctrl-C outside a command body into exit 130, silently
        if exc.code == 130:
            _interrupted(unless_reported=True)
        raise
    except KeyboardInterrupt:
        _interrupted(unless_reported=True)
        sys.exit(130)
    finally:  # the run is over, its output complete or cleaned up: a Ctrl-C now changes nothing
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()

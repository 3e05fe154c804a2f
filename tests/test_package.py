"""The package's shape: layers that import only downwards, no import cycle, no module reading another
module's private names, a byte layer without torch, and a pinned public surface (API and CLI)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tqcodec

PACKAGE = Path(tqcodec.__file__).parent

# Bottom to top: a module may import from its own layer or a lower one. Within a layer, the cycle
# test keeps the imports acyclic.
LAYERS = [
    ("errors", "limits", "processes"),
    ("format",),
    ("coding",),
    ("modes",),
    ("pipeline",),
    ("io",),
    ("parallel", "threads"),
    ("api",),
    ("model", "plot", "distributed", "cli", "__main__"),
]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (packages by their __init__)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = [package] + list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(root: Path, package: str) -> tuple[dict[str, set[str]], list[str]]:
    """The graph of imports between the package's own modules (at any depth in a file: module
    level and inside functions), and every import of another module's ``_private`` name."""
    mods = modules(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    full = f"{src}.{alias.name}"
                    if full in mods:
                        targets.append(full)
                    elif src in mods:
                        targets.append(src)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{mod} imports {src}.{alias.name}")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in mods]
            for t in targets:
                if t != mod and not mod.startswith(t + "."):  # a module's own package __init__ is no edge
                    graph[mod].add(t)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add its package to the table")


def test_the_checker_finds_a_planted_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import _hidden\n")  # inside a function too
    (pkg / "c.py").write_text("from . import a\n_hidden = 1\n")
    graph, private = imports(pkg, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert private == ["pkg.sub.b imports pkg.c._hidden"]
    (pkg / "c.py").write_text("_hidden = 1\n")
    graph, _ = imports(pkg, "pkg")
    assert cycles(graph) == []


def test_no_import_cycle_and_no_private_import():
    graph, private = imports(PACKAGE, "tqcodec")
    assert len(graph) > 40
    assert cycles(graph) == []
    assert private == []


def test_modules_import_only_from_their_layer_or_below():
    graph, _ = imports(PACKAGE, "tqcodec")
    upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) if a != "tqcodec"
              for b in sorted(targets) if b != "tqcodec" and layer_of(b) > layer_of(a)]
    assert upward == []


def test_the_byte_layer_coding_and_modes_load_without_torch():
    code = ("import sys, tqcodec, tqcodec.format.reader, tqcodec.format.writer, tqcodec.coding, tqcodec.modes; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_format_version_is_the_writers():
    from tqcodec.format import header
    assert tqcodec.FORMAT_VERSION == (header.MAJOR_VERSION, header.MINOR_VERSION)
    # the newest mode, required feature or parameter sets it: since 1.4 tq's row_band (spec §7.5.1)
    assert header.MINOR_VERSION == max(*header.MODE_SINCE_MINOR.values(), *header.FEATURE_SINCE_MINOR.values(),
                                       *header.PARAM_SINCE_MINOR.values())
    import torch
    w = torch.linspace(-1, 1, 600).reshape(20, 30)
    compressed = {f"layer{i}.w": w for i in range(4)}  # four records: the manifest compresses (1.3)
    with tqcodec.open(tqcodec.encode_bytes(compressed, mode="tq", bits=4)) as f:
        assert f.version == (1, 3)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(400, 32)
    weights = 1.0 / (1.0 + torch.randperm(400).float())  # token frequencies in no order of id
    ids = torch.multinomial(weights, 4096, replacement=True, generator=torch.Generator().manual_seed(1))
    stats = tqcodec.calibrate(emb, [ids.reshape(64, 64)])
    with tqcodec.open(tqcodec.encode_bytes(emb.state_dict(), stats=stats, mode="tq", bits=3)) as f:
        assert f.parts("weight")["row_band"] is not None  # bands of rows by frequency, not runs of ids
        assert f.version == tqcodec.FORMAT_VERSION
    with tqcodec.open(tqcodec.encode_bytes({"w": w[:4, :4]}, lossless=True)) as f:
        assert f.version == (1, 0)  # a file declares the lowest version it needs


PUBLIC = ["TqzError", "TqzWarning", "Limits", "EncodeOptions", "TensorInfo", "TqzFile", "VerifyReport", "encode_bytes",
          "iter_tensors", "load", "open", "save", "verify", "__version__", "FORMAT_VERSION", "Stats", "calibrate",
          "load_module", "finetune"]

CLI = {
    "encode": ["--bits", "--evaluate", "--force", "--granularity", "--jobs", "--lossless", "--max", "--min", "--mode",
               "--output", "--quality", "--snr", "--stats", "--threads", "--tq-scope", "-f", "-j", "-o", "input"],
    "decode": ["--force", "--jobs", "--output", "--shard-size", "--threads", "-f", "-j", "-o", "input"],
    "info": ["--force", "--json", "--plot", "-f", "input"],
    "verify": ["input"],
    "calibrate": ["--force", "--output", "--precision", "--samples", "--seed", "--text", "--threads", "-f", "-o",
                  "input"],
}


def test_public_names_are_pinned():
    assert sorted(tqcodec.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(tqcodec, name) is not None
    assert callable(tqcodec.calibrate) and callable(tqcodec.finetune)  # the functions, not their modules


def test_cli_commands_and_options_are_pinned():
    import typer.main
    from tqcodec.cli import app
    cmd = typer.main.get_command(app)
    got = {name: sorted(o for p in c.params for o in p.opts) for name, c in cmd.commands.items()}
    assert got == {k: sorted(v) for k, v in CLI.items()}
    assert sorted(o for p in cmd.params for o in p.opts) == ["--version"]


@pytest.mark.parametrize("name", ["format", "coding", "modes", "pipeline", "io", "model"])
def test_every_package_says_what_it_holds(name):
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text("utf-8")))
    assert doc and len(doc) > 40

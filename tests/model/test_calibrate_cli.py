"""``tqz calibrate`` (tqcodec.cli, tqcodec.model.calibrate.calibrate_folder) on a tiny randomly
initialised BERT folder made here (2 layers, hidden 32, a word-level vocabulary), offline: lines of
text with the padding masked, synthetic sequences, names as the folder's weights, and the refusals
through the real tqz entry point in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the a of and to in is it that was for on are with as this be at by from or an have not which but cat dog "
         "sat mat ran far").split()
LINES = ["the cat sat on the mat", "", "a dog ran far", "this is that", "it was the cat and the dog and the mat",
         "   ", "which is not a cat"]


def make_bert(folder: Path, architectures: tuple = (), with_tokenizer: bool = True, prefix_model: bool = False,
              placeholders: int = 0) -> Path:
    """A randomly initialised BertModel (or BertForMaskedLM's weights with ``prefix_model``) saved
    with save_pretrained, and a BertTokenizer over a small vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(placeholders)] + list(WORDS)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(cfg) if prefix_model else transformers.BertModel(cfg)
    model.save_pretrained(folder)
    if not architectures:  # a config that names no class: AutoModel builds the module
        import json
        c = json.loads((folder / "config.json").read_text())
        c.pop("architectures", None)
        (folder / "config.json").write_text(json.dumps(c))
    if with_tokenizer:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        # the vocabulary file positionally: transformers 5 ignores vocab_file=, 4 names it so
        transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("hf") / "bert", architectures=("BertModel",))


def _tqz() -> list[str]:
    exe = Path(sys.executable).with_name("tqz")  # the console script: tqcodec.cli:main
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tqcodec.cli"]


def _run(cwd: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH", "")) if p)
    p = subprocess.run(_tqz() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _tokens(bert: Path, lines: list[str]) -> int:
    tok = transformers.AutoTokenizer.from_pretrained(str(bert), local_files_only=True)
    return sum(len(tok(ln)["input_ids"]) for ln in lines)


def test_calibrate_text_through_tqz(bert, tmp_path):
    """tqz calibrate FOLDER --text lines.txt -o stats.safetensors: every weight of the folder has
    statistics under its own name, padding counts nowhere, and the statistics encode the folder."""
    (tmp_path / "lines.txt").write_text("\n".join(LINES * 5 + ["to by from or an"]) + "\n")
    p = _run(tmp_path, "calibrate", bert, "--text", "lines.txt", "-o", "stats.safetensors", "--samples", "18")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and "statistics of 39 of 39 tensors from 18 lines" in p.stdout, p.stdout
    every = [ln for ln in LINES * 5 + ["to by from or an"] if ln.strip()]
    assert f"tokens counted in {len(every)} lines ({_tokens(bert, every)} tokens)" in p.stdout, p.stdout
    stats = tqcodec.Stats.load(str(tmp_path / "stats.safetensors"))
    from safetensors import safe_open
    with safe_open(str(bert / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert set(stats.keys()) == names
    used = [ln for ln in LINES * 5 if ln.strip()][:18]
    tokens = _tokens(bert, used)
    emb = stats.get("embeddings.word_embeddings.weight")
    # 18 lines run; the tokens of every line counted (a tokenizer reads more text than the model runs)
    assert emb.kind == "embedding" and emb.rows == tokens and emb.counts.sum() == _tokens(bert, every)
    assert emb.counts[0] == 0  # [PAD] never counted
    assert emb.counts[2] == emb.counts[3] == len(every)  # [CLS] and [SEP] once per line
    tok = transformers.AutoTokenizer.from_pretrained(str(bert), local_files_only=True)
    late = set(tok(" ".join(every[18:]))["input_ids"]) - set(tok(" ".join(used))["input_ids"])
    assert late and all(emb.counts[i] > 0 for i in late)  # words only the lines not run hold
    (tmp_path / "run.txt").write_text("\n".join(used) + "\n")
    from tqcodec.model.calibrate import calibrate_folder
    alone, summary = calibrate_folder(bert, tmp_path / "run.txt")
    assert summary["counted_lines"] == 18 and alone.get("embeddings.word_embeddings.weight").counts.sum() == tokens
    for other in ("embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"):
        assert np.array_equal(stats.get(other).counts, alone.get(other).counts)  # the lines run
    q = stats.get("encoder.layer.0.attention.self.query.weight")
    # the layers also see 8 rounds of sequences spliced from the 18 (tqcodec.model.views), padding masked
    assert q.kind == "linear" and q.rows > 4 * tokens and q.h.shape == (1, 32, 32) and q.gain > 0
    assert stats.get("encoder.layer.1.intermediate.dense.weight").h.shape == (1, 32, 32)
    assert not stats.synthetic
    from tqcodec.io.hf import read_folder
    weights, _ = read_folder(bert)
    tqcodec.save(dict(weights.items()), tmp_path / "bert.tqz", stats=stats, bits=4)
    assert set(tqcodec.load(tmp_path / "bert.tqz")) == names


def test_calibrate_synthetic_through_tqz(bert, tmp_path):
    """Without data: synthetic sequences (default output name beside the folder)."""
    work = tmp_path / "w"
    work.mkdir()
    link = work / "bert"
    link.symlink_to(bert, target_is_directory=True)
    p = _run(work, "calibrate", "bert", "--samples", "20", "--seed", "3")
    assert p.returncode == 0, p.stderr
    assert "20 synthetic sequences" in p.stdout and (work / "bert.stats.safetensors").exists()
    stats = tqcodec.Stats.load(str(work / "bert.stats.safetensors"))
    assert len(stats.keys()) == 39 and stats.get("embeddings.word_embeddings.weight").counts[0] == 0
    assert stats.synthetic  # said in the file: the encoder does not band rows by its sensitivities
    p = _run(work, "calibrate", "bert", "--samples", "20")
    assert p.returncode == 1 and "OUTPUT_EXISTS" in p.stderr and p.stderr.count("\n") == 1


def test_synthetic_tokens_follow_the_vocabulary_order_and_skip_placeholders(tmp_path):
    from tqcodec.model.calibrate import calibrate_folder, load_folder_model, synthetic_batches
    model, config, tok = load_folder_model(make_bert(tmp_path / "b", placeholders=6))
    batches = synthetic_batches(200, model, config, tok, seed=0)
    ids = torch.cat([b["input_ids"][b["attention_mask"] == 1] for b in batches])
    words = ids[~torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id]))]
    first_word = 5 + 6
    assert int(words.min()) >= first_word  # no special token, no [unusedN]
    counts = torch.bincount(words - first_word, minlength=len(WORDS)).float()
    assert counts.min() > 0  # every word is drawn
    half = len(WORDS) // 2
    assert counts[:half].sum() > 2 * counts[half:].sum()  # Zipf: the vocabulary's first words most often
    # the word embedding's statistics count each drawn id by the law, not by the sample
    stats, _ = calibrate_folder(tmp_path / "b", samples=20, seed=0)
    counts = [s.counts for s in stats.tensors.values() if s.kind == "embedding" and len(s.counts) == len(tok)][0]
    assert (counts[5:first_word] == 0).all() and (np.diff(counts[first_word:]) < 0).all()


def test_synthetic_inputs_are_seeded_and_like_sentences(bert):
    from tqcodec.model.calibrate import calibrate_folder, load_folder_model, synthetic_batches
    model, config, tok = load_folder_model(bert)
    batches = synthetic_batches(100, model, config, tok, seed=1)
    assert [len(b["input_ids"]) for b in batches] == [16] * 6 + [4]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).float()
    assert 12 < float(lengths.median()) < 30 and int(lengths.min()) >= 4 + 2 and int(lengths.max()) <= 64
    ids = torch.cat([b["input_ids"][b["attention_mask"] == 1] for b in batches])
    assert int(ids.max()) < config.vocab_size
    specials = set(tok.all_special_ids)
    firsts = {int(b["input_ids"][i, 0]) for b in batches for i in range(len(b["input_ids"]))}
    assert firsts == {tok.cls_token_id} and (ids[torch.isin(ids, torch.tensor(sorted(specials)))].numel()
                                             == 2 * len(lengths))  # only [CLS] and [SEP] among the specials
    from tqcodec.model.calibrate import SYNTHETIC_SAMPLES
    assert calibrate_folder(bert)[1]["sequences"] == SYNTHETIC_SAMPLES  # the synthetic default
    a, _ = calibrate_folder(bert, samples=24, seed=5)
    b, _ = calibrate_folder(bert, samples=24, seed=5)
    c, _ = calibrate_folder(bert, samples=24, seed=6)
    assert a.to_bytes() == b.to_bytes() != c.to_bytes()
    assert a.synthetic  # the encoder does not band rows by sensitivities measured on them


def test_checkpoint_names_follow_the_weights(tmp_path):
    """A config naming no class (AutoModel: BertModel) over BertForMaskedLM's weights ('bert.'
    prefix): the statistics carry the weights' names."""
    from tqcodec.model.calibrate import calibrate_folder
    folder = make_bert(tmp_path / "mlm", prefix_model=True)
    stats, summary = calibrate_folder(folder, samples=8)
    assert "bert.encoder.layer.0.attention.self.query.weight" in stats.keys()
    assert all(n.startswith(("bert.", "cls.")) for n in stats.keys())
    assert summary["tensors"] == len(stats.keys()) and summary["weights"] > summary["tensors"]  # no head in BertModel


def test_refusals_through_tqz(bert, tmp_path):
    """One line on stderr each: no model definition, an empty text file (BAD_INPUT, exit 1);
    --samples 0 and transformers missing (BAD_OPTION, exit 2)."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes((bert / "model.safetensors").read_bytes())
    (tmp_path / "empty.txt").write_text("\n  \n")
    shadow = tmp_path / "shadow" / "transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    cases = [
        (("calibrate", "weights"), 1, "no model definition", ""),
        (("calibrate", bert, "--text", "empty.txt"), 1, "holds no line of text", ""),
        (("calibrate", bert, "--samples", "0"), 2, "--samples must be at least 1", ""),
        (("calibrate", bert), 2, "needs transformers: pip install transformers", str(tmp_path / "shadow")),
    ]
    for args, code, words, pythonpath in cases:
        p = _run(tmp_path, *args, pythonpath=pythonpath)
        assert p.returncode == code, (args, p.stderr)
        assert words in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
        assert ("BAD_OPTION" if code == 2 else "BAD_INPUT") in p.stderr
    assert not list(tmp_path.glob("*.stats.safetensors"))


def test_calibrate_folder_refusals(bert, tmp_path):
    """A weights file alone, a folder without tokenizer files for --text (transformers would make
    an empty tokenizer), samples < 1."""
    from tqcodec.model.calibrate import calibrate_folder
    with pytest.raises(TqzError, match="no model definition") as e:
        calibrate_folder(bert / "model.safetensors")
    assert e.value.code == "BAD_INPUT"
    notok = tmp_path / "notok"
    notok.mkdir()
    for n in ("config.json", "model.safetensors"):
        (notok / n).write_bytes((bert / n).read_bytes())
    (tmp_path / "lines.txt").write_text("the cat\n")
    with pytest.raises(TqzError, match="no tokenizer") as e:
        calibrate_folder(notok, tmp_path / "lines.txt")
    assert e.value.code == "BAD_INPUT"
    stats, summary = calibrate_folder(notok, samples=3)  # synthetic inputs need no tokenizer
    assert summary["synthetic"] and summary["sequences"] == 3 and len(stats.keys()) == 39
    for bad in (0, -1, 1.5):
        with pytest.raises(TqzError, match="samples") as e:
            calibrate_folder(bert, samples=bad)
        assert e.value.code == "BAD_OPTION"


CODE = ["def f(x):", "    if x:", "        return x + 1", "", "    return 0", "class A:", "    pass"]


def make_gpt2(folder: Path) -> Path:
    """A randomly initialised GPT2LMHeadModel (output layer tied to the token embedding, 16
    positions) and a byte-level BPE tokenizer trained on ``CODE``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CODE * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                         model_max_length=16).save_pretrained(folder)
    return folder


def test_a_text_generator_is_calibrated_on_running_text(tmp_path):
    """A model that generates text (GPT-2) reads the calibration lines as running text: joined by
    newlines with their indentation and empty lines, cut into windows of its 16 positions. Its
    token embedding, tied to the output layer, gets each row's output sensitivity. A BERT folder
    keeps one sequence a line (test_calibrate_text_through_tqz)."""
    from tqcodec.model.calibrate import calibrate_folder
    gpt2 = make_gpt2(tmp_path / "gpt2")
    text = tmp_path / "code.py"
    text.write_text("\n".join(CODE) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(str(gpt2), local_files_only=True)
    ids = tok("\n".join(CODE), add_special_tokens=False)["input_ids"]
    assert len(ids) > 16  # more than one window
    stats, summary = calibrate_folder(gpt2, text)
    assert summary["packed"] and summary["lines"] == 6
    assert summary["tokens"] == len(ids) and summary["sequences"] == -(-len(ids) // 16)
    wte = stats.tensors["transformer.wte.weight"]
    assert wte.kind == "embedding" and wte.row_gain is not None and len(wte.row_gain) == len(wte.counts)
    assert np.asarray(wte.counts).sum() == len(ids)  # counted as run: no line's tokens twice, indentation kept
    p = _run(tmp_path, "calibrate", gpt2, "--text", text, "-o", tmp_path / "s.safetensors")
    assert p.returncode == 0, p.stderr
    assert f"from {summary['sequences']} windows of 6 lines of" in p.stdout, p.stdout


def test_running_text_without_a_padding_token_runs_one_window_at_a_time(tmp_path):
    """A generator whose tokenizer has neither a padding nor an end-of-text token still reads the
    lines as windows: one a batch, nothing to pad."""
    from tqcodec.model.calibrate import load_folder_model, text_batches
    model, config, tok = load_folder_model(make_gpt2(tmp_path / "gpt2"))
    tok.pad_token = None
    tok.eos_token = None
    batches = text_batches(CODE, model, config, tok, batch_size=16)
    ids = tok("\n".join(CODE), add_special_tokens=False)["input_ids"]
    assert [len(b["input_ids"]) for b in batches] == [1] * -(-len(ids) // 16)
    assert [t for b in batches for t in b["input_ids"][0].tolist()] == ids


def test_a_large_vocabulary_takes_fewer_sequences_a_batch(tmp_path, bert, monkeypatch):
    """Where the output layer scores the whole vocabulary, a batch holds at most OUTPUT_ELEMENTS
    logits, counted at the batch's own longest sequence (at least one sequence), so short
    sequences share a batch that long ones could not; a model without such an output layer
    (BertModel) keeps its 16."""
    import tqcodec.model.calibrate as cal
    monkeypatch.setattr(cal, "OUTPUT_ELEMENTS", 100)
    assert cal.fill_batches([5, 5, 5, 20, 5, 5, 1, 1], 16, 10) == [[0, 1], [2], [3], [4, 5], [6, 7]]
    assert cal.fill_batches([1] * 5, 2, 10) == [[0, 1], [2, 3], [4]]
    assert cal.fill_batches([50] * 3, 16, 0) == [[0, 1, 2]]  # no output layer over a vocabulary
    gpt2 = make_gpt2(tmp_path / "gpt2")
    model, config, tok = cal.load_folder_model(gpt2)
    assert cal.logits_per_token(model, config) == config.vocab_size
    monkeypatch.setattr(cal, "OUTPUT_ELEMENTS", 6 * 8 * config.vocab_size)
    batches = cal.synthetic_batches(64, model, config, tok, seed=0)
    widths = [b["input_ids"].shape for b in batches]
    assert all(n * w * config.vocab_size <= cal.OUTPUT_ELEMENTS or n == 1 for n, w in widths)
    assert max(n for n, _ in widths) > 1 and sum(n for n, _ in widths) == 64
    bmodel, bconfig, btok = cal.load_folder_model(bert)
    assert cal.logits_per_token(bmodel, bconfig) == 0
    assert [len(b["input_ids"]) for b in cal.text_batches(["a line of text"] * 40, bmodel, bconfig, btok)] == [16, 16, 8]
    monkeypatch.setattr(cal, "OUTPUT_ELEMENTS", 1)
    text = tmp_path / "code.py"
    text.write_text("\n".join(CODE) + "\n")
    totals = []
    stats, summary = cal.calibrate_folder(gpt2, text, progress=lambda what, done, total: totals.append(total)
                                          if what == "batches" else None)
    assert summary["sequences"] > 1 and max(totals) == summary["sequences"]  # one window a batch


def test_calibrating_a_folder_probes_within_the_budget(tmp_path, bert, monkeypatch):
    """calibrate_folder hands calibrate the probe batches the budget allows."""
    import tqcodec.model.calibrate as cal
    asked = []
    real = cal.calibrate

    def recording(*args, **kwargs):
        asked.append(kwargs.get("sensitivity_batches"))
        return real(*args, **kwargs)
    monkeypatch.setattr(cal, "calibrate", recording)
    cal.calibrate_folder(bert, samples=48)
    monkeypatch.setattr(cal, "PROBE_WORK", 1)
    cal.calibrate_folder(bert, samples=48)
    assert asked == [cal.PROBE_BATCHES, 1]

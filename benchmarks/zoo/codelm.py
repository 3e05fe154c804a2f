"""codelm-gpt2: a small GPT-2 causal language model of Python source, trained here.

1,334,016 parameters (``GPT2LMHeadModel``: 4 layers, width 128, 4 heads, 128 positions, a
4,096-token byte-level BPE vocabulary; the output layer is the token embedding, tied). What a codec
meets here that the other zoo models lack: a vocabulary table that is both the input embedding
and the output layer, Hugging Face ``Conv1D`` weights stored ``[in, out]``, and a causal model
whose every position's prediction counts.

Corpus: the top-level ``.py`` files of the running interpreter's standard library, sorted by
name; file i is evaluation text when i % 8 == 0, calibration text when i % 8 == 1, training
text otherwise. The tokenizer is trained on the training files (deterministic). The model is
trained from a fixed seed on one thread: AdamW, one-cycle schedule, ``STEPS`` steps of ``BATCH``
random windows of ``CONTEXT`` tokens (about 10 minutes on one core). The trained model is kept as
a Hugging Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``: what ``tqz
calibrate FOLDER --text`` reads) at ``$TQ_ZOO_CACHE/codelm-gpt2/``, else
``benchmarks/results/tmp/zoo/codelm-gpt2/``.

The metric is ``ppl_ratio``: the reference's perplexity on the evaluation text (every
non-overlapping window of ``CONTEXT`` tokens) over the candidate's (1.0 for the reference, lower
is worse). Transparent: ``ppl_ratio >= 0.99``, a perplexity at most about 1% above the
reference's.

    build_module()              -> GPT2LMHeadModel (untrained)
    folder()                    -> the trained model's Hugging Face folder (trained on first use)
    reference_state_dict()      -> the trained weights, as the folder's safetensors holds them
    calibration_inputs(n)       -> int64 [n, CONTEXT] token windows of the calibration files
    calibration_text(path, n)   -> writes the first n non-empty lines of the calibration files
    evaluate(sd, ref_sd)        -> {"value": ppl_ratio, "ppl", "reference_ppl", "top1_agreement", ...}
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from .shared import CACHE_ENV, check_candidate, deterministic_torch, fingerprint

NAME = "codelm-gpt2"
METRIC = "ppl_ratio"
TRANSPARENT = 0.99  # reference perplexity over the candidate's at or above this: transparent

VOCAB = 4096
WIDTH = 128
LAYERS = 4
HEADS = 4
CONTEXT = 128
STEPS = 1200
BATCH = 32
LR = 3e-3
SEED = 0
EVAL_BATCH = 64
TIED = ("lm_head.weight",)  # the output layer is the token embedding: not in the weights file

ROOT = Path(__file__).resolve().parent.parent.parent


def corpus_files() -> list[str]:
    """The standard library's top-level ``.py`` files, sorted."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def _texts(part: int) -> list[str]:
    """Texts of the files of one part: 0 evaluation, 1 calibration, 2 training."""
    out = []
    for i, f in enumerate(corpus_files()):
        p = 0 if i % 8 == 0 else 1 if i % 8 == 1 else 2
        if p == part:
            with open(f, encoding="utf-8", errors="replace") as fh:
                out.append(fh.read())
    return out


def folder() -> Path:
    """The trained model's Hugging Face folder, trained and written on first use."""
    root = os.environ.get(CACHE_ENV)
    path = (Path(root) if root else ROOT / "benchmarks" / "results" / "tmp" / "zoo") / NAME
    if not (path / "model.safetensors").is_file():
        _train_into(path)
    return path


def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(2), trainer=trainer)
    return tok


def build_module() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     use_cache=False)
    m = GPT2LMHeadModel(cfg)
    m.eval()
    return m


def _ids(tok, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(tok.encode(t).ids, dtype=np.int64) for t in texts])


def _train_into(path: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    tok = _tokenizer_object()
    ids = _ids(tok, _texts(2))
    with deterministic_torch():
        torch.manual_seed(SEED)
        m = build_module()
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.05)
        g = np.random.default_rng(SEED)
        for step in range(STEPS):
            starts = g.integers(0, len(ids) - CONTEXT, BATCH)
            x = torch.from_numpy(np.stack([ids[s:s + CONTEXT] for s in starts]))
            loss = m(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            sched.step()
        m.eval()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(str(tmp), safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            model_max_length=CONTEXT).save_pretrained(str(tmp))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        from tokenizers import Tokenizer
        _TOK = Tokenizer.from_file(str(folder() / "tokenizer.json"))
    return _TOK


def reference_state_dict(cache: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The folder's weights (``cache`` is not used: the folder is this model's cache)."""
    from safetensors.torch import load_file
    return load_file(str(folder() / "model.safetensors"))


def _windows(texts: list[str]) -> torch.Tensor:
    ids = _ids(tokenizer(), texts)
    n = len(ids) // CONTEXT
    return torch.from_numpy(ids[:n * CONTEXT].reshape(n, CONTEXT))


def calibration_inputs(n: Optional[int] = 128) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of the calibration files' tokens (None: all)."""
    w = _windows(_texts(1))
    if n is None:
        return w
    if n > len(w):
        raise ValueError(f"the calibration text holds {len(w)} windows, not {n}")
    return w[:n]


def calibration_text(path: str, n: Optional[int] = None) -> int:
    """Write the first ``n`` non-empty lines of the calibration files to ``path`` (all when None);
    returns how many were written. What a user would give ``tqz calibrate --text``."""
    lines = [ln for t in _texts(1) for ln in t.splitlines() if ln.strip()]
    lines = lines if n is None else lines[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


_MODULE: Optional[torch.nn.Module] = None
_REF: dict = {}


@torch.no_grad()
def _nll_and_argmax(sd: Mapping[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    global _MODULE
    if _MODULE is None:
        _MODULE = build_module()
    missing = set(_MODULE.state_dict()) - set(sd)
    _MODULE.load_state_dict(dict(sd), strict=False)
    if missing - {"lm_head.weight"}:
        raise ValueError(f"missing weights: {sorted(missing)[:3]}")
    _MODULE.tie_weights()
    x = _windows(_texts(0))
    total, preds = 0.0, []
    for i in range(0, len(x), EVAL_BATCH):
        xb = x[i:i + EVAL_BATCH]
        logits = torch.nan_to_num(_MODULE(input_ids=xb).logits.float())
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        total += -lp.gather(-1, xb[:, 1:, None]).sum().item()
        preds.append(logits.argmax(-1))
    return total / (len(x) * (CONTEXT - 1)), torch.cat(preds)


def evaluate(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
    """Perplexity of ``sd`` on the evaluation text against the reference's (``value``: the
    reference's over the candidate's), and the share of positions whose most likely next token
    is the reference's."""
    nonfinite = check_candidate(sd, reference)
    key = fingerprint(reference)
    if key not in _REF:
        _REF.clear()
        _REF[key] = _nll_and_argmax(reference)
    ref_nll, ref_top = _REF[key]
    nll, top = _nll_and_argmax(sd)
    return {"model": NAME, "metric": METRIC, "value": math.exp(ref_nll - nll), "reference": 1.0,
            "ppl": math.exp(nll), "reference_ppl": math.exp(ref_nll),
            "top1_agreement": (top == ref_top).float().mean().item(), "nonfinite_tensors": nonfinite}


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT


if __name__ == "__main__":  # python -m benchmarks.zoo.codelm: train (if needed) and report
    ref = reference_state_dict()
    print(folder(), sum(v.numel() for v in ref.values()), "parameters", evaluate(ref, ref))

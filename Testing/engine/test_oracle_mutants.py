"""The oracles catch broken code: each mutant below is the engine with one deliberate mistake,
applied by rewriting one line of its source, and the oracle that guards that piece must fail.

A mutant is a source edit of one module; the edited module is executed and its functions and
class methods are swapped in wherever the originals are used, for this test only. The same
oracles pass on the unmutated engine in test_oracles.py.
"""

from __future__ import annotations

import inspect
import sys
import types

import oracles
import pytest

from SlicerSGP.method import memory, propagation, support
from SlicerSGP.method import slice_predictor as step


def apply_mutant(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, old: str,
                 new: str) -> None:
    source = inspect.getsource(module)
    assert source.count(old) == 1, f"mutant target not found exactly once in {module.__name__}"
    mutated = types.ModuleType(module.__name__)
    mutated.__dict__["__file__"] = module.__file__
    exec(compile(source.replace(old, new), module.__file__, "exec"), mutated.__dict__)
    users = [m for name, m in list(sys.modules.items())
             if m is not None and (name.startswith("SlicerSGP") or name == "oracles")]
    for name, obj in vars(mutated).items():
        original = getattr(module, name, None)
        if isinstance(obj, type) and isinstance(original, type) and obj.__module__ == module.__name__:
            for attr, value in vars(obj).items():
                if inspect.isfunction(value) and attr in vars(original):
                    monkeypatch.setattr(original, attr, value)
        elif inspect.isfunction(obj) and inspect.isfunction(original) \
                and original.__module__ == module.__name__:
            for user in users:
                for attr, value in list(vars(user).items()):
                    if value is original:
                        monkeypatch.setattr(user, attr, obj)


@pytest.fixture(scope="module")
def scaled():
    return oracles.oracle_segmenter()


@pytest.fixture(scope="module")
def plain():
    return oracles.oracle_segmenter(scale_temporal=False)


VIDEO_MUTANTS = {
    "bank temporal index off by one": (
        memory, "mem_pos + sam.maskmem_tpos_enc[t_rel - 1]", "mem_pos + sam.maskmem_tpos_enc[t_rel]"),
    "support temporal index 0": (
        memory, "mem_pos + sam.maskmem_tpos_enc[n_mem - 1]", "mem_pos + sam.maskmem_tpos_enc[0]"),
    "no temporal encoding on the bank": (
        memory, "memory_pos.append(mem_pos + sam.maskmem_tpos_enc[t_rel - 1])",
        "memory_pos.append(mem_pos)"),
    "no object pointer": (memory, "if pointers is not None:", "if False:"),
}


@pytest.mark.parametrize("name", list(VIDEO_MUTANTS))
def test_video_predictor_oracle_catches(name, scaled, monkeypatch):
    module, old, new = VIDEO_MUTANTS[name]
    apply_mutant(monkeypatch, module, old, new)
    with pytest.raises(AssertionError, match="video predictor"):
        oracles.check_video_predictor(scaled, False, monkeypatch)


def test_eviction_oracle_catches_fifo_in_place_of_least_similar(plain, monkeypatch):
    apply_mutant(monkeypatch, memory, 'if policy == "fifo":', "if True:")
    with pytest.raises(AssertionError, match="dropped the more similar"):
        oracles.check_least_similar_eviction(plain, monkeypatch)


def test_fusion_oracle_catches_equal_weights(plain, monkeypatch):
    apply_mutant(monkeypatch, propagation, "return 1.0 / max(d, 1)", "return 1.0")
    with pytest.raises(AssertionError, match="fused probability"):
        oracles.check_fusion_weights(plain)


def test_top_k_oracle_catches_first_k(plain, monkeypatch):
    apply_mutant(monkeypatch, support, "chosen = sorted(order[:k])", "chosen = list(range(k))")
    with pytest.raises(AssertionError, match="less similar item"):
        oracles.check_top_k(plain)


@pytest.mark.parametrize("old, new, message", [
    ("                final_high = gated", "                pass", "final mask survived"),
    ("obj_ptr = kept + newly_absent * sam.no_obj_ptr", "pass", "pointer does not say"),
], ids=["no gating", "pointer not gated"])
def test_gating_oracle_catches(old, new, message, monkeypatch):
    apply_mutant(monkeypatch, step, old, new)
    with pytest.raises(AssertionError, match=message):
        oracles.check_gating(monkeypatch)

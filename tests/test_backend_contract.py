"""Both backends satisfy the contract in rawpaged/backend/base.py, and the check catches a gap."""
from __future__ import annotations

import types

import pytest

from rawpaged.backend import base, cpu, cuda


@pytest.mark.parametrize("backend", [cpu, cuda], ids=["cpu", "cuda"])
def test_backend_satisfies_the_contract(backend):
    assert base.check_backend(backend) == []


def test_contract_lists_the_ops_the_engine_uses():
    ops = base.contract_ops()
    for op in ("paged_attention", "reshape_and_cache", "copy_blocks", "swap_blocks", "alloc_pinned",
               "swap_stream", "record_event", "wait_event", "linear", "resolve_dtype"):
        assert op in ops


def _copy_of(module, **changes):
    fake = types.ModuleType("fake_backend")
    fake.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    for k, v in changes.items():
        if v is None:
            delattr(fake, k)
        else:
            setattr(fake, k, v)
    return fake


def test_a_missing_op_is_named():
    problems = base.check_backend(_copy_of(cpu, relu=None))
    assert len(problems) == 1 and "missing op relu" in problems[0]


def test_a_reordered_signature_is_named():
    problems = base.check_backend(_copy_of(cpu, rms_norm=lambda weight, x, eps: x))
    assert len(problems) == 1 and "rms_norm" in problems[0] and "differs" in problems[0]


def test_a_missing_attribute_is_named():
    assert base.check_backend(_copy_of(cpu, xp=None)) == ["missing attribute 'xp'"]


def test_cpu_swap_ops_are_synchronous_noops():
    pool = cpu.alloc_pinned((2, 3), "float32")
    assert pool.shape == (2, 3)
    stream = cpu.swap_stream()
    assert stream is None and cpu.record_event(stream) is None
    cpu.wait_event(None)
    assert 0 < cpu.free_device_memory() <= cpu.total_device_memory()

"""The CUDA-autocast emulation of ``benchmarks/loss_precision.py``: inside it, ``F.softmax``,
``F.log_softmax`` and ``torch.sum`` of fp16 tensors compute in fp32 (autocast's float32 list), other
fp16 arithmetic stays fp16, and everything is restored afterwards."""
import types

import torch
import torch.nn.functional as F
from repo_files import load_repo_file


def _bench():
    return load_repo_file("benchmarks/loss_precision.py")


def test_autocast_emulation_promotes_exactly_the_float32_list_ops_and_restores():
    bench = _bench()
    official = types.SimpleNamespace(F=F)   # stands for the official main_ibot module
    x = (torch.randn(4, 8) * 30).half()
    real_sum = torch.sum
    with bench.cuda_autocast_fp32_ops(official):
        assert official.F.softmax(x, dim=-1).dtype == torch.float32
        assert official.F.log_softmax(x, dim=-1).dtype == torch.float32
        assert torch.sum(x, dim=0).dtype == torch.float32
        assert torch.equal(official.F.log_softmax(x, dim=-1), F.log_softmax(x.float(), dim=-1))
        assert (x / 0.1).dtype == torch.float16          # the student-temperature division stays fp16
        assert x.mean(1).dtype == torch.float16          # so does the per-image patch mean
        assert official.F.relu is F.relu
    assert official.F is F and torch.sum is real_sum
    assert F.softmax(x, dim=-1).dtype == torch.float16

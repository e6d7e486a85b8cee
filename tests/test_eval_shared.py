"""Issue 13: the one implementation of each shared evaluation piece (unwrap, autocast_context, prefix
stripping and state-dict selection, the k-NN feature dumps)."""
import contextlib

import pytest
import torch
from torch import nn

from ibot.eval.knn import FEATURE_FILES, key_dump_dir, load_feature_dump, save_feature_dump
from ibot.eval.weights import PretrainedWeightsError, select_state_dict, state_dict_by_model_key, strip_prefixes
from ibot.utils.distributed import unwrap
from ibot.utils.precision import autocast_context, resolve_precision


class _Holder(nn.Module):
    """An EMA-style wrapper: the model sits in ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrap_peels_every_wrapper_layer():
    net = nn.Linear(3, 2)
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(net)) is net
    assert unwrap(_Holder(_Holder(net))) is net
    compiled = torch.compile(net)
    assert unwrap(compiled) is net and unwrap(_Holder(compiled)) is net

    class NotAModule:
        module = "x"
    obj = NotAModule()
    assert unwrap(obj) is obj  # a non-module ``.module`` attribute is not a wrapper


@pytest.mark.parametrize("precision, expected", [
    ("fp32", None), (False, None), (None, None), ("bf16", torch.bfloat16), ("fp16", torch.float16),
    (True, torch.bfloat16)])  # True = fine-tuning's use_amp: fp16 on CUDA, bf16 elsewhere
def test_autocast_context_names_and_bool_on_cpu(precision, expected):
    with autocast_context(torch.device("cpu"), precision):
        enabled = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
        y = nn.Linear(4, 4)(torch.ones(2, 4))
    assert enabled == (expected is not None)
    if expected is not None:
        assert dtype == expected and y.dtype == expected
    else:
        assert y.dtype == torch.float32
    assert isinstance(autocast_context("cpu", "fp32"), contextlib.nullcontext)


def test_resolve_precision():
    assert resolve_precision(True, "cuda") == "fp16" and resolve_precision(True, torch.device("cpu")) == "bf16"
    assert resolve_precision(False, "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp64"):
        resolve_precision("fp64", "cpu")


def test_strip_prefixes_is_one_function_for_both_uses():
    t = torch.zeros(1)
    sd = {"module.backbone.blocks.0.module.w": t, "_orig_mod.module.norm.b": t}
    assert set(strip_prefixes(sd)) == {"blocks.0.module.w", "norm.b"}
    # the fine-tuning call (module. / backbone. only) keeps a torch.compile prefix, as before
    assert set(strip_prefixes(sd, ("module.", "backbone."))) == {"blocks.0.module.w", "_orig_mod.module.norm.b"}
    assert set(strip_prefixes({"w": t}, ("", "module."))) == {"w"}  # an empty prefix is ignored
    with pytest.raises(PretrainedWeightsError, match="'w'"):
        strip_prefixes({"module.w": t, "w": t})


def test_state_dict_by_model_key_vs_select_state_dict():
    t = torch.zeros(1)
    ckpt = {"model": {"a": t}, "module": {"b": t}, "epoch": 3}
    assert state_dict_by_model_key(ckpt, ["model", "module"]) == ({"a": t}, "model")
    assert state_dict_by_model_key(ckpt, ["module", "model"]) == ({"b": t}, "module")
    assert state_dict_by_model_key({"x": t}, ["model"]) == ({"x": t}, None)  # whole file, no error
    with pytest.raises(TypeError):
        state_dict_by_model_key([t], ["model"])
    # the evaluation rule descends and names what is there
    assert select_state_dict({"teacher": {"state_dict": {"c": t}}}, "teacher")[0] == {"c": t}
    with pytest.raises(PretrainedWeightsError, match="student"):
        select_state_dict({"student": {"c": t}, "epoch": 1}, "teacher")


def test_feature_dump_round_trip(tmp_path, capsys):
    train_f, test_f = torch.randn(5, 3), torch.randn(2, 3)
    train_l, test_l = torch.arange(5) % 2, torch.tensor([1, 0], dtype=torch.int32)
    save_feature_dump(str(tmp_path / "d"), train_f, train_l, test_f, test_l)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(FEATURE_FILES)
    a, b, c, d = load_feature_dump(str(tmp_path / "d"))
    assert torch.equal(a, train_f) and torch.equal(c, test_f) and torch.equal(b, train_l)
    assert d.dtype == torch.int64 and d.tolist() == [1, 0]
    assert "Features dumped to" in capsys.readouterr().out
    (tmp_path / "d" / "testlabels.pth").unlink()
    with pytest.raises(FileNotFoundError, match="testlabels.pth"):
        load_feature_dump(str(tmp_path / "d"))
    assert key_dump_dir("out", "teacher", ["teacher"]) == "out"
    assert key_dump_dir("out", "student", ["teacher", "student"]).endswith("out/student")
    assert key_dump_dir(None, "student", ["teacher", "student"]) is None


def _gather_worker(rank, world, init_file, out_path):
    """One rank of test_sharded_extraction_equals_one_process: extract with a DistributedSampler."""
    import torch.distributed as dist

    from ibot.eval.features import IndexedDataset, build_backbone, extract_features, make_loader
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_backbone("vit_tiny", patch_size=8, img_size=16)
        loader = make_loader(IndexedDataset(_images()), batch_size=3)
        assert type(loader.sampler).__name__ == "DistributedSampler"
        feats, labels = extract_features(model, loader)
        if rank == 0:
            torch.save({"features": feats, "labels": labels}, out_path)
    finally:
        dist.destroy_process_group()


def _images(n=7):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 16, 16, generator=g), i % 3) for i in range(n)]


@pytest.mark.slow
def test_sharded_extraction_equals_one_process(tmp_path):
    """extract_features on 2 gloo ranks (uneven shards of 7 images, all-gathered with
    ibot.utils.distributed.concat_all_gather) gives the one-process features, row i = image i."""
    import torch.multiprocessing as mp

    from ibot.eval.features import IndexedDataset, build_backbone, extract_features, make_loader
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=16)
    feats, labels = extract_features(model, make_loader(IndexedDataset(_images()), batch_size=3, distributed=False))
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert labels.tolist() == [i % 3 for i in range(7)] and torch.equal(got["labels"], labels)
    torch.testing.assert_close(got["features"], feats, rtol=1e-5, atol=1e-6)

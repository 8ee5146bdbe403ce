"""The per-scene feature cache: same losses, gradients and tables as without it; never stale, never half-read."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.collate import move_batch
from model.build import build_lfllm
from model.options import ModelOptions
from model.trainable import TrainableOptions, make_trainable, unwrap
from tests.conftest import TINY_DS
from training.config import parse_config
from training.evaluate import evaluate
from training.features import FeatureCacheError, open_store, prepare_feature_cache
from training.loaders import build_train_loader, build_val_loader
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(base, data, cache: Path, *extra):
    return parse_config(
        ["--version", str(base["llava"]), "--vision_pretrained", str(base["sam"]), "--dataset_dir", str(data),
         "--refer_seg_data", TINY_DS, "--val_dataset", f"{TINY_DS}|syn|val", "--precision", "fp32",
         "--batch_size", "2", "--grad_accumulation_steps", "1", "--steps_per_epoch", "3", "--workers", "0",
         "--feature_cache", str(cache), *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_base):
    torch.manual_seed(0)
    model, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions())
    wrapped = make_trainable(model, TrainableOptions(lora_dropout=0.0))
    return wrapped, tok


def _loss_and_grads(wrapped, batch):
    wrapped.zero_grad(set_to_none=True)
    out = unwrap(wrapped).forward_lf(batch)
    out["loss"].backward()
    grads = {
        n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None
    }
    return out["loss"].detach(), grads


def test_cached_and_uncached_training_give_the_same_losses_and_gradients(
    model, tiny_base, tiny_dataset, tmp_path
):
    wrapped, tok = model
    args = _args(tiny_base, tiny_dataset, tmp_path / "cache")
    inner = unwrap(wrapped)
    store = prepare_feature_cache(args, inner, tok, CPU, train=True, val=True)
    assert len(list(store.folder.rglob("*.safetensors"))) == 9  # 6 train + 3 val scenes, once each
    plain, _ = build_train_loader(args, inner.config, tok, 0)
    cached, _ = build_train_loader(args, inner.config, tok, 0, store=store)
    wrapped.train()
    for batch_a, batch_b in zip(plain, cached, strict=True):
        assert "sam_center" in batch_a and "sam_center" not in batch_b and "sam_embeddings" in batch_b
        assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
        loss_a, grads_a = _loss_and_grads(wrapped, batch_a)
        loss_b, grads_b = _loss_and_grads(wrapped, batch_b)
        assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
        for name, g in grads_a.items():
            assert torch.allclose(g, grads_b[name], rtol=1e-5, atol=1e-7), name


def test_cached_and_uncached_validation_give_the_same_table(model, tiny_base, tiny_dataset, tmp_path):
    wrapped, tok = model
    inner = unwrap(wrapped).eval()
    args = _args(tiny_base, tiny_dataset, tmp_path / "cache")
    store = prepare_feature_cache(args, inner, tok, CPU, train=False, val=True)
    tables = [
        evaluate(
            inner, build_val_loader(args, inner.config, tok, 0, 1, store=s), CPU.device, show_progress=False
        )
        for s in (None, store)
    ]
    a, b = (t.compute() for t in tables)
    assert a.keys() == b.keys()
    for subset in a:
        for metric, value in a[subset].items():
            assert value == pytest.approx(b[subset][metric], abs=1e-9), (subset, metric)


def test_a_stale_or_corrupt_entry_is_recomputed(model, tiny_base, tiny_dataset, tmp_path):
    import shutil

    wrapped, tok = model
    inner = unwrap(wrapped)
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    args = _args(tiny_base, data, tmp_path / "cache")
    store = prepare_feature_cache(args, inner, tok, CPU, train=False, val=True)
    entries = sorted(store.folder.rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    again = prepare_feature_cache(args, inner, tok, CPU, train=False, val=True)  # nothing to do
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps and again.key == store.key
    # a changed view file: only that scene's entry is recomputed
    scene = data / "lf" / TINY_DS / f"Image{entries[0].stem}"
    view = scene / "5_4.png"
    os.utime(view, ns=(view.stat().st_atime_ns, view.stat().st_mtime_ns + 10**9))
    prepare_feature_cache(args, inner, tok, CPU, train=False, val=True)
    changed = [p for p in entries if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [entries[0]]
    # a truncated entry is reported and recomputed, never loaded
    entries[1].write_bytes(entries[1].read_bytes()[:200])
    rebuilt = prepare_feature_cache(args, inner, tok, CPU, train=False, val=True)
    assert any("unreadable entry" in r for r in rebuilt.reported)
    assert entries[1].stat().st_size > 200
    # another option or other weights: another key, so nothing of the old entries is read
    ranged, _ = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(depth_range=(-0.5, 2.0)))
    assert open_store(args, ranged, rebuilt.spec).key != store.key
    renamed = _args(tiny_base, data, tmp_path / "cache", "--disparity_name", "5_5_disparity_OAVC.npy")
    assert open_store(renamed, inner, rebuilt.spec).key != store.key
    with torch.no_grad():
        inner.model.multi_modal_projector.linear_1.bias.add_(1e-3)
    try:
        assert open_store(args, inner, rebuilt.spec).key != store.key
    finally:
        with torch.no_grad():
            inner.model.multi_modal_projector.linear_1.bias.sub_(1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ModelOptions(caam_mode="learned"), "--caam_mode learned trains CAAM's parameters"),
        (ModelOptions(caam_mode="occlusion"), "--caam_mode occlusion trains CAAM's parameters"),
        (ModelOptions(depth_projector="separate"), "--depth_projector separate trains the projector"),
    ],
)
def test_configurations_that_are_not_frozen_are_refused(tiny_base, tiny_dataset, tmp_path, options, message):
    m, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], options)
    with pytest.raises(FeatureCacheError, match=message):
        prepare_feature_cache(
            _args(tiny_base, tiny_dataset, tmp_path / "c"), m, tok, CPU, train=True, val=False
        )


def test_bf16_entries_change_the_loss_only_within_bf16_noise(model, tiny_base, tiny_dataset, tmp_path):
    wrapped, tok = model
    inner = unwrap(wrapped)
    losses = []
    for dtype in ("fp32", "bf16"):
        args = _args(tiny_base, tiny_dataset, tmp_path / dtype, "--feature_cache_dtype", dtype)
        store = prepare_feature_cache(args, inner, tok, CPU, train=True, val=False)
        batch = next(iter(build_train_loader(args, inner.config, tok, 0, store=store)[0]))
        with torch.no_grad():
            losses.append(float(inner.forward_lf(move_batch(batch, CPU.device))["loss"]))
        sizes = [p.stat().st_size for p in store.folder.rglob("*.safetensors")]
        losses.append(float(np.mean(sizes)))
    (fp32_loss, fp32_size, bf16_loss, bf16_size) = losses
    assert abs(bf16_loss - fp32_loss) / fp32_loss < 1e-2
    assert bf16_size < 0.6 * fp32_size


def test_the_benchmark_times_the_cached_step_and_its_masks_equal_the_uncached(model, tiny_base, tiny_dataset):
    import importlib

    from model.inference import teacher_forced_masks
    from training.features import cached_batch

    wrapped, tok = model
    inner = unwrap(wrapped).eval()
    args = _args(tiny_base, tiny_dataset, Path("unused"))
    batch = next(iter(build_val_loader(args, inner.config, tok, 0, 1)))
    plain = teacher_forced_masks(inner, batch)
    cached = teacher_forced_masks(inner, cached_batch(inner, batch))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, cached, strict=True))
    bench = importlib.import_module("training.experiments.bench_step")
    result = bench.main(
        ["--preset", "tiny", "--steps", "2", "--warmup", "0", "--eval", "--no_flops", "--feature_cache"]
    )
    descs = [row["desc"] for row in result["rows"]]
    assert descs == [descs[0], descs[0] + " (feature cache)", "train step", "train step (feature cache)"]
    cached_train = result["rows"][3]
    assert cached_train["images_per_s"] > 0 and cached_train["speedup_vs_uncached"] > 0
    assert len(cached_train["losses"]) == 2 and all(math.isfinite(v) for v in cached_train["losses"])


def test_in_bf16_cached_and_uncached_losses_agree_within_bf16_noise(tiny_base, tiny_dataset, tmp_path):
    torch.manual_seed(0)
    m, tok = build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions(), dtype=torch.bfloat16)
    args = _args(tiny_base, tiny_dataset, tmp_path / "c", "--precision", "bf16")
    store = prepare_feature_cache(args, m, tok, CPU, train=True, val=False)
    assert store.storage_dtype == torch.bfloat16
    batches = [next(iter(build_train_loader(args, m.config, tok, 0, store=s)[0])) for s in (None, store)]
    with torch.no_grad():
        plain, cached = (float(m.forward_lf(b)["loss"]) for b in batches)
    assert abs(plain - cached) / abs(plain) < 2e-2  # bf16 has 8 bits of mantissa

"""Shared fixtures: a tiny synthetic Ref-UrbanLF dataset and a tiny HF LLaVA + SAM base written to disk
once per session, loaded through the same code as the real weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY_DS = "ref-urbanlf-syn"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LFLLM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in slow test: set LFLLM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_torch_thread():
    """Run the test with one torch CPU thread (timing- and thread-count-independent results), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic light-field dataset (9x9 views, 64x96) with train and val scenes."""
    from dataset.synthetic import SyntheticConfig, write_dataset

    root = tmp_path_factory.mktemp("data")
    write_dataset(root, SyntheticConfig(height=64, width=96, num_train=6, num_val=3, seed=3))
    return root


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_dataset) -> dict[str, Path]:
    """Tiny LLaVA directory + tiny SAM checkpoint, tokenizer trained on the dataset's expressions."""
    from training.pretrain.tiny_base import write_tiny_base

    refs = json.loads((tiny_dataset / "refer_seg" / TINY_DS / f"{TINY_DS}.json").read_text())
    corpus = [s["sent"] for r in refs for s in r["sentences"]]
    return write_tiny_base(tmp_path_factory.mktemp("base"), corpus)


@pytest.fixture(scope="session")
def tiny_merged(tiny_base, tmp_path_factory) -> Path:
    """A merged fp32 tiny LFLLM directory (the tiny base with every trainable tensor perturbed, merged by
    ``merge_lora_weights_and_save_hf_model.py``), shared by the chat and demo tests."""
    import merge_lora_weights_and_save_hf_model as merge_script
    from tests.test_merge import make_trained_export

    export = make_trained_export(tiny_base, tmp_path_factory.mktemp("export"), seed=2)[2]
    out = tmp_path_factory.mktemp("merged")
    return merge_script.main(["--weight", str(export), "--save_path", str(out), "--precision", "fp32"])


@pytest.fixture()
def tiny_model(tiny_base):
    """A freshly loaded fp32 tiny LFLLM and its tokenizer (seeded)."""
    from model.build import build_lfllm
    from model.options import ModelOptions

    torch.manual_seed(0)
    return build_lfllm(tiny_base["llava"], tiny_base["sam"], ModelOptions())


def model_batch(
    model,
    tokenizer,
    dataset_dir: Path,
    split: str = "train",
    n: int = 2,
    train: bool = True,
    model_max_length: int = 512,
):
    """A collated batch of the first ``n`` scenes of ``split`` for ``model`` (the training data path)."""
    from dataset.collate import TokenSpec, collate_batch
    from dataset.refer_seg import ReferSegDataset, SampleSpec
    from dataset.scenes import SceneDataset
    from utils.views import parse_views

    cfg = model.config
    scenes = SceneDataset(
        dataset_dir,
        TINY_DS,
        split,
        views=parse_views("4"),
        mode="train" if train else "val",
        num_classes_per_sample=3,
    )
    tokens = TokenSpec.from_tokenizer(tokenizer, cfg.image_seq_length, model_max_length)
    ds = ReferSegDataset(scenes, tokenizer, SampleSpec.from_model_config(cfg), tokens, train=train)
    return collate_batch([ds[i] for i in range(n)], tokenizer.pad_token_id)

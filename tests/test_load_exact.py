"""What is loaded is exactly what was saved (issue 36, criterion 2): a merged model, a base LLaVA and a
trained export refuse missing, unexpected and mis-shaped weights and token ids that disagree with the
tokenizer, in one wording naming the file and the first key (and how many more); a truncated
``.safetensors`` and a ``pytorch_model.bin`` with a pickle payload get a sentence, never torch's advice to
set ``weights_only=False``. The untampered models load with identical outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import chat
from model.build import build_lfllm
from model.inference import teacher_forced_masks
from model.lfllm import LFLLMForCausalLM
from model.options import ModelOptions
from tests.conftest import TINY_DS, model_batch
from tests.test_merge import PREFIX, make_trained_export, merge
from tests.test_trust import _Payload
from training.checkpoint import TRAINABLE_FILE
from training.weights import open_weights, select_trainable
from utils.safe_load import WeightsMismatchError, verify_torch_file

LIGHT = ModelOptions(mask_head="light", light_detail_size=224)
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sam_merged(tiny_base, tmp_path_factory):
    """(the trained wrapped model, its export folder, its merged fp32 folder in 4 shards)."""
    wrapped, _, export = make_trained_export(tiny_base, tmp_path_factory.mktemp("export"))
    out = tmp_path_factory.mktemp("merged") / "sam"
    merge("--weight", export, "--save_path", out, "--precision", "fp32", "--max_shard_size", "500KB")
    return wrapped, export, out


@pytest.fixture(scope="module")
def light_merged(tiny_base, tmp_path_factory):
    """The same with the light mask head (one ``model.safetensors``)."""
    wrapped, _, export = make_trained_export(tiny_base, tmp_path_factory.mktemp("export"), options=LIGHT)
    out = tmp_path_factory.mktemp("merged") / "light"
    merge("--weight", export, "--save_path", out, "--precision", "fp32")
    return wrapped, export, out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _weight_map(folder: Path) -> dict[str, str]:
    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    return dict.fromkeys(load_file(folder / "model.safetensors"), "model.safetensors")


def _edit_weights(folder: Path, edit) -> None:
    """Apply ``edit`` to every shard's tensors (and keep the index in step with what the shards hold)."""
    weight_map = _weight_map(folder)
    for shard in sorted(set(weight_map.values())):
        state = load_file(folder / shard)
        edit(state)
        save_file(state, str(folder / shard), metadata={"format": "pt"})
        for key in [k for k, f in weight_map.items() if f == shard and k not in state]:
            del weight_map[key]
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = weight_map
        (folder / INDEX).write_text(json.dumps(index))


def _refusal(folder: Path) -> str:
    with pytest.raises(WeightsMismatchError) as err:
        build_lfllm(folder)
    message = str(err.value)
    assert "Traceback" not in message and "weights_only" not in message
    return message


@pytest.mark.parametrize("head", ["sam", "light"])
def test_untampered_merged_models_load_with_identical_outputs(head, request, tiny_dataset):
    """build_lfllm's checked load is bit-identical to transformers' own; its masks are the trained model's."""
    wrapped, _, out = request.getfixturevalue(f"{head}_merged")
    model, tokenizer = build_lfllm(out)
    direct = LFLLMForCausalLM.from_pretrained(out)
    own, theirs = model.state_dict(), direct.state_dict()
    assert own.keys() == theirs.keys()
    assert all(torch.equal(own[k], theirs[k]) for k in own)
    batch = model_batch(model, tokenizer, tiny_dataset, split="val", n=2, train=False)
    got = teacher_forced_masks(model, batch)
    for g, d, w in zip(
        got, teacher_forced_masks(direct, batch), teacher_forced_masks(wrapped, batch), strict=True
    ):
        assert torch.equal(g, d)
        # merging LoRA into the weights reorders float sums (~1e-5 of the logits' scale)
        error, scale = (g - w).abs().max(), w.abs().max()
        assert error <= 1e-4 * scale, (error, scale)


def test_config_with_a_layer_more_is_refused_naming_the_missing_weights(sam_merged, tmp_path):
    folder = _copy(sam_merged[2], tmp_path)
    _edit_config(folder, lambda c: c["text_config"].update(num_hidden_layers=3))
    message = _refusal(folder)
    per_layer = sum(1 for k in _weight_map(folder) if k.startswith("language_model.model.layers.1."))
    assert f"{folder / INDEX}: missing key 'model.language_model.layers.2.input_layernorm.weight' " in message
    assert f"(and {per_layer - 1} more)" in message
    assert "random values" in message and "merge again" in message


def test_config_with_a_layer_fewer_is_refused_naming_the_dropped_weights(sam_merged, tmp_path):
    folder = _copy(sam_merged[2], tmp_path)
    _edit_config(folder, lambda c: c["text_config"].update(num_hidden_layers=1))
    message = _refusal(folder)
    key = "language_model.model.layers.1.input_layernorm.weight"  # as the file spells it
    shard = folder / _weight_map(folder)[key]
    assert re.search(rf"{re.escape(str(shard))}: unexpected key '{re.escape(key)}' \(and \d+ more\)", message)


@pytest.mark.parametrize(
    ("head", "prefix"),
    [("sam", "sam.mask_decoder."), ("sam", "seg_projector."), ("light", "light_decoder.")],
)
def test_merged_model_missing_a_module_is_refused(head, prefix, request, tmp_path):
    folder = _copy(request.getfixturevalue(f"{head}_merged")[2], tmp_path)
    gone = sorted(k for k in _weight_map(folder) if k.startswith(prefix))
    assert gone

    def drop(state):
        for key in gone:
            state.pop(key, None)

    _edit_weights(folder, drop)
    entry = folder / (INDEX if head == "sam" else "model.safetensors")
    message = _refusal(folder)
    more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
    assert f"{entry}: missing key {gone[0]!r}{more}" in message


def test_mis_shaped_weight_is_refused_naming_its_shard(sam_merged, tmp_path):
    folder = _copy(sam_merged[2], tmp_path)
    key = "multi_modal_projector.linear_1.weight"
    shard = folder / _weight_map(folder)[key]
    state = load_file(shard)
    rows, cols = state[key].shape
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(shard), metadata={"format": "pt"})
    message = _refusal(folder)
    want = f"{shard}: key '{key}' has shape ({rows}, {cols - 1}), {folder / 'config.json'} asks for ({rows}, {cols})"
    assert want in message


@pytest.mark.parametrize(
    ("key", "token"),
    [("seg_token_id", "[SEG]"), ("image_token_index", "<image>"), ("depth_token_id", "<depth>")],
)
def test_token_id_that_disagrees_with_the_tokenizer_is_refused(sam_merged, tmp_path, key, token):
    folder = _copy(sam_merged[2], tmp_path)
    right = json.loads((folder / "config.json").read_text())[key]
    _edit_config(folder, lambda c: c.update({key: right + 1}))
    message = _refusal(folder)
    assert (
        f"{folder / 'config.json'}: key '{key}' is {right + 1}, but the tokenizer in {folder} has {token} at {right}"
        in message
    )


def test_tokenizer_beyond_the_embedding_is_refused(sam_merged, tmp_path):
    folder = _copy(sam_merged[2], tmp_path)
    _edit_config(folder, lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] - 1))
    assert "key 'text_config.vocab_size' is" in _refusal(folder)


def test_wrong_token_id_through_chat_is_one_error_line(sam_merged, tmp_path, tiny_dataset, capsys):
    folder = _copy(sam_merged[2], tmp_path)
    _edit_config(folder, lambda c: c.update(seg_token_id=c["seg_token_id"] + 1))
    scene = tiny_dataset / "lf" / TINY_DS / "Image7"
    argv = ["--version", folder, "--lf_dir", scene, "--prompt", "the pole", "--out", tmp_path / "o"]
    assert chat.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "key 'seg_token_id'" in err and "Traceback" not in err


def test_base_llava_with_a_layer_more_is_refused(tiny_base, tmp_path):
    folder = _copy(tiny_base["llava"], tmp_path)
    _edit_config(folder, lambda c: c["text_config"].update(num_hidden_layers=3))
    with pytest.raises(
        WeightsMismatchError, match=r"model\.safetensors: missing key 'model\.language_model\.layers\.2\."
    ) as err:
        build_lfllm(folder, tiny_base["sam"])
    assert "sam." not in str(err.value)  # LFLLM's own new modules are not reported


def test_truncated_safetensors_is_a_sentence_naming_it(sam_merged, tiny_base, tmp_path):
    _, export, merged = sam_merged
    folder = _copy(merged, tmp_path)
    shard = folder / sorted(set(_weight_map(folder).values()))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(shard))}: not a complete safetensors file .*truncated"
    ):
        build_lfllm(folder)
    base = _copy(tiny_base["llava"], tmp_path / "base")
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a complete safetensors file"):
        build_lfllm(base, tiny_base["sam"])
    # a trained export: merge --weight, the converter
    weight = _copy(export, tmp_path / "w")
    file = weight / TRAINABLE_FILE
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: not a complete safetensors file"):
        open_weights(weight)
    with pytest.raises(ValueError, match="truncated"):
        merge("--weight", weight, "--save_path", tmp_path / "out", "--precision", "fp32")
    assert not (tmp_path / "out").exists()


def test_pickle_payload_bin_is_refused_in_our_words(sam_merged, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError) as err:
        open_weights(evil)  # merge --weight x.bin, the converter's --src
    message = str(err.value)
    assert message.startswith(
        f"{evil}: cannot read as a PyTorch state dict: refused to load: it asks for posix.system"
    )
    assert "weights_only" not in message
    # a merged folder whose weights are a .bin with a payload (what from_pretrained would read)
    folder = _copy(sam_merged[2], tmp_path / "m")
    state = {}
    for shard in sorted(set(_weight_map(folder).values())):
        state.update(load_file(folder / shard))
        (folder / shard).unlink()
    (folder / INDEX).unlink()
    torch.save({**state, "x": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        build_lfllm(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'pytorch_model.bin'}: refused to load: it asks for posix.system")
    assert "weights_only" not in message
    # not a PyTorch file at all, and a truncated one: torch's reason without its advice
    text = tmp_path / "notes.bin"
    text.write_text("not a checkpoint")
    with pytest.raises(
        ValueError, match=r"notes\.bin: cannot read as a PyTorch state dict: not a PyTorch"
    ) as err:
        open_weights(text)
    assert "weights_only" not in str(err.value)
    cut = tmp_path / "cut.bin"
    torch.save({"w": torch.zeros(64)}, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.bin: .*truncated or damaged"):
        open_weights(cut)
    with pytest.raises(ValueError, match=r"truncated or damaged") as err:
        verify_torch_file(cut)
    assert not marker.exists()


def test_export_problems_are_one_message_of_every_kind(sam_merged, tmp_path):
    wrapped, export, _ = sam_merged
    state = load_file(export / TRAINABLE_FILE)
    dropped = sorted(k for k in state if k.startswith(PREFIX + "seg_projector."))[:2]
    for key in dropped:
        del state[key]
    state[PREFIX + "sam.bogus.weight"] = torch.zeros(2)
    shaped = PREFIX + "sam.mask_decoder.iou_token.weight"
    state[shaped] = state[shaped][:, :-1].contiguous()
    weight = tmp_path / "variant"
    weight.mkdir()
    save_file(state, str(weight / TRAINABLE_FILE))
    file = weight / TRAINABLE_FILE
    with pytest.raises(WeightsMismatchError) as err:
        list(select_trainable(open_weights(weight), wrapped))
    message = str(err.value)
    assert f"{file}: missing trainable key {dropped[0]!r} (and 1 more)" in message
    assert f"{file}: unexpected key '{PREFIX}sam.bogus.weight'" in message
    assert re.search(
        rf"{re.escape(str(file))}: key '{re.escape(shaped)}' has shape \(1, \d+\), the rebuilt", message
    )
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)

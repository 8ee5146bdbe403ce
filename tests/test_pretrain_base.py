"""The pretrained tiny base: its data (disjoint from the benchmark, true boxes and captions), resumable
stages that learn, the script's formats, and the shipped base in pretrained/tiny_base."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from dataset.synthetic import CATEGORIES, PALETTE, SyntheticConfig, render_scene
from dataset.synthetic.pretrain import (
    NUM_PATCH_CLASSES,
    PRETRAIN_SEED,
    REC_QUESTIONS,
    caption,
    grounding_pair,
    label_map,
    pretrain_config,
    pretrain_corpus,
    pretrain_scene,
)
from model.presets import get_preset
from model.sam import build_sam, load_sam, sam_config
from training.pretrain.base import main as pretrain_main
from training.pretrain.llava import (
    LlavaStageOptions,
    ScenePool,
    clip_tokens,
    encode_batch,
    patch_loss,
    patch_positions,
    run_llava_stage,
    token_spec,
)
from training.pretrain.sam import SamStageOptions, run_sam_stage
from training.pretrain.tiny_base import new_llava, train_tiny_tokenizer
from utils.boxes import box_text, interior_point, parse_box

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "tiny_base"
SMALL = pretrain_config(height=48, width=64)


def test_box_text_is_llava_rec_format_and_round_trips():
    assert box_text((16, 12, 48, 36), 48, 64) == "[0.25, 0.25, 0.75, 0.75]"
    assert box_text((-3, 0, 70, 48), 48, 64) == "[0.00, 0.00, 1.00, 1.00]"  # clipped to the image
    assert parse_box("it is [0.25, 0.10, 0.75, 0.90]</s>") == (0.25, 0.10, 0.75, 0.90)
    # a coarse grid: grown outwards to the 0.1 grid, still covering the box
    assert box_text((16, 12, 48, 36), 48, 64, step=0.1) == "[0.20, 0.20, 0.80, 0.80]"
    assert box_text((10, 5, 20, 30), 48, 64, step=0.1) == "[0.10, 0.10, 0.40, 0.70]"
    assert box_text((12.8, 24, 51.2, 48), 48, 64, step=0.1) == "[0.20, 0.50, 0.80, 1.00]"  # on the grid
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0 = rng.uniform(0, 60), rng.uniform(0, 44)
        box = (x0, y0, x0 + rng.uniform(1, 64 - x0), y0 + rng.uniform(1, 48 - y0))
        fine, coarse = parse_box(box_text(box, 48, 64)), parse_box(box_text(box, 48, 64, step=0.1))
        assert all(abs(v * 10 - round(v * 10)) < 1e-9 for v in coarse)
        assert coarse[0] <= fine[0] + 0.005 and coarse[1] <= fine[1] + 0.005  # grown, never shrunk
        assert coarse[2] >= fine[2] - 0.005 and coarse[3] >= fine[3] - 0.005
        assert coarse[2] - coarse[0] <= fine[2] - fine[0] + 0.2 + 0.01  # by less than one cell a side
    assert (
        parse_box("[0.1, 0.2, 0.3]") is None
        and parse_box("no box") is None
        and parse_box("[a, b, c, d]") is None
    )


def test_pretraining_scenes_are_not_benchmark_scenes():
    """The benchmark's default seed (0) and the quickstart's scene ids never produce a pretraining image."""
    assert SyntheticConfig().seed != PRETRAIN_SEED
    bench = SyntheticConfig(height=48, width=64, angular=3, num_train=0, num_val=0, seed=0)
    c = bench.centre
    bench_images = {render_scene(i, bench, views=[(c, c)]).views[(c, c)].tobytes() for i in range(1, 41)}
    pre_images = {pretrain_scene(i, SMALL).image.tobytes() for i in range(1, 41)}
    assert len(pre_images) == 40 and not bench_images & pre_images


def test_scene_boxes_captions_and_rec_answers_are_true():
    scene = pretrain_scene(7, SMALL)
    assert scene.image.shape == (48, 64, 3) and scene.masks.shape[1:] == (48, 64)
    for mask, box in zip(scene.masks, scene.boxes):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the caption names every visible object, left to right
    order = np.argsort(scene.centroids_x, kind="stable")
    assert caption(scene).startswith(f"a {scene.names[order[0]]}")
    assert all(f"a {n}" in caption(scene) for n in scene.names)
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(40):
        q, a = grounding_pair(scene, rng)
        m = re.fullmatch(r"Please give the bounding box of (.+)\.", q)
        if m:  # a REC question: the answer is the box of the object the expression names
            k = next(k for k, s in scene.expressions if s == m.group(1))
            assert a == box_text(scene.boxes[k], 48, 64)
            found += 1
    assert found > 0
    corpus = pretrain_corpus([scene])
    assert caption(scene) in corpus and REC_QUESTIONS[0].format(expr=scene.expressions[0][1]) in corpus


def test_label_map_and_patch_targets_name_the_visible_object():
    scene = pretrain_scene(7, SMALL)
    labels = label_map(scene)
    for mask, name in zip(scene.masks, scene.names):
        colour, category = name.split(" ", 1)
        assert (
            labels[mask] == 1 + CATEGORIES.index(category) * len(PALETTE) + list(PALETTE).index(colour)
        ).all()
    assert (labels[~scene.masks.any(0)] == 0).all() and labels.max() < NUM_PATCH_CLASSES
    pool = ScenePool.render(range(7, 8), SMALL, 56, 14, progress=False)
    assert pool.targets.shape == (1, 16, NUM_PATCH_CLASSES)
    assert torch.allclose(pool.targets.float().sum(-1), torch.ones(1, 16), atol=1e-2)  # histograms


def test_vision_stage_learns_patch_content(tmp_path, one_torch_thread):
    pool, tok, model = _tiny_llava(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = LlavaStageOptions(steps=40, batch_size=8, lr=3e-3, warmup=5)
    rec = run_llava_stage("vision", model, tok, pool, SMALL, opts, tmp_path / "v", seed=1, progress=False)
    assert rec["last_loss"] < 0.8 * rec["first_loss"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("vision_tower" in k for k in changed)  # only CLIP trains in this stage


def test_patch_positions_are_the_row_major_patch_centres():
    pos = patch_positions(4)
    assert pos.shape == (16, 2)
    assert torch.allclose(pos[0], torch.tensor([-0.75, -0.75])) and torch.allclose(
        pos[1], torch.tensor([-0.25, -0.75])
    )
    assert torch.allclose(pos[4], torch.tensor([-0.75, -0.25])) and torch.allclose(
        pos[15], torch.tensor([0.75, 0.75])
    )


def test_vision_stage_teaches_the_tokens_where_they_are(tmp_path, one_torch_thread):
    """The position term: after the stage a linear read-out of each token gives its patch centre (a
    content-only loss leaves x undecodable, so an LM with rotary positions could not ground)."""
    pool, tok, model = _tiny_llava(tmp_path)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x = pool.pixels[:8].float()

    def position_error() -> float:  # least-squares read-out of (x, y) from the tokens LLaVA reads
        with torch.no_grad():
            feats = clip_tokens(model, x).flatten(0, 1)
        a = torch.cat([feats, torch.ones(len(feats), 1)], 1)
        target = patch_positions(grid).repeat(len(x), 1)
        coef = torch.linalg.lstsq(a, target).solution
        return float((a @ coef - target).pow(2).mean())

    head = torch.nn.Linear(model.config.vision_config.hidden_size, 9)
    with torch.no_grad():  # the loss is content CE + weight x position MSE, checked by hand
        out = head(clip_tokens(model, x))
    targets = torch.full((8, grid * grid, 7), 1 / 7)
    by_hand = (
        -(targets * out[..., :7].log_softmax(-1)).sum(-1).mean()
        + 2.0 * (out[..., 7:] - patch_positions(grid)).pow(2).mean()
    )
    with torch.no_grad():
        assert torch.allclose(patch_loss(model, head, x, targets, position_weight=2.0), by_hand, atol=1e-5)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    errors, held_out = {}, {}
    for weight in (0.0, 1.0):  # content only, then content + position, from the same start
        model.load_state_dict(state)
        opts = LlavaStageOptions(
            steps=150, batch_size=8, lr=3e-3, warmup=5, position_weight=weight, held_out=16
        )
        rec = run_llava_stage(
            "vision", model, tok, pool, SMALL, opts, tmp_path / f"v{weight}", seed=1, progress=False
        )
        errors[weight] = position_error()
        (held_out[weight],) = rec["held_out"]  # the record's held-out read-out of the same thing
        assert held_out[weight]["step"] == 150
    assert errors[1.0] < 0.5 * errors[0.0]
    assert held_out[1.0]["position_r2_x"] > held_out[0.0]["position_r2_x"] + 0.2
    assert held_out[1.0]["position_r2_x"] <= 1.0


def test_interior_point_is_inside_and_deepest():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 2:8] = True  # 10 x 6 block: its deepest pixels are in the middle
    mask[0:2, 20:30] = True
    x, y = interior_point(mask)
    assert mask[int(y), int(x)] and 4 <= x <= 6 and 7 <= y <= 13  # 3 px from every edge


def _tiny_llava(tmp_path):
    pool = ScenePool.render(range(1, 25), SMALL, 56, 14, progress=False)
    tok = train_tiny_tokenizer(pretrain_corpus(pool.scenes), 400)
    return pool, tok, new_llava(get_preset("tiny"), tok, seed=0)


def test_encode_batch_labels_only_the_answer(tmp_path):
    _, tok, model = _tiny_llava(tmp_path)
    spec = token_spec(tok, model.config.image_seq_length)
    enc = encode_batch(tok, spec, [("Describe the image briefly.", "a red pole."), ("List them.", "x")])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (enc["input_ids"] == image_id).sum(1).tolist() == [16, 16]  # 4x4 CLIP grid expanded
    first = enc["labels"][0][enc["labels"][0] != -100]
    assert tok.decode(first, skip_special_tokens=True).strip() == "a red pole."
    assert enc["attention_mask"][1].sum() < enc["attention_mask"][0].sum()  # padded row
    # expression first: the same answer labels, the image placeholders after the question's words
    late = encode_batch(tok, spec, [("Describe the image briefly.", "a red pole.")], image_first=False)
    assert torch.equal(late["labels"][late["labels"] != -100], first)
    row = late["input_ids"][0].tolist()
    question = tok("Describe the image briefly.", add_special_tokens=False).input_ids
    image_at = row.index(image_id)
    words = [row[i : i + len(question)] for i in range(image_at - len(question) + 1)]
    assert row.count(image_id) == 16 and question in words  # every word of the question comes first


def test_frozen_clip_stays_put_in_the_llava_stages(tmp_path, one_torch_thread):
    pool, tok, model = _tiny_llava(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = LlavaStageOptions(steps=6, batch_size=4, warmup=1, train_vision=False, image_first=False)
    run_llava_stage("caption", model, tok, pool, SMALL, opts, tmp_path / "c", seed=1, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any("vision_tower" in k for k in changed)  # the LM and projector train
    assert any("multi_modal_projector" in k for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # restored after the stage


def test_llava_stage_learns_and_resumes_exactly(tmp_path, one_torch_thread):
    pool, tok, model = _tiny_llava(tmp_path)
    opts = LlavaStageOptions(steps=40, batch_size=4, lr=3e-3, warmup=5, ckpt_every=5)
    rec = run_llava_stage("caption", model, tok, pool, SMALL, opts, tmp_path / "a", seed=1, progress=False)
    assert rec["steps_run"] == 40 and rec["last_loss"] < 0.7 * rec["first_loss"]
    # killed after step 10, rerun: the same weights as the uninterrupted run (vision: its head is restored too)
    short = LlavaStageOptions(steps=12, batch_size=4, lr=3e-3, warmup=5, ckpt_every=5)
    for stage in ("vision", "caption"):
        _, _, other = _tiny_llava(tmp_path)
        killed, fresh = tmp_path / f"{stage}_b", tmp_path / f"{stage}_c"
        run_llava_stage(stage, other, tok, pool, SMALL, short, killed, seed=1, progress=False, stop_at=10)
        _, _, resumed = _tiny_llava(tmp_path)
        run_llava_stage(stage, resumed, tok, pool, SMALL, short, killed, seed=1, progress=False)
        _, _, straight = _tiny_llava(tmp_path)
        run_llava_stage(stage, straight, tok, pool, SMALL, short, fresh, seed=1, progress=False)
        for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
            assert torch.equal(a, b), (stage, name)
    with pytest.raises(ValueError, match="unknown LLaVA stage"):
        run_llava_stage("sft", model, tok, pool, SMALL, opts, tmp_path / "d", seed=1)


def _tiny_sam():
    torch.manual_seed(0)
    return build_sam(sam_config("tiny"))


def test_sam_stage_learns_resumes_and_keeps_the_best(tmp_path, one_torch_thread):
    opts = SamStageOptions(
        steps=8, images_per_step=2, max_objects=3, lr=3e-3, warmup=2, eval_every=4, held_out=3, ckpt_every=2
    )
    sam = _tiny_sam()
    rec = run_sam_stage(sam, SMALL, opts, tmp_path / "a", seed=1, progress=False)
    assert rec["steps_run"] == 8 and [h["step"] for h in rec["held_out"]] == [4, 8]
    assert rec["best_point_iou"] == max(h["point_iou"] for h in rec["held_out"])
    assert 0.0 <= rec["best_box_iou"] <= 1.0 and rec["last_loss"] < rec["first_loss"]
    killed = _tiny_sam()
    run_sam_stage(killed, SMALL, opts, tmp_path / "b", seed=1, progress=False, stop_at=6)
    resumed = _tiny_sam()
    rec2 = run_sam_stage(resumed, SMALL, opts, tmp_path / "b", seed=1, progress=False)
    assert rec2["held_out"] == rec["held_out"]
    for (name, a), b in zip(resumed.state_dict().items(), sam.state_dict().values()):
        assert torch.equal(a, b), name


def test_script_writes_the_real_formats_and_a_record(tmp_path, capsys):
    out = tmp_path / "base"
    argv = ["--out", str(out), "--no_parallel", "--pool", "32", "--held_out", "2"]
    for stage in ("sam", "vision", "caption", "instruct"):
        argv += [f"--{stage}_steps", "2"]
    argv += ["--sam_eval_every", "2", "--instruct_eval_every", "2", "--vision_position_weight", "0.5"]
    argv += ["--freeze_clip", "--expression_first", "--box_step", "0.1"]
    record = pretrain_main(argv)
    options = {stage: record["llava"][stage]["options"] for stage in ("vision", "caption", "instruct")}
    assert options["vision"]["position_weight"] == 0.5  # the flags act and are recorded
    assert not options["caption"]["train_vision"] and not options["instruct"]["image_first"]
    assert options["instruct"]["box_step"] == 0.1
    llava = LlavaForConditionalGeneration.from_pretrained(out / "llava")
    assert llava.config.vision_config.image_size == 112 and llava.config.image_seq_length == 64
    assert (
        AutoTokenizer.from_pretrained(out / "llava").convert_tokens_to_ids("<image>")
        == llava.config.image_token_id
    )
    sam, cfg = load_sam(out / "sam_tiny.pth")
    assert cfg["variant"] == "tiny160" and sam.image_encoder.img_size == 160
    saved = json.loads((out / "pretrain_record.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["command"].endswith(" ".join(argv)) and saved["seed"] == PRETRAIN_SEED
    for key in ("commit", "threads", "wall_s_this_run"):
        assert key in saved
    assert saved["sam"]["steps_run"] == 2 and saved["llava"]["instruct"]["steps_run"] == 2
    for bad in (
        ["--pool", "31"],
        ["--vision_position_weight", "-1"],
        ["--box_step", "0.3"],
        ["--box_step", "0"],
    ):
        with pytest.raises(SystemExit):
            pretrain_main(["--out", str(out), *bad])

    # --llava_from: only the SAM is pretrained; llava/ and its record are the source base's
    again = tmp_path / "again"
    argv2 = ["--out", str(again), "--llava_from", str(out), "--sam_steps", "3", "--sam_eval_every", "3"]
    record2 = pretrain_main([*argv2, "--held_out", "2"])
    for f in (out / "llava").iterdir():
        assert (again / "llava" / f.name).read_bytes() == f.read_bytes(), f.name
    assert record2["sam"]["steps_run"] == 3 and (again / "sam_tiny.pth").is_file()
    from_ = record2["llava"].pop("from")
    assert record2["llava"] == saved["llava"]
    assert from_["command"] == saved["command"] and from_["path"] == str(out)
    for bad, says in (
        (["--llava_from", str(out), "--instruct_steps", "5"], "--instruct_steps"),
        (["--llava_from", str(out), "--expression_first"], "--expression_first"),
        (["--llava_from", str(tmp_path / "nowhere")], "not a pretrained base"),
    ):
        with pytest.raises(SystemExit):
            pretrain_main(["--out", str(tmp_path / "x"), *bad])
        assert says in capsys.readouterr().err


def test_shipped_bases_fit_the_size_budget_together():
    files = [p for p in (ROOT / "pretrained").rglob("*") if p.is_file() and ".work" not in p.parts]
    assert {p.parent.name for p in files if p.name == "pretrain_record.json"} >= {
        SHIPPED.name,
        "tiny_base_v3",
    }
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


@pytest.mark.parametrize("name", [SHIPPED.name, "tiny_base_v2", "tiny_base_v3"])
def test_shipped_base_is_small_loadable_and_recorded(name):
    shipped = ROOT / "pretrained" / name
    record = json.loads((shipped / "pretrain_record.json").read_text())
    assert (
        record["command"].startswith("python scripts/pretrain_tiny_base.py") and record["commit"] != "unknown"
    )
    sam_rec, llava_rec = record["sam"], record["llava"]
    assert (
        sam_rec["final_held_out"]["point_iou"] == sam_rec["best_point_iou"] > 0.3
    )  # the best weights shipped
    assert (
        sam_rec["last_loss"] < sam_rec["first_loss"]
        and llava_rec["instruct"]["last_loss"] < llava_rec["instruct"]["first_loss"]
    )
    assert llava_rec["final_held_out"]["parsed"] > 0.9  # the LM answers a REC question with a box
    scored = [{k: v for k, v in h.items() if k != "step"} for h in llava_rec["instruct"]["held_out"]]
    assert llava_rec["final_held_out"] in scored  # the shipped LM is one of the evaluated checkpoints
    _, cfg = load_sam(shipped / "sam_tiny.pth")
    assert cfg["variant"] == get_preset("tiny-base").sam_variant
    llava = LlavaForConditionalGeneration.from_pretrained(shipped / "llava")
    assert llava.config.text_config.hidden_size == get_preset("tiny-base").text["hidden_size"]
    if "from" in llava_rec:  # --llava_from: the LM is the source base's, byte for byte
        source = ROOT / llava_rec["from"]["path"] / "llava" / "model.safetensors"
        assert (shipped / "llava" / "model.safetensors").read_bytes() == source.read_bytes()

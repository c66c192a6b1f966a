"""Fine-tuning heads, losses and metrics; converters from the official formats; the task loader."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_vl_batch

from vlbert_ds.model import VLBertConfig, VLBertForPretraining
from vlbert_ds.model.task_heads import TaskBatch, VLBertForMultipleChoice, VLBertForReferring, VLBertForVQA
from vlbert_ds.prep.task_converters import build_answer_vocabulary, normalize_answer, vqa_soft_scores


def _config(**extra) -> VLBertConfig:
    return VLBertConfig.preset("tiny", num_region_classes=25, **extra)


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written out, elementwise."""
    p = 1 / (1 + torch.exp(-logits.double()))
    return -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))


def test_vqa_loss_is_bce_summed_over_answers_and_the_score_is_the_top_answers_target():
    torch.manual_seed(0)
    model = VLBertForVQA(_config(num_answers=7)).eval()
    batch = make_vl_batch(model.config, rows_vl=3, rows_text=0)
    targets = torch.zeros(3, 7)
    targets[0, 2], targets[1, 5], targets[1, 1], targets[2, 0] = 1.0, 0.3, 0.9, 0.6
    task = TaskBatch(batch, answer_positions=torch.tensor([1, 2, 3]), answer_targets=targets)
    out = model(task)
    logits = model(TaskBatch(batch, answer_positions=task.answer_positions)).logits
    expected = _bce(logits, targets).sum() / 3  # the official BCE x num_answers: a sum over answers
    assert math.isclose(float(out.loss.detach()), float(expected), rel_tol=1e-5)
    top = logits.argmax(1)
    assert math.isclose(float(out.metrics["vqa_score"]), float(targets[torch.arange(3), top].sum()), abs_tol=1e-6)


def test_vcr_scores_each_choice_from_the_pooled_cls_with_bce():
    torch.manual_seed(0)
    model = VLBertForMultipleChoice(_config(with_pooler=True)).eval()
    batch = make_vl_batch(model.config, rows_vl=8, rows_text=0, regions=9)  # 2 items x 4 choices
    labels = torch.tensor([3, 1])
    out = model(TaskBatch(batch, num_choices=4, choice_labels=labels))
    assert out.logits.shape == (2, 4)
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    assert math.isclose(float(out.loss.detach()), float(_bce(out.logits, one_hot).mean()), rel_tol=1e-5)
    assert float(out.metrics["correct"]) == float((out.logits.argmax(1) == labels).sum())
    with pytest.raises(ValueError, match="with_pooler"):
        VLBertForMultipleChoice(_config())


def test_vcr_auxiliary_roi_classification_adds_cross_entropy_over_known_boxes(tmp_path):
    torch.manual_seed(0)
    model = VLBertForMultipleChoice(_config(with_pooler=True, num_object_classes=5)).eval()
    batch = make_vl_batch(model.config, rows_vl=8, rows_text=0, regions=9)
    labels = torch.tensor([0, 2])
    objects = torch.tensor([[0, 3, -1, 1, 4, 2, 2, 0, 1]]).repeat(8, 1)  # -1: a category outside the list
    objects[~batch.region_mask] = -1
    out = model(TaskBatch(batch, num_choices=4, choice_labels=labels, object_labels=objects))
    without = model(TaskBatch(batch, num_choices=4, choice_labels=labels))
    hidden = model.vlbert(batch).region_output
    logits = model.object_classifier(model.object_transform(hidden)).double()
    known = batch.region_mask & (objects >= 0)
    log_p = torch.log_softmax(logits, -1).gather(-1, objects.clamp(min=0)[..., None]).squeeze(-1)
    expected = float(without.loss.detach()) - float(log_p[known].mean())
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-5)

    pretrained = VLBertForPretraining(_config())
    with torch.no_grad():
        pretrained.vlbert.embeddings.token_type_embeddings.weight[1].fill_(7.0)
    pretrained.save_pretrained(tmp_path)
    vcr = VLBertForMultipleChoice.from_pretraining(tmp_path, with_pooler=True, num_object_classes=5)
    table = vcr.vlbert.embeddings.token_type_embeddings.weight
    assert torch.equal(table[1], table[0]) and not torch.equal(table[0], table[2])  # B starts as A (official)
    assert torch.equal(vcr.object_transform.dense.weight, pretrained.mrc_head.transform.dense.weight)


def test_refcoco_never_picks_the_whole_image_and_counts_iou_hits():
    torch.manual_seed(0)
    model = VLBertForReferring(_config()).eval()
    batch = make_vl_batch(model.config, rows_vl=2, rows_text=0, regions=5)
    labels = torch.zeros(2, 5)
    labels[0, 2], labels[1, 1] = 1.0, 1.0
    targets = torch.stack([batch.boxes[0, 2], batch.boxes[1, 1]])
    out = model(TaskBatch(batch, region_labels=labels, target_boxes=targets))
    assert torch.isinf(out.logits[:, 0]).all()  # RoI 0 is not a candidate
    assert torch.isinf(out.logits[1, 4])  # row 1 has 4 valid RoIs (ragged)
    candidates = batch.region_mask.clone()
    candidates[:, 0] = False
    expected = _bce(out.logits[candidates], labels[candidates].double()).mean()
    assert math.isclose(float(out.loss.detach()), float(expected), rel_tol=1e-5)
    picked = out.logits.argmax(1)
    hits = sum(bool(torch.equal(batch.boxes[r, picked[r]], targets[r])) for r in range(2))
    assert float(out.metrics["correct"]) == hits


def test_from_pretraining_maps_the_head_transforms(tmp_path):
    torch.manual_seed(0)
    pretrained = VLBertForPretraining(_config())
    pretrained.save_pretrained(tmp_path)
    vqa = VLBertForVQA.from_pretraining(tmp_path, num_answers=4)
    assert torch.equal(vqa.transform.dense.weight, pretrained.mlm_head.transform.dense.weight)
    assert torch.equal(vqa.transform.LayerNorm.weight, pretrained.mlm_head.transform.LayerNorm.weight)
    assert torch.equal(vqa.vlbert.encoder.layer[0].attention.self.query.weight,
                       pretrained.vlbert.encoder.layer[0].attention.self.query.weight)
    assert "classifier.weight" in vqa.load_report.fresh and "transform.dense.weight" in vqa.load_report.loaded
    ref = VLBertForReferring.from_pretraining(tmp_path)
    assert torch.equal(ref.transform.dense.weight, pretrained.mrc_head.transform.dense.weight)
    assert any(name.startswith("mrc_head.classifier") for name in ref.load_report.unused)


def test_vqa_soft_scores_average_the_ten_leave_one_out_subsets():
    scores = vqa_soft_scores(["yes"] * 3 + ["no"] * 6 + ["maybe"])
    # "yes": leaving out one of the 3 yes -> 2/3 (3 subsets), else 3 matches -> 1 (7 subsets)
    assert math.isclose(scores["yes"], (3 * 2 / 3 + 7 * 1.0) / 10)
    assert math.isclose(scores["no"], 1.0)
    assert math.isclose(scores["maybe"], (9 * (1 / 3) + 0.0) / 10)
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the Red!") == "red"
    annotations = [{"multiple_choice_answer": a} for a in ["yes"] * 5 + ["no"] * 3 + ["two"] * 2 + ["3"]]
    assert build_answer_vocabulary(annotations, min_count=2) == ["yes", "no", "2"]


# ----------------------------------------------------------------------------- converters
def _b64(array) -> str:
    return base64.b64encode(np.asarray(array, dtype=np.float32).tobytes()).decode()


def _frcnn(folder, image_id: str, boxes, width=200, height=100, dim=8) -> None:
    boxes = np.asarray(boxes, dtype=np.float32)
    features = np.random.default_rng(len(boxes)).random((len(boxes), dim))
    folder.mkdir(exist_ok=True)
    (folder / f"{image_id}.json").write_text(json.dumps({
        "image_id": image_id, "image_w": width, "image_h": height, "num_boxes": len(boxes), "boxes": _b64(boxes),
        "features": _b64(features)}))


def _read(folder, task, answers=(), mode="q2a"):
    from vlbert_ds.bundled import default_bert
    from vlbert_ds.data.task_batches import TaskDataConfig, TaskStream

    config = TaskDataConfig(task=task, tokenizer=default_bert(), answers=list(answers), batch_size=100,
                            num_workers=0, vcr_mode=mode, train=True)
    stream = TaskStream(str(folder), config, loop=False)
    items = list(stream)
    return items


def test_vqa_converter_builds_the_vocabulary_and_soft_scores(tmp_path):
    from vlbert_ds.prep.cli import main

    questions = {"questions": [{"image_id": 1, "question": "What color is the cat?", "question_id": 10},
                               {"image_id": 1, "question": "How many cats?", "question_id": 11},
                               {"image_id": 2, "question": "Is it raining?", "question_id": 12}]}
    annotations = {"annotations": [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "black",
         "answers": [{"answer": "black"}] * 8 + [{"answer": "gray"}] * 2},
        {"question_id": 11, "image_id": 1, "multiple_choice_answer": "2", "answers": [{"answer": "two"}] * 10},
        {"question_id": 12, "image_id": 2, "multiple_choice_answer": "umbrella",
         "answers": [{"answer": "umbrella"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    _frcnn(tmp_path / "regions", "1", [[0, 0, 50, 50], [60, 10, 120, 80]])
    _frcnn(tmp_path / "regions", "2", [[5, 5, 40, 40]])
    out = tmp_path / "vqa"
    assert main(["vqa", "--out", str(out), "--questions", str(tmp_path / "q.json"), "--annotations",
                 str(tmp_path / "a.json"), "--regions", str(tmp_path / "regions"), "--build-vocabulary",
                 "--min-answer-count", "1", "--processes", "1"]) == 0
    vocabulary = json.loads((out / "answers.json").read_text())
    assert set(vocabulary) == {"black", "2", "umbrella"}
    # Training with a vocabulary that lacks "umbrella": that question is counted and dropped.
    items = _read(out, "vqa", answers=["black", "2", "gray"])
    assert sum(i.task.batch_size for i in items) == 2
    assert sum(i.skipped.get("answer_out_of_vocab", 0) for i in items) == 1
    task = items[0].task
    row = task.keys.index(next(k for k in task.keys))
    assert task.answer_targets.shape == (2, 3)
    black = next(r for r in range(2) if task.answer_targets[r, 0] > 0)
    assert math.isclose(float(task.answer_targets[black, 0]), 1.0)  # 8 of 10 said black
    assert math.isclose(float(task.answer_targets[black, 2]), (2 * 1 / 3 + 8 * 2 / 3) / 10, rel_tol=1e-6)  # gray
    mask_id = 103
    assert int(task.batch.input_ids[row, task.answer_positions[row]]) == mask_id

    # The converter in two parts (one shard of a question each), then finalized: the one-part folder.
    parted = tmp_path / "vqa_parts"
    for part in ("1/2", "0/2"):
        assert main(["vqa", "--out", str(parted), "--questions", str(tmp_path / "q.json"), "--annotations",
                     str(tmp_path / "a.json"), "--regions", str(tmp_path / "regions"), "--samples-per-shard", "2",
                     "--processes", "1", "--part", part]) == 0
    assert main(["finalize", str(parted)]) == 0
    whole = tmp_path / "vqa_whole"
    assert main(["vqa", "--out", str(whole), "--questions", str(tmp_path / "q.json"), "--annotations",
                 str(tmp_path / "a.json"), "--regions", str(tmp_path / "regions"), "--samples-per-shard", "2",
                 "--processes", "1"]) == 0
    for name in ("shard-000000.tar", "shard-000001.tar", "sizes.json"):
        assert (parted / name).read_bytes() == (whole / name).read_bytes(), name


def _vcr_item(annot_id, answers=4):
    return {"annot_id": annot_id, "img_fn": "movie/img.jpg", "metadata_fn": "movie/img.json",
            "objects": ["person", "dog"], "question": ["What", "is", [0], "holding", "?"],
            "answer_choices": [[[0], "holds", "a", "leash"], ["nothing"], ["a", "cup"], ["the", [1]]][:answers],
            "answer_label": 0, "rationale_choices": [["because"], ["the", [1], "pulls"], ["it", "is"], ["no"]],
            "rationale_label": 1}


def test_vcr_converter_grounds_tags_and_refuses_bad_items(tmp_path):
    from vlbert_ds.prep.cli import main

    (tmp_path / "movie").mkdir()
    (tmp_path / "movie" / "img.json").write_text(json.dumps({"boxes": [[10, 10, 60, 90, 0.9], [80, 40, 150, 95, 0.8]],
                                                             "width": 200, "height": 100}))
    _frcnn(tmp_path / "regions", "img", [[10, 10, 60, 90], [80, 40, 150, 95]])
    (tmp_path / "train.jsonl").write_text(json.dumps(_vcr_item("train-0")) + "\n")
    out = tmp_path / "vcr"
    args = ["vcr", "--out", str(out), "--annotations", str(tmp_path / "train.jsonl"), "--metadata-root",
            str(tmp_path), "--regions", str(tmp_path / "regions"), "--processes", "1"]
    assert main(args) == 0
    task = _read(out, "vcr")[0].task
    assert task.num_choices == 4 and task.batch.batch_size == 4
    from transformers import BertTokenizerFast

    from vlbert_ds.bundled import default_bert

    tokenizer = BertTokenizerFast.from_pretrained(default_bert())
    ids = task.batch.input_ids[0][task.batch.text_mask[0]].tolist()
    visual = task.batch.text_visual_index[0][task.batch.text_mask[0]].tolist()
    words = tokenizer.convert_ids_to_tokens(ids)
    casey = [v for w, v in zip(words, visual, strict=True) if w == "casey"]
    assert casey == [1, 1]  # "person" 0 is rendered as a neutral name, grounded on RoI 1 (RoI 0 = image)
    assert task.batch.token_type_ids[0][task.batch.text_mask[0]].tolist()[-1] == 1  # the answer is segment B

    from vlbert_ds.data.task_batches import COCO_CLASSES, TaskDataConfig, TaskStream

    config = TaskDataConfig(task="vcr", tokenizer=default_bert(), object_classes=list(COCO_CLASSES), num_workers=0)
    (item,) = list(TaskStream(str(out), config, loop=False))
    person, dog = COCO_CLASSES.index("person"), COCO_CLASSES.index("dog")
    assert (person, dog) == (1, 17) and item.task.object_labels.tolist() == [[0, person, dog]] * 4

    (tmp_path / "bad.jsonl").write_text(json.dumps(_vcr_item("val-7", answers=3)) + "\n")
    bad = [*args[:4], str(tmp_path / "bad.jsonl"), *args[5:]]
    bad[2] = str(tmp_path / "bad-out")
    assert main(bad) == 2


def test_vcr_wrong_choice_count_names_the_item(tmp_path, capsys):
    from vlbert_ds.prep.task_converters import vcr_rows

    (tmp_path / "bad.jsonl").write_text(json.dumps(_vcr_item("val-7", answers=3)) + "\n")
    with pytest.raises(ValueError, match=r"val-7.*3 choices"):
        vcr_rows(str(tmp_path / "bad.jsonl"), str(tmp_path))
    item = _vcr_item("val-8")
    item["question"] = ["is", [5], "?"]
    (tmp_path / "tag.jsonl").write_text(json.dumps(item) + "\n")
    with pytest.raises(ValueError, match=r"val-8.*object 5"):
        vcr_rows(str(tmp_path / "tag.jsonl"), str(tmp_path))


def test_refcoco_converter_labels_boxes_by_iou_and_names_missing_annotations(tmp_path):
    from vlbert_ds.prep.cli import main
    from vlbert_ds.prep.task_converters import refcoco_rows

    instances = {"images": [{"id": 5, "width": 200, "height": 100}],
                 "annotations": [{"id": 50, "image_id": 5, "bbox": [10, 10, 40, 60], "category_id": 1},
                                 {"id": 51, "image_id": 5, "bbox": [100, 20, 50, 50], "category_id": 18}]}
    refs = [{"ref_id": 900, "ann_id": 51, "image_id": 5, "split": "train",
             "sentences": [{"sent": "dog on the right"}, {"sent": "right animal"}]},
            {"ref_id": 901, "ann_id": 50, "image_id": 5, "split": "val", "sentences": [{"sent": "left person"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    _frcnn(tmp_path / "regions", "5", [[10, 10, 49, 69], [100, 20, 149, 69]])
    out = tmp_path / "ref"
    assert main(["refcoco", "--out", str(out), "--refs", str(tmp_path / "refs.json"), "--instances",
                 str(tmp_path / "instances.json"), "--split", "train", "--regions", str(tmp_path / "regions"),
                 "--processes", "1"]) == 0
    task = _read(out, "refcoco")[0].task
    assert task.batch.batch_size == 2  # two sentences of ref 900
    assert task.region_labels[:, :3].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]  # RoI 2 = annotation 51
    assert task.target_boxes[0].tolist() == [100.0, 20.0, 149.0, 69.0]

    refs.append({"ref_id": 902, "ann_id": 77, "image_id": 5, "split": "train", "sentences": [{"sent": "x"}]})
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(ValueError, match="ref 902: annotation 77"):
        refcoco_rows(str(tmp_path / "refs.json"), str(tmp_path / "instances.json"), "train")


# ----------------------------------------------------------------------------- released checkpoints
def _official_state(model: VLBertForPretraining) -> dict[str, torch.Tensor]:
    """Our weights under the official module names, written out by hand from the official code."""
    ours = dict(model.named_parameters())
    state = {}
    for name, tensor in ours.items():
        parts = name.split(".")
        if name.startswith("vlbert.appearance.") and name != "vlbert.appearance.masked_region_feature":
            continue  # the e2e ResNet: `_official_e2e_resnet` writes it
        if name.startswith("vlbert.encoder."):
            key = name
        elif name.startswith("vlbert.embeddings.") and parts[2] in ("word_embeddings", "position_embeddings",
                                                                    "token_type_embeddings"):
            key = f"vlbert.{parts[2]}.weight"
        elif name.startswith("vlbert.embeddings.LayerNorm."):
            key = f"vlbert.embedding_LayerNorm.{parts[-1]}"
        elif name.startswith("vlbert.embeddings.visual_ln_"):
            key = f"vlbert.{parts[2]}.{parts[3]}"
        else:
            key = {"vlbert.embeddings.end_embedding": "vlbert.end_embedding.weight",
                   "vlbert.embeddings.image_token_embedding": "object_linguistic_embeddings.weight",
                   "vlbert.embeddings.masked_image_token_embedding": "object_mask_word_embedding.weight",
                   "vlbert.embeddings.text_only_visual_embedding": "aux_text_visual_embedding.weight",
                   "vlbert.appearance.masked_region_feature": "object_mask_visual_embedding.weight",
                   "vlbert.region_fusion.linear.weight": "image_feature_extractor.obj_downsample.1.weight",
                   "vlbert.region_fusion.linear.bias": "image_feature_extractor.obj_downsample.1.bias",
                   "mlm_head.bias": "vlbert.mlm_head.predictions.bias",
                   "mrc_head.classifier.weight": "vlbert.mvrc_head.region_cls_pred.weight",
                   "mrc_head.classifier.bias": "vlbert.mvrc_head.region_cls_pred.bias"}.get(name)
            if key is None and name.startswith("mlm_head.transform."):
                key = "vlbert.mlm_head.predictions.transform." + name[len("mlm_head.transform."):]
            if key is None and name.startswith("mrc_head.transform."):
                key = "vlbert.mvrc_head.transform." + name[len("mrc_head.transform."):]
        assert key is not None, name
        value = tensor.detach().clone()
        if value.dim() == 1 and ("embedding" in key and "LayerNorm" not in key and "visual_ln" not in key):
            value = value[None]  # the official nn.Embedding(1, H) vectors
        state[f"module.{key}"] = value
    state["module.vlbert.mlm_head.predictions.decoder.weight"] = ours["vlbert.embeddings.word_embeddings.weight"]
    state["module.image_feature_extractor.backbone.conv1.weight"] = torch.zeros(64, 3, 7, 7)  # e2e only
    return state


def test_a_released_checkpoint_with_official_names_loads_completely(tmp_path):
    from vlbert_ds.model.official import load_official_checkpoint

    torch.manual_seed(1)
    source = VLBertForPretraining(_config())
    torch.save({"state_dict": _official_state(source), "epoch": 10}, tmp_path / "vl-bert-tiny-prec.model")
    torch.manual_seed(2)
    target = VLBertForPretraining(_config())
    report = load_official_checkpoint(target, tmp_path / "vl-bert-tiny-prec.model")
    assert report.fresh == []
    assert report.unused == ["module.image_feature_extractor.backbone.conv1.weight"]
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    batch = make_vl_batch(source.config)
    with torch.no_grad():
        assert torch.allclose(source.eval().vlbert(batch).text_output, target.eval().vlbert(batch).text_output)


def _official_e2e_resnet(backbone: str, seed: int) -> dict[str, torch.Tensor]:
    """The official e2e FastRCNN's ResNet tensors under its names (`common/fast_rcnn.py`, torchvision-named
    layers with nn.BatchNorm2d), made from a torchvision ResNet with random weights and statistics."""
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, backbone)(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.num_batches_tracked.fill_(1000)
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("fc."):
            continue
        if key.startswith("layer4."):
            rest = key[len("layer4."):]
            state[f"module.image_feature_extractor.roi_head_feature_extractor.{rest}"] = value.clone()
            state[f"module.image_feature_extractor.head.0.{rest}"] = value.clone()
        else:
            state[f"module.image_feature_extractor.backbone.{key}"] = value.clone()
    return state


def test_a_released_e2e_checkpoint_maps_its_resnet_with_zero_unmapped_keys(tmp_path):
    from vlbert_ds.model.official import load_official_checkpoint

    config = VLBertConfig.preset("tiny", visual_front_end="end_to_end", backbone="resnet18", num_region_classes=25)
    torch.manual_seed(1)
    source = VLBertForPretraining(config)
    state = {k: v for k, v in _official_state(source).items()
             if k != "module.image_feature_extractor.backbone.conv1.weight"}
    resnet = _official_e2e_resnet("resnet18", seed=3)
    state.update(resnet)
    torch.save({"state_dict": state}, tmp_path / "vl-bert-tiny-e2e.model")
    target = VLBertForPretraining(config)
    report = load_official_checkpoint(target, tmp_path / "vl-bert-tiny-e2e.model")
    assert report.unused == [] and report.fresh == []
    ours = target.state_dict()
    stages = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "res2.", "layer2.": "res3.", "layer3.": "res4."}
    checked = 0
    for key, value in resnet.items():
        if key.endswith("num_batches_tracked"):
            continue
        rest = key.split("image_feature_extractor.", 1)[1]
        if rest.startswith("backbone."):
            rest = rest[len("backbone."):]
            prefix = next(p for p in stages if rest.startswith(p))
            name = "vlbert.appearance." + stages[prefix] + rest[len(prefix):]
        else:
            name = "vlbert.appearance.res5." + rest.removeprefix("head.0.").removeprefix("roi_head_feature_extractor.")
        assert torch.equal(ours[name], value), name
        checked += 1
    assert checked == sum(1 for k in resnet if not k.endswith("num_batches_tracked"))
    # Two copies of res5 that disagree are refused.
    state["module.image_feature_extractor.head.0.0.conv1.weight"] += 1
    torch.save({"state_dict": state}, tmp_path / "bad.model")
    with pytest.raises(ValueError, match="differs from"):
        load_official_checkpoint(VLBertForPretraining(config), tmp_path / "bad.model")

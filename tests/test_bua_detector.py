"""The bottom-up-attention detector: Caffe anchors and box arithmetic, the two public ports' checkpoint
names (state dicts written here with their exact names and shapes), features equal to the end-to-end
front end's for the same weights, and extraction on real photographs through `vlbert-prep regions`."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vlbert_ds.model.config import VLBertConfig
from vlbert_ds.model.detector import (
    BottomUpAttentionDetector,
    BUASpec,
    CaffeBoxCoder,
    build_bua_detector,
    caffe_anchors,
    caffe_nms,
    load_detector_weights,
    save_detector,
)
from vlbert_ds.model.visual import FastRCNNAppearance, calibrate_frozen_batchnorm
from vlbert_ds.prep.cli import main as prep_main

SMALL = dict(backbone="resnet18", num_classes=25, num_attributes=0, anchor_scales=(2.0, 4.0, 8.0),
             min_size=240, max_size=320, roi_output_size=7, rpn_post_nms=100)


def test_caffe_anchors_are_py_faster_rcnn_s():
    # py-faster-rcnn's generate_anchors() output (ratios 0.5, 1, 2 x scales 8, 16, 32), as printed by it
    # (and Shaoqing Ren's MATLAB anchors minus 1 for 0-based pixels).
    expected = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    assert caffe_anchors((0.5, 1.0, 2.0), (8.0, 16.0, 32.0)).tolist() == expected
    released = caffe_anchors(BUASpec().anchor_ratios, BUASpec().anchor_scales)
    assert released.shape == (12, 4)
    assert released[5].tolist() == [-56, -56, 71, 71]  # ratio 1, scale 8: 128 x 128 around (7.5, 7.5)


def test_caffe_box_arithmetic():
    coder = CaffeBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # 16 x 16 pixels, centre (8, 8)
    decoded = coder.decode_single(torch.tensor([[0.1, 0.0, float(np.log(2.0)), 0.0]]), box)
    # centre x 8 + 0.1 * 16 = 9.6, width 32: x 9.6 -+ 16; y unchanged: 8 -+ 8
    assert torch.allclose(decoded, torch.tensor([[-6.4, 0.0, 25.6, 16.0]]))
    target = torch.tensor([[3.0, 4.0, 40.0, 30.0]])
    assert torch.allclose(coder.decode_single(coder.encode_single(target, box), box) - torch.tensor([[0, 0, 1, 1]]),
                          target, atol=1e-5)
    # bf16 network outputs (GPU autocast) are decoded in fp32: 979 is not a bf16 number (980 is)
    codes = torch.tensor([[0.1, 0.0, float(np.log(2.0)), 0.0]]).bfloat16()
    far = torch.tensor([[900.0, 500.0, 979.0, 579.0]])
    decoded = coder.decode_single(codes, far)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, coder.decode_single(codes.float(), far))
    # Caffe's IoU counts the end pixel: (0..9) vs (5..14) share 5 of 10 columns: 50 / 150 = 0.333 > 0.3
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    assert caffe_nms(boxes, scores, 0.3).tolist() == [0]
    from torchvision.ops import nms

    assert nms(boxes, scores, 0.3).tolist() == [0, 1]  # without the end pixel: 36 / 126 = 0.286


# --- the public ports' checkpoints -----------------------------------------------------------------

def _detectron2_resnet(blocks, res5_prefix="roi_heads"):
    """(name, shape) of a detectron2 ResNet (MSRA bottlenecks) with the ports' prefixes: res2-4 under
    `backbone.`, res5 under `roi_heads.` (the C4 head); norms as `<conv>.norm.*`."""
    shapes = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"] = (out, inp, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{p}"] = (out,)

    conv("backbone.stem.conv1", 64, 3, 7)
    inp, width, out = 64, 64, 256
    for stage, count in zip(("res2", "res3", "res4", "res5"), blocks, strict=True):
        prefix = res5_prefix if stage == "res5" else "backbone"
        for i in range(count):
            name = f"{prefix}.{stage}.{i}"
            if i == 0:
                conv(f"{name}.shortcut", out, inp, 1)
            conv(f"{name}.conv1", width, inp if i == 0 else out, 1)
            conv(f"{name}.conv2", width, width, 3)
            conv(f"{name}.conv3", out, width, 1)
        inp, width, out = out, width * 2, out * 2
    return shapes


def _port_state(layout: str) -> dict[str, torch.Tensor]:
    shapes = _detectron2_resnet((3, 4, 23, 3))
    shapes["proposal_generator.rpn_head.conv.weight"] = (512, 1024, 3, 3)
    shapes["proposal_generator.rpn_head.conv.bias"] = (512,)
    if layout == "milvlg":  # bua/caffe: 2-way softmax per anchor, background first; 1601 x 4 regression
        shapes |= {"proposal_generator.rpn_head.objectness_logits.weight": (24, 512, 1, 1),
                   "proposal_generator.rpn_head.objectness_logits.bias": (24,),
                   "roi_heads.box_predictor.bbox_pred.weight": (1601 * 4, 2048),
                   "roi_heads.box_predictor.bbox_pred.bias": (1601 * 4,),
                   "roi_heads.box_predictor.cls_embed.weight": (1601, 256),
                   "roi_heads.box_predictor.attr_linear1.weight": (512, 2304),
                   "roi_heads.box_predictor.attr_linear1.bias": (512,),
                   "roi_heads.box_predictor.attr_linear2.weight": (401, 512),
                   "roi_heads.box_predictor.attr_linear2.bias": (401,)}
        for key in [k for k in shapes if k.endswith("norm.running_var")]:  # detectron2 "BN" keeps a counter
            shapes[key.replace("running_var", "num_batches_tracked")] = ()
    else:  # airsplay: one logit per anchor; background last; 1600 x 4 regression; detectron2 buffers
        shapes |= {"proposal_generator.rpn_head.objectness_logits.weight": (12, 512, 1, 1),
                   "proposal_generator.rpn_head.objectness_logits.bias": (12,),
                   "roi_heads.box_predictor.bbox_pred.weight": (1600 * 4, 2048),
                   "roi_heads.box_predictor.bbox_pred.bias": (1600 * 4,),
                   "roi_heads.box_predictor.cls_embedding.weight": (1601, 256),
                   "roi_heads.box_predictor.fc_attr.weight": (512, 2304),
                   "roi_heads.box_predictor.fc_attr.bias": (512,),
                   "roi_heads.box_predictor.attr_score.weight": (401, 512),
                   "roi_heads.box_predictor.attr_score.bias": (401,),
                   "pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1)}
    shapes |= {"proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
               "proposal_generator.rpn_head.anchor_deltas.bias": (48,),
               "roi_heads.box_predictor.cls_score.weight": (1601, 2048),
               "roi_heads.box_predictor.cls_score.bias": (1601,)}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        small = int(np.prod(shape)) <= 2_000_000
        state[name] = torch.rand(shape, generator=generator) + 0.5 if small else torch.full(shape, 0.01)
    state["roi_heads.box_predictor.cls_score.bias"] = torch.randn(1601, generator=generator)
    return state


@pytest.mark.parametrize("layout", ["milvlg", "airsplay"])
def test_each_public_port_maps_with_no_unmapped_key(tmp_path, layout):
    state = _port_state(layout)
    if layout == "milvlg":  # bua-caffe-frcn-r101_with_attributes.pth: a torch file, {"model": ...}
        path = tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"
        torch.save({"model": state}, path)
    else:  # faster_rcnn_from_caffe_attr.pkl: detectron2's numpy pickle
        path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
        with open(path, "wb") as handle:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "port"}, handle, 2)
    spec, mapped = load_detector_weights(path)
    assert (spec.backbone, spec.num_classes, spec.num_attributes) == ("resnet101", 1601, 401)
    detector = build_bua_detector(path)  # strict: no missing, unexpected or reshaped weight
    ours = detector.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert torch.equal(ours["body.res4.22.bn3.running_var"], state["backbone.res4.22.conv3.norm.running_var"])
    assert torch.equal(ours["body.res5.0.downsample.0.weight"], state["roi_heads.res5.0.shortcut.weight"])
    obj = state["proposal_generator.rpn_head.objectness_logits.weight"]
    cls = state["roi_heads.box_predictor.cls_score.bias"]
    if layout == "milvlg":
        # softmax([bg, fg])[fg] == sigmoid(fg - bg): channels 0..11 background, 12..23 object
        assert torch.equal(ours["rpn.head.objectness.weight"], obj[12:] - obj[:12])
        assert torch.equal(ours["cls_score.bias"], cls)
        assert torch.equal(ours["bbox_pred.weight"], state["roi_heads.box_predictor.bbox_pred.weight"])
    else:
        # detectron2 anchor (size i, ratio j) is channel 3i + j; Caffe's (ratio j, scale i) is 4j + i
        for i in range(4):
            for j in range(3):
                assert torch.equal(ours["rpn.head.objectness.weight"][4 * j + i], obj[3 * i + j])
                assert torch.equal(ours["rpn.head.deltas.bias"][4 * (4 * j + i): 4 * (4 * j + i) + 4],
                                   state["proposal_generator.rpn_head.anchor_deltas.bias"][4 * (3 * i + j):
                                                                                           4 * (3 * i + j) + 4])
        assert ours["cls_score.bias"][0] == cls[1600] and torch.equal(ours["cls_score.bias"][1:], cls[:1600])
        assert not ours["bbox_pred.weight"][:4].any()
        assert torch.equal(ours["bbox_pred.weight"][4:], state["roi_heads.box_predictor.bbox_pred.weight"])


def test_weights_of_another_architecture_are_refused_naming_what_does_not_fit(tmp_path):
    state = _port_state("milvlg")
    state["roi_heads.box_predictor.mask_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"no place for.*mask_head"):
        build_bua_detector(tmp_path / "extra.pth")
    state = _port_state("milvlg")
    del state["backbone.res4.22.conv3.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \(e\.g\. \['body\.res4\.22\.conv3\.weight'\]"):
        build_bua_detector(tmp_path / "missing.pth")
    blocks = _detectron2_resnet((3, 4, 7, 3))  # no ResNet has 7 res4 blocks
    state = {k: torch.zeros(v) for k, v in blocks.items()} | {
        k: v for k, v in _port_state("milvlg").items() if not k.startswith(("backbone.res", "roi_heads.res5"))}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"\[3, 4, 7, 3\] blocks per stage"):
        build_bua_detector(tmp_path / "odd.pth")
    torch.save({"roi_heads.box_head.fc6.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a bottom-up-attention detector"):
        build_bua_detector(tmp_path / "other.pth")


# --- one body: extraction features == end-to-end front end features ------------------------------

@pytest.fixture(scope="module")
def photo():
    from skimage import data

    # 600 x 900: the detector's input size already, so both paths see the same pixels
    return torch.from_numpy(np.array(Image.fromarray(data.coffee()).resize((900, 600)))).permute(2, 0, 1)


@pytest.mark.parametrize("pooler", ["pool", "align"])
def test_extraction_and_the_end_to_end_front_end_give_the_same_features(tmp_path, photo, pooler):
    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(BUASpec(backbone="resnet18", num_attributes=0, roi_pooler=pooler)).eval()
    # statistics from the photograph: activations of order 1, so that the 1e-5 tolerance means something
    box = torch.tensor([[0, 0, 99, 99.0]])
    calibrate_frozen_batchnorm(detector, lambda: detector.features_for_boxes([photo], [box]))
    path = tmp_path / "bua.safetensors"
    save_detector(detector, path)
    config = VLBertConfig.preset("tiny", visual_front_end="end_to_end", backbone="resnet18",
                                 backbone_stem_pool="caffe", roi_pooler=pooler, backbone_weights=str(path))
    front_end = FastRCNNAppearance(config).eval()
    boxes = torch.tensor([[0.0, 0.0, 899.0, 599.0], [100.0, 50.0, 400.0, 300.0], [512.3, 200.7, 700.1, 590.2],
                          [30.0, 400.0, 61.0, 430.0]])
    with torch.no_grad():
        expected = front_end(photo[None], boxes[None], torch.ones(1, 4, dtype=torch.bool), None,
                             torch.tensor([[900, 600]]))[0]
    got = build_bua_detector(path).features_for_boxes([photo], [boxes])[0]
    assert expected.abs().max() > 0.1  # activations of order 1: the tolerance is meaningful
    assert (got - expected).abs().max() < 1e-5
    # and extraction's own regions carry exactly those features
    loaded = build_bua_detector(path)
    regions = loaded([photo])[0]
    again = loaded.features_for_boxes([photo], [regions.boxes])[0]
    assert 10 <= regions.boxes.shape[0] <= 100 and (regions.features - again).abs().max() < 1e-5
    # the stem matters: torchvision's padded max pool is another network
    other = FastRCNNAppearance(VLBertConfig.preset("tiny", visual_front_end="end_to_end", backbone="resnet18",
                                                   roi_pooler=pooler, backbone_weights=str(path))).eval()
    with torch.no_grad():
        shifted = other(photo[None], boxes[None], torch.ones(1, 4, dtype=torch.bool), None, torch.tensor([[900, 600]]))
    assert (shifted[0] - expected).abs().max() > 1e-2


def test_no_box_above_the_threshold_still_gives_ten_and_tiny_images_give_none(photo):
    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(BUASpec(**SMALL)).eval()
    with torch.no_grad():
        detector.cls_score.weight.zero_()
        detector.cls_score.bias.zero_()  # every class 1/25: no proposal reaches 0.5
    # Caffe's proposal layer drops boxes under 16 original pixels a side: a 9 x 13 image has none left
    # (extraction counts it as `no_regions`); a 60 x 80 one keeps the official minimum of 10.
    tiny = torch.randint(0, 255, (3, 9, 13), dtype=torch.uint8)
    small = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)
    gray = torch.from_numpy(np.array(Image.fromarray(photo.permute(1, 2, 0).numpy()).convert("L").convert("RGB")))
    found = detector([photo, tiny, small, gray.permute(2, 0, 1)])
    assert [r.boxes.shape[0] for r in found] == [10, 0, 10, 10]
    assert torch.allclose(found[0].confidence, torch.full((10,), 1 / 25))
    assert (found[2].boxes[:, 2] <= 80).all() and (found[2].boxes[:, 3] <= 60).all()  # in the image's own pixels


def test_attribute_head_runs_when_the_weights_have_it(photo):
    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(BUASpec(**{**SMALL, "num_attributes": 401})).eval()
    regions = detector([photo])[0]
    assert regions.attributes.shape == (regions.boxes.shape[0], 401)
    assert torch.allclose(regions.attributes.sum(1), torch.ones(regions.boxes.shape[0]), atol=1e-4)


def test_training_step_reduces_the_loss_on_a_fixed_scene():
    from vlbert_ds.prep.train_detector import swap_batchnorm

    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(BUASpec(**SMALL))
    swap_batchnorm(detector, trainable=True)
    detector.train()
    image = torch.full((3, 240, 320), 220, dtype=torch.uint8)
    image[:, 40:100, 60:120] = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None]
    targets = [{"boxes": torch.tensor([[60.0, 40.0, 119.0, 99.0]]), "labels": torch.tensor([7])}]
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(detector([image], targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    swap_batchnorm(detector, trainable=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())


# --- through the tool -----------------------------------------------------------------------------

@pytest.fixture()
def modes(tmp_path):
    """Photographs in the modes users have: grayscale, palette, RGBA, CMYK, 16-bit, and one too small."""
    from skimage import data

    coffee = Image.fromarray(data.coffee())
    coffee.convert("L").save(tmp_path / "gray.png")
    coffee.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    coffee.convert("RGBA").save(tmp_path / "alpha.png")
    coffee.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(tmp_path / "deep.png")
    coffee.resize((12, 8)).save(tmp_path / "tiny.png")
    names = ["gray.png", "palette.png", "alpha.png", "cmyk.jpg", "deep.png", "tiny.png"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": n, "caption": f"a {n}", "image_id": n}) + "\n"
                                              for n in names))
    return tmp_path


def test_regions_command_with_a_bua_detector_on_every_image_mode(modes, tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "bua_small.safetensors"
    save_detector(BottomUpAttentionDetector(BUASpec(**SMALL)), weights)
    out = tmp_path / "regions"
    args = ["regions", "--manifest", str(modes / "m.jsonl"), "--detector", f"bua:{weights}", "--out", str(out),
            "--batch-size", "3"]
    assert prep_main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "bottom-up-attention resnet18 (25 classes, 512-d features)" in printed and "image_too_small" in printed
    lines = (out / "regions-000000.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["gray.png", "palette.png", "alpha.png", "cmyk.jpg",
                                                        "deep.png"]  # tiny.png (12 x 8): image_too_small
    assert all(10 <= int(line.split("\t")[3]) <= 100 for line in lines)
    shards = tmp_path / "shards"
    assert prep_main(["captions", "--manifest", str(modes / "m.jsonl"), "--regions", str(out), "--no-images",
                      "--out", str(shards), "--processes", "1"]) == 0
    stats = json.loads((shards / "shard-000000_stats.json").read_text())
    assert stats["successes"] == 5 and stats["skipped"] == {"missing_regions": 1}

    # `captions --detector` does both steps in one command, and a re-run finds both done.
    one_pass = tmp_path / "one_pass"
    command = ["captions", "--manifest", str(modes / "m.jsonl"), "--detector", f"bua:{weights}", "--no-images",
               "--out", str(one_pass), "--processes", "1"]
    assert prep_main(command) == 0
    detected = (one_pass / "regions" / "regions-000000.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in detected] == [line.split("\t")[0] for line in lines]
    assert json.loads((one_pass / "shard-000000_stats.json").read_text())["successes"] == 5
    capsys.readouterr()
    assert prep_main(command) == 0
    printed = capsys.readouterr().out
    assert "1 already done" in printed and "(0 written, 1 already done)" in printed

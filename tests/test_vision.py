"""Vision: generator ground truth against pixels, tuning of hand-built filters, the verbalizer
round trip, a channel run in the text units' formats, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from neuroscribe.errors import UserError
from neuroscribe.vision.data import (
    CELL,
    COLOURS,
    CONTRASTS,
    caption,
    caption_words,
    digits,
    is_held_out,
    object_mask,
    primitives,
    render,
    sample_truth,
)

torch = pytest.importorskip("torch")
ndimage = pytest.importorskip("scipy.ndimage")


def _truths(n: int, seed: int = 0, shapes: tuple[str, ...] | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        t = sample_truth(rng)
        if shapes is None or t["shape"] in shapes:
            out.append(t)
    return out


def _cover(t: dict) -> np.ndarray:
    return np.max([object_mask(t, o["cy"], o["cx"]) for o in t["objects"]], axis=0)


def test_objects_drawn_where_the_truth_says() -> None:
    """One connected blob of ink per object, each in its declared cell, centred on it."""
    for t in _truths(300, shapes=("line", "circle", "square", "triangle", "cross", "blob")):
        lab, n = ndimage.label(_cover(t) >= 0.5, structure=np.ones((3, 3)))
        assert n == t["count"], (t, n)
        for k in range(1, n + 1):
            cy, cx = ndimage.center_of_mass(lab == k)
            cell = int((cy + 0.5) // CELL) * 3 + int((cx + 0.5) // CELL)
            assert cell in t["cells"], (t, cy, cx)
            if t["shape"] in ("circle", "square", "blob", "cross"):
                near = min(math.hypot(cy + 0.5 - o["cy"], cx + 0.5 - o["cx"])
                           for o in t["objects"])
                assert near < 0.75, (t, cy, cx)


def test_colour_contrast_and_background_in_the_pixels() -> None:
    for t in _truths(60, seed=1, shapes=("circle", "square")):
        img = render(t)  # no noise
        o = t["objects"][0]
        centre = img[:, int(o["cy"]), int(o["cx"])]
        ink = np.array(COLOURS[t["colour"]]) * CONTRASTS[t["contrast"]]
        np.testing.assert_allclose(centre, ink, atol=1e-5)
        far = _cover(t) == 0
        np.testing.assert_allclose(img[:, far], t["background"], atol=1e-6)


def _angle_from_moments(mask: np.ndarray) -> float:
    """Orientation of a mask's long axis, degrees anticlockwise from horizontal (y down)."""
    ys, xs = np.nonzero(mask)
    w = mask[ys, xs]
    x, y = xs - np.average(xs, weights=w), -(ys - np.average(ys, weights=w))
    cxx, cyy, cxy = (np.average(v, weights=w) for v in (x * x, y * y, x * y))
    return float(np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy)) % 180)


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


def test_line_and_grating_orientation_match_the_truth() -> None:
    for t in _truths(40, seed=2, shapes=("line",)):
        if t["scale"] != "thin":
            continue
        o = t["objects"][0]
        m = object_mask(t, o["cy"], o["cx"])
        assert _angle_diff(_angle_from_moments(m), t["angle"]) < 6, t
    for t in _truths(20, seed=3, shapes=("grating",)):
        lum = render(t).mean(axis=0)
        gy, gx = np.gradient(lum)
        # The gradient runs across the stripes: the structure tensor's minor axis is along them.
        j = np.array([[np.sum(gx * gx), -np.sum(gx * gy)], [-np.sum(gx * gy), np.sum(gy * gy)]])
        vals, vecs = np.linalg.eigh(j)
        along = vecs[:, 0]  # smallest eigenvalue: the stripe direction (x, y up)
        angle = float(np.degrees(np.arctan2(along[1], along[0])) % 180)
        assert _angle_diff(angle, t["angle"]) < 5, t


def test_captions_name_count_shape_and_cells() -> None:
    words = caption_words()
    for t in _truths(50, seed=4):
        text = caption(t)
        assert t["colour"] in text
        if t["shape"] == "grating":
            assert "grating over the whole image" in text
            continue
        assert text.startswith(words["count"][str(t["count"])] + " ")
        for c in t["cells"]:
            assert f"the {words['positions'][c]}" in text


def test_generator_is_seeded_and_splits_hold_out() -> None:
    a, ta = primitives(20, 5, "train")
    b, tb = primitives(20, 5, "train")
    np.testing.assert_array_equal(a, b)
    assert ta == tb and not any(is_held_out(t) for t in ta)
    _, th = primitives(20, 5, "heldout")
    assert all(is_held_out(t) for t in th)
    x, td = digits("test", limit=5)
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[int(0.7 * len(d.target)):]
    assert x.shape == (5, 3, 32, 32)
    assert [t["digit"] for t in td] == [str(d.target[i]) for i in order[:5]]
    np.testing.assert_allclose(x[0, 0, ::4, ::4], d.images[order[0]] / 16, atol=1e-6)
    assert caption(td[0]).startswith(f"the digit {td[0]['digit']}, written with")


def _gabor_net(angles: list[float], size: int = 7, freq: float = 0.2) -> torch.nn.Module:
    """Conv channels whose luminance filters are odd Gabors with stripes along ``angles``."""
    conv = torch.nn.Conv2d(3, len(angles), size, padding=size // 2)
    c = np.arange(size) - size // 2
    y, x = c[:, None], c[None, :]
    with torch.no_grad():
        for i, a in enumerate(angles):
            r = math.radians(a)
            across = x * math.sin(r) + y * math.cos(r)  # y points down
            g = np.sin(2 * np.pi * freq * across) * np.exp(-(x**2 + y**2) / 8.0)
            conv.weight[i] = torch.from_numpy(np.repeat(g[None], 3, 0).astype(np.float32))
        conv.bias.zero_()
    return torch.nn.Sequential(conv).eval()


def test_tuning_recovers_hand_built_orientation() -> None:
    from neuroscribe.vision.channels import describe, measure_tuning

    angles = [30.0, 90.0, 0.0, 137.0]
    tunings = measure_tuning(_gabor_net(angles), "0")
    for want, t in zip(angles, tunings):
        assert _angle_diff(t["angle"], want) <= 10, (want, t["angle"])
        assert t["axis"] == "brightness"
    assert describe(tunings[1]).startswith("vertical edges")
    assert describe(tunings[2]).startswith("horizontal edges")


def test_description_alone_predicts_a_gabor_channel() -> None:
    from neuroscribe.vision.channels import describe, measure_tuning, simulate_maps
    from neuroscribe.vision.cnn import activations

    net = _gabor_net([60.0, 150.0])
    x, _ = digits("test", limit=40)
    real = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(activations(net, "0", x)), 16).numpy()
    texts = [describe(t) for t in measure_tuning(net, "0")]
    for c, text in enumerate(texts):
        pred = simulate_maps(text, x, 16)
        r = np.corrcoef(pred.ravel(), real[:, c].ravel())[0, 1]
        wrong = np.corrcoef(simulate_maps(texts[1 - c], x, 16).ravel(), real[:, c].ravel())[0, 1]
        assert r > 0.8 and r > wrong + 0.3, (text, r, wrong)


def test_decode_of_true_outputs_gives_the_true_caption() -> None:
    from neuroscribe.vision.data import ATTRIBUTES
    from neuroscribe.vision.verbalize import decode, targets

    truths = primitives(60, 9, "train")[1] + digits("test", limit=10)[1]
    tg = targets(truths)
    out = {"cells": tg["cells"] * 5.0}
    for k, values in ATTRIBUTES.items():
        out[k] = np.zeros((len(truths), len(values)))
        for i, idx in enumerate(tg[k]):
            if idx >= 0:
                out[k][i, idx] = 5.0
    for i, t in enumerate(truths):
        assert caption(decode(out, i)) == caption(t)


def test_mirrored_truths_describe_the_mirrored_pixels() -> None:
    from neuroscribe.vision.verbalize import mirrored

    truths = _truths(80, seed=6, shapes=("line", "circle", "triangle", "cross", "blob"))
    x = np.stack([render(t) for t in truths])
    mx, mt = mirrored(x, truths)
    assert 0 < len(mt) < len(truths)  # some mirrors would show a held-out setting: dropped
    assert not any(is_held_out(t) for t in mt)
    for img, t in zip(mx, mt):
        np.testing.assert_allclose(img, render(t), atol=0.05)
    flipped = [t for t in mt if t["orientation"] in ("rising", "falling")]
    assert flipped and all(_angle_diff(t["angle"], 45 if t["orientation"] == "rising" else 135)
                           <= 5 for t in flipped)


def test_bleu_and_metrics() -> None:
    from neuroscribe.vision.verbalize import bleu, metrics

    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    # 4/5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams; same length: no brevity penalty
    want = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a b c d e"], ["a b c d x"]) == pytest.approx(want)
    _, truths = primitives(10, 3, "test")
    wrong = [{**t, "shape": "line" if t["shape"] != "line" else "circle"} for t in truths]
    m = metrics(truths, wrong)
    assert m["accuracy"]["shape"] == 0.0 and m["accuracy"]["colour"] == 1.0
    assert metrics(truths, truths)["exact_caption"] == 1.0


def test_verbalizer_round_trip_on_a_tiny_model(tmp_path: Path) -> None:
    from neuroscribe.vision.verbalize import (
        VerbalizerConfig,
        evaluate_features,
        load_verbalizer,
        predict,
        verbalizer_data,
    )

    torch.set_num_threads(1)
    cfg = VerbalizerConfig(n_train=600, n_test=80, n_heldout=40, verb_epochs=6, hidden=32,
                           verb_lr=5e-3, flip=False, channel_drop=0.0)
    data = verbalizer_data(cfg)
    model, res = evaluate_features("pixels", lambda x: x, data, cfg, tmp_path)
    assert set(res["sets"]) == {"test", "heldout", "heldout-colour", "heldout-cell", "digits"}
    m = res["sets"]["test"]
    assert 0 <= m["attribute_accuracy"] <= 1 and 0 <= m["bleu4"] <= 1
    assert m["accuracy"]["colour"] > 0.4  # learnt something (chance: 0.2)
    again = load_verbalizer(tmp_path / "verbalizer_pixels.pt")
    x = data["test"][0][:16]
    assert [caption(p) for p in predict(again, x)] == [caption(p) for p in predict(model, x)]


def test_verbalizer_names_an_object_the_same_wherever_it_is() -> None:
    from neuroscribe.vision.verbalize import LOCAL, build_verbalizer

    torch.manual_seed(0)
    model = build_verbalizer(4, hidden=16, depth=1).eval()
    maps = torch.zeros(2, 4, 32, 32)
    spot = torch.rand(4, 5, 5) + 0.5
    maps[0, :, 6:11, 6:11] = spot  # the same object, 12 pixels (6 encoder steps) apart
    maps[1, :, 18:23, 18:23] = spot
    with torch.no_grad():
        out = model(maps)
    for name in LOCAL:
        assert torch.allclose(out[name][0], out[name][1], atol=1e-5), name
    assert not torch.allclose(out["cells"][0], out["cells"][1])  # the cells do move


def test_verbalizer_refuses_bad_depth_and_old_files(tmp_path: Path) -> None:
    from neuroscribe.vision.verbalize import VerbalizerConfig, load_verbalizer, train_verbalizer

    x, truths = primitives(4, 0)
    with pytest.raises(UserError, match="--depth must be 1, 2 or 3"):
        train_verbalizer(x, truths, VerbalizerConfig(depth=4))
    torch.save({"state": {}, "in_channels": 16, "hidden": 128}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="older neuroscribe"):
        load_verbalizer(tmp_path / "old.pt")


def test_greyed_replaces_images_by_their_luminance() -> None:
    from neuroscribe.vision.cnn import greyed

    x = torch.zeros(2, 3, 1, 1)
    x[:, :, 0, 0] = torch.tensor([1.0, 0.5, 0.0])
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(greyed(x, 0.0, gen), x)
    grey = greyed(x, 1.0, gen)
    assert torch.allclose(grey[:, :, 0, 0], torch.full((2, 3), 0.299 + 0.5 * 0.587))
    half = greyed(torch.rand(2000, 3, 2, 2, generator=gen), 0.5, gen)
    share = float((half[:, 0] == half[:, 1]).all(-1).all(-1).float().mean())
    assert 0.45 < share < 0.55


def test_verbalize_reuses_a_verbalizer_only_for_its_cnn_and_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import asdict

    import neuroscribe.vision.cnn as vision_cnn
    import neuroscribe.vision.verbalize as vision_verbalize
    from neuroscribe.vision.cnn import small_cnn

    cnn_config = {"seed": 0}
    monkeypatch.setattr(vision_cnn, "train_cnn", lambda cfg, out: (small_cnn().eval(),
                                                                   {"config": cnn_config}))
    monkeypatch.setattr(vision_verbalize, "verbalizer_data", lambda cfg: None)
    trained: list[dict] = []

    def fake_train(name, features, data, cfg, out, seed, subject):  # noqa: ANN001, ANN202
        trained.append(dict(subject))
        model = vision_verbalize.build_verbalizer(16, 8).eval()
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "in_channels": 16, "hidden": 8, "depth": 1},
                   out / "verbalizer_trained.pt")
        (out / "verbalizer_trained.json").write_text(json.dumps(
            {"config": asdict(cfg), "subject": subject}))
        return model, {}

    monkeypatch.setattr(vision_verbalize, "evaluate_features", fake_train)
    np.save(tmp_path / "img.npy", primitives(1, 0)[0][0])
    first = vision_verbalize.verbalize(tmp_path / "img.npy", tmp_path / "run")
    again = vision_verbalize.verbalize(tmp_path / "img.npy", tmp_path / "run")
    assert len(trained) == 1 and first == again  # the saved one was loaded, not retrained
    cnn_config["seed"] = 1  # another CNN in the folder: the verbalizer is retrained for it
    vision_verbalize.verbalize(tmp_path / "img.npy", tmp_path / "run")
    assert trained == [{"seed": 0}, {"seed": 1}]


def test_channel_run_writes_text_unit_formats(tmp_path: Path) -> None:
    from neuroscribe.record.core import RecordStore
    from neuroscribe.vision.cli import ChannelConfig, _channel_half

    torch.set_num_threads(1)
    cfg = ChannelConfig(n_stimuli=8, n_primitives=10, n_digits=10, n_top=8, n_random=6,
                        grid=8)
    res = _channel_half(_gabor_net([0.0, 90.0]), "gabors", "0", cfg, tmp_path)
    nr = RecordStore(tmp_path).neuron_record("0", 1)
    assert len(nr.most_positive_activation_records) == 8
    assert len(nr.most_positive_activation_records[0].tokens) == 64
    assert (tmp_path / "images" / "0" / "1" / "top_0.png").exists()
    assert (tmp_path / "index.sqlite").exists() and (tmp_path / "filters.png").exists()
    assert res["units"][1]["explanation"].startswith("vertical")
    assert res["units"][1]["stimuli"] > 0.5


def test_bad_images_and_folders(tmp_path: Path) -> None:
    from PIL import Image

    from neuroscribe.vision.data import image_files, load_image

    Image.new("L", (64, 48), 200).save(tmp_path / "grey.png")
    img, note = load_image(tmp_path / "grey.png")
    assert img.shape == (3, 32, 32) and "resized 64x48 -> 32x32" in note
    np.testing.assert_allclose(img, 200 / 255, atol=1e-6)
    np.save(tmp_path / "five.npy", np.zeros((5, 32, 32)))
    with pytest.raises(UserError, match="5, 32, 32"):
        load_image(tmp_path / "five.npy")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "text.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images in folder"):
        image_files(empty)


def test_bad_layers_and_models() -> None:
    from neuroscribe.vision.cnn import activations, conv_layer, load_user_cnn, small_cnn

    net = small_cnn()
    with pytest.raises(UserError, match="'act1' is a ReLU, not a conv layer"):
        conv_layer(net, "act1")
    with pytest.raises(UserError, match="did you mean conv2"):
        conv_layer(net, "conv22")
    with pytest.raises(UserError, match="cannot import"):
        load_user_cnn("no_such_module_xyz:Net")
    with pytest.raises(UserError, match="wants"):
        activations(net, "conv1", np.zeros((2, 5, 32, 32), np.float32))
    user = load_user_cnn("neuroscribe.vision.cnn:small_cnn")  # a callable returning a module
    assert conv_layer(user, "conv3").out_channels == 64
    with pytest.raises(UserError, match="not a torch nn.Module"):
        load_user_cnn("neuroscribe.vision.data:SHAPES")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neuroscribe.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["vision", "verbalize", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neuroscribe: error: no images in folder") and "\n" not in err


def test_a_deeper_layer_of_a_cnn(tmp_path: Path) -> None:
    from neuroscribe.vision.cli import ChannelConfig, _channel_half
    from neuroscribe.vision.cnn import small_cnn

    torch.set_num_threads(1)
    net = small_cnn(width=4).eval()
    cfg = ChannelConfig(n_stimuli=4, n_primitives=6, n_digits=6, n_top=4, n_random=3, grid=8)
    res = _channel_half(net, "narrow", "conv2", cfg, tmp_path)
    assert len(res["units"]) == 8 and all(u["explanation"] for u in res["units"])
    assert (tmp_path / "scores" / "conv2" / "7.scores.json").exists()
    assert not (tmp_path / "filters.png").exists()  # filters are drawn for the first layer only


def test_filter_grid_writes_one_cell_per_filter(tmp_path: Path) -> None:
    import matplotlib.image

    from neuroscribe.vision.channels import filter_grid
    from neuroscribe.vision.data import figure_grid

    fig, cells = figure_grid(6, 4, 3.3)
    assert len(cells) == 6 and len(fig.axes) == 8  # 2 rows x 4, the last two left blank
    filter_grid(np.random.default_rng(0).normal(size=(6, 3, 5, 5)), ["edges"] * 6,
                [0.5, None, 0.1, 0.2, 0.3, 0.4], tmp_path / "f.png")
    # 2 rows of 3.3 in and 4 columns of 4.2 in at 90 dpi
    assert matplotlib.image.imread(tmp_path / "f.png").shape[:2] == (594, 1512)

"""The methods comparison's per-run figures (megalora.umm.emojicap_metrics): per-sample losses
against the model's own training loss on the same documents, the multiple-choice rule on
closed-form score matrices, and the experiments' statistics against scipy's t-test."""

import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig
from megalora.umm.emojicap_metrics import choose

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch", "experiments"))


def _losses_worker(rank, world, run):
    from megalora.umm.batch import causal_mask, collate
    from megalora.umm.emojicap_metrics import sequence_losses
    from megalora.umm.generate import image_sample
    from megalora.umm.session import build_model, parallel_session

    g = torch.Generator().manual_seed(1)
    m, v = run.model, run.vision
    samples = []
    for i, n in enumerate((4, 9, 6, 11, 3)):
        text = torch.randint(0, m.base_vocab, (n,), generator=g).tolist()
        feats = torch.randn(m.image_tokens, m.visual_dim, generator=g)
        pixels = torch.rand(3, v.image_size, v.image_size, generator=g) if v.enabled else None
        # odd samples image -> caption, even ones caption -> image
        samples.append(image_sample([] if i % 2 else text, feats, _special(run),
                                    text if i % 2 else (), pixels))
    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        model.eval()
        mine = sequence_losses(model, run, samples, batch=2)
        seq = 40
        batch = collate(samples, seq, model.special)
        import megalora
        megalora.set_head_ids(model, batch.modality)
        with torch.no_grad():
            ref = model(batch, causal_mask(seq))
    return mine, {k: float(v) for k, v in ref.items()}


def _special(run):
    from megalora.umm.tokens import SpecialTokens
    return SpecialTokens(run.model.base_vocab)


@pytest.mark.slow
@pytest.mark.parametrize("vision", [False, True], ids=["features", "vision_in_loop"])
def test_sequence_losses_equal_the_models_own_loss(tmp_path, vision):
    """Summed over the samples, the per-sample figures give the model's forward losses on the
    same documents in one batch (text = lm + caption over all text targets; image per
    element), two documents per direction with both orders of caption and image; with the
    in-loop ViT each sample's image enters as its own pixels."""
    run = RunConfig.from_yaml("umm_tiny", [
        "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        f"train.out_dir={tmp_path}", "lora.init_b=gaussian", f"vision.enabled={vision}"])
    mine, ref = run_distributed(1, _losses_worker, (run,))[0]
    n_text = float(mine["lm_n"].sum() + mine["caption_n"].sum())
    assert float(mine["lm_n"].sum()) > 0 and float(mine["caption_n"].sum()) > 0
    assert float(mine["lm"].sum() + mine["caption"].sum()) / n_text == pytest.approx(
        ref["text"], rel=1e-5)
    assert float(mine["caption"].sum()) / n_text == pytest.approx(ref["caption"], rel=1e-5)
    assert float(mine["image"].sum() / mine["image_n"].sum()) == pytest.approx(ref["image"],
                                                                            rel=1e-5)


def test_choose_centres_each_candidate():
    # candidate j has an intrinsic score c_j far larger than the condition effect: without
    # centring every row would pick column 0; centred, each row picks its own column
    c = torch.tensor([0.0, 5.0, 9.0, 20.0], dtype=torch.float64)
    d = torch.full((4, 4), 1.0, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)
    s = c.unsqueeze(0) + d
    assert s.argmin(1).tolist() == [0, 0, 0, 0]
    assert choose(s).tolist() == [0, 1, 2, 3]
    # a shuffled truth is recovered the same way
    perm = torch.tensor([2, 0, 3, 1])
    assert choose(c.unsqueeze(0) + d[:, perm]).tolist() == torch.argsort(perm).tolist()


def test_intervals_match_scipys_t_test():
    from _report import interval, summarise

    x = [0.31, 0.35, 0.29, 0.33, 0.30]
    mean, half = interval(x)
    lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(x)) and (mean - half, mean + half) == pytest.approx(
        (lo, hi), rel=1e-12)
    rec = {f"{v}_s{s}": {"image_mse": a, "text_ce": 1.0, "caption_ce": 1.0,
                         "choice_caption_to_image": 0.2, "choice_image_to_caption": 0.2,
                         "step_cpu_seconds": 1.0,
                         "judge": {"category_accuracy": 0.3, "retrieval_top1": 0.0,
                                   "frechet": 9.0}}
           for v, vals in (("a", x), ("b", [y - 0.01 * (i + 1) for i, y in enumerate(x)]))
           for s, a in enumerate(vals)}
    out = summarise(rec, ["a", "b"], range(5), "a")["b"]["image_mse"]
    paired = stats.ttest_rel([y - 0.01 * (i + 1) for i, y in enumerate(x)], x)
    lo, hi = paired.confidence_interval(0.95)
    assert (out["diff"] - out["diff_ci"], out["diff"] + out["diff_ci"]) == pytest.approx(
        (lo, hi), rel=1e-9)
    assert out["rel"] == pytest.approx(-0.03 / np.mean(x))


def test_choice_pairs_keep_each_images_pixels_with_its_features():
    from megalora.umm.emojicap_metrics import choice_samples

    sp = _special(RunConfig.from_yaml("umm_tiny"))
    captions = [[1, 2], [3], [4, 5, 6]]
    feats = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)  # image k's features are all k
    pixels = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    for image_first in (False, True):
        samples = choice_samples(captions, feats, pixels, sp, [0, 2], [1, 2], image_first)
        assert len(samples) == 4
        for s in samples:
            assert s["pixels"].shape == (1, 3, 4, 4)
            assert float(s["pixels"].unique()) == float(s["features"].unique())
    # caption i then candidate image j: the image is j; image i then candidate caption j: i
    c2i = choice_samples(captions, feats, pixels, sp, [0], [2], False)[0]
    i2c = choice_samples(captions, feats, pixels, sp, [0], [2], True)[0]
    assert float(c2i["pixels"].max()) == 2.0 and c2i["tokens"][:2].tolist() == [1, 2]
    assert float(i2c["pixels"].max()) == 0.0 and i2c["tokens"][-3:].tolist() == [4, 5, 6]
    assert "pixels" not in choice_samples(captions, feats, None, sp, [0], [1], True)[0]

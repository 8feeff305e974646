"""Generation with the UMM: every generated image slot is what one teacher-forced pass over the
finished image predicts there, and every greedy caption token is the argmax one pass gives at
its position (causal attention makes the step-by-step and the one-pass results equal); the
caption scores count what they say."""

import pytest
import torch

from megalora.testing.dist import run_distributed
from megalora.umm.config import RunConfig
from megalora.umm.emojicap_eval import caption_hits

pytestmark = pytest.mark.slow  # spawns a process group


def _run(tmp):
    return RunConfig.from_yaml("umm_tiny", [
        "parallel.tensor_parallel=1", "parallel.sequence_parallel=false", f"train.out_dir={tmp}",
        "lora.init_b=gaussian"])  # the adapters change the outputs, so they are exercised


def _generate_and_check(rank, world, run):
    from megalora.umm.generate import forward_samples, image_sample, captions_to_images, \
        images_to_captions
    from megalora.umm.session import build_model, parallel_session

    g = torch.Generator().manual_seed(0)
    captions = [torch.randint(0, run.model.base_vocab, (n,), generator=g).tolist()
                for n in (3, 7, 5)]
    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        feats = captions_to_images(model, run, captions, batch=2)
        samples = [image_sample(c, feats[i], model.special) for i, c in enumerate(captions)]
        _, hidden, b = forward_samples(model, run, samples, max(map(len, captions)) + 6)
        one_pass = model.project_down(hidden[b.image_target_mask]).reshape(feats.shape)
        texts = images_to_captions(model, run, feats, max_new=5, batch=2)
        samples = [image_sample([], feats[i], model.special, t) for i, t in enumerate(texts)]
        logits, _, _ = forward_samples(model, run, samples, run.model.image_tokens + 2 + 5)
        n = run.model.image_tokens + 2
        argmax = logits[:, n - 1:n + 4, :run.model.base_vocab].argmax(-1)
    return feats, one_pass.detach(), texts, argmax


def test_generation_equals_one_teacher_forced_pass(tmp_path):
    feats, one_pass, texts, argmax = run_distributed(1, _generate_and_check,
                                                     (_run(tmp_path),))[0]
    assert feats.abs().sum() > 0
    torch.testing.assert_close(feats, one_pass, atol=1e-5, rtol=1e-5)
    assert [t for t in texts] == argmax.tolist()


def test_caption_hits():
    texts = ["flag: Germany: flag", "flag: France", "grinning face", "red apple: fruit"]
    names = ["flag: Germany", "flag: Japan", "grinning face", "green apple"]
    # exact: 0 and 2; words: 0, 1 (flag), 2, 3 (apple); shuffled names (next one's): exact
    # none, words: 0 (flag), 1 (no: "grinning face"), 2 (no: "green apple"), 3 (no: "flag...")
    assert caption_hits(texts, names) == {"name_accuracy": 0.5, "word_hit": 1.0,
                                          "name_accuracy_shuffled": 0.0,
                                          "word_hit_shuffled": 0.25}

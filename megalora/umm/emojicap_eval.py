"""EmojiCap's images by split, and ``megalora emojicap-judge``: train (or load) the judge and
print its ceiling on real held-out images beside chance.

    megalora emojicap-judge --data data/emojicap
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

import torch

from megalora.errors import UsageError
from megalora.umm.judge import JudgeConfig, chance, load_or_train, score, table


@dataclasses.dataclass
class EmojiImages:
    """One split's real images: ``pairs`` [N, 2, 3, S, S] (EmojiOne, Noto) and categories."""

    codes: List[str]
    pairs: torch.Tensor
    categories: torch.Tensor
    category_names: List[str]


def load_split(data_dir: str, split: str) -> EmojiImages:
    from megalora.umm.image_docs import load_image

    path = os.path.join(data_dir, "emoji.jsonl")
    if not os.path.exists(path):
        raise UsageError(f"{data_dir!r} is not an EmojiCap build (no emoji.jsonl): build it with "
                         "`megalora emojicap --out DIR` (make emojicap)")
    with open(os.path.join(data_dir, "emojicap.json")) as fh:
        manifest = json.load(fh)
    names = manifest["categories"]
    size = manifest["config"]["size"]
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if r["split"] == split]
    pairs = torch.stack([torch.stack([
        load_image(os.path.join(data_dir, "images", style, f"{r['code']}.png"), size, r["code"])
        for style in ("emojione", "noto")]) for r in rows])
    cats = torch.tensor([names.index(r["category"]) for r in rows])
    return EmojiImages([r["code"] for r in rows], pairs, cats, names)


def ceiling(data_dir: str, cfg: JudgeConfig, progress=print) -> Dict[str, dict]:
    """The judge (cached) and its scores on real test images, chance, and the train set."""
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    net = load_or_train(data_dir, cfg, {"train": train.pairs}, train.categories,
                        len(train.category_names), progress)
    real_train = train.pairs.flatten(0, 1)
    return {"real test": score(net, test.pairs[:, 0], test.pairs[:, 1], test.categories,
                               real_reference=real_train),
            "real train": score(net, train.pairs[:, 0], train.pairs[:, 1], train.categories),
            "chance (test)": chance(test.categories, len(test.codes))}


def add_parser(sub) -> None:
    p = sub.add_parser("emojicap-judge", help="train (or load) EmojiCap's judge on real train "
                                              "images; print its ceiling on real test images")
    p.add_argument("--data", default="data/emojicap", help="an EmojiCap build")
    d = JudgeConfig()
    for f in dataclasses.fields(JudgeConfig):
        p.add_argument("--" + f.name, type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.set_defaults(handler=run)


def run(args) -> int:
    cfg = JudgeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(JudgeConfig)})
    start = time.monotonic()
    scores = ceiling(args.data, cfg)
    print(table(list(scores.items())))
    print(f"(judge seed {cfg.seed}, {cfg.epochs} epochs; Fréchet distance of the real test "
          f"images' judge features to the real train images'; {time.monotonic() - start:.0f} s)")
    return 0


# ------------------------------------------------------------------ scoring a model


def score_generated(net, generated, other_style, reference_features,
                    categories) -> Dict[str, float]:
    """Judge scores of generated images [N, 3, S, S] (row i: emoji i): category accuracy;
    retrieval of each real ``other_style`` image's twin among them; Fréchet distance of their
    judge features to ``reference_features`` (the judge's features of real images of the same
    style)."""
    from megalora.umm.judge import frechet_distance, judge_outputs

    f, logits, emb = judge_outputs(net, generated)
    _, _, emb_other = judge_outputs(net, other_style)
    ref = reference_features
    rank = (emb_other @ emb.t()).argsort(dim=1, descending=True)
    hit = rank.eq(torch.arange(len(rank)).unsqueeze(1))
    return {"category_accuracy": float(logits.argmax(1).eq(categories).float().mean()),
            "retrieval_top1": float(hit[:, :1].any(1).float().mean()),
            "retrieval_top5": float(hit[:, :5].any(1).float().mean()),
            "frechet": frechet_distance(f, ref)}


def caption_hits(generated: List[str], names: List[str]) -> Dict[str, float]:
    """Greedy image -> caption against each emoji's CLDR short name (which may itself hold a
    colon, "flag: Germany"): ``name_accuracy``, the text starts with the name followed by ':'
    or the end; ``word_hit``, the text holds a 3+-letter word of the name. The ``_shuffled``
    twins score each text against another emoji's name (the next one): what generic, frequent
    names ("flag", "face") give without reading the image."""
    import re

    def scores(names_):
        exact = sum(g == n or g.startswith(n + ":") for g, n in zip(generated, names_))
        words = sum(bool(set(re.findall(r"[a-z]{3,}", n.lower())) &
                         set(re.findall(r"[a-z]{3,}", g.lower())))
                    for g, n in zip(generated, names_))
        return exact / len(names_), words / len(names_)

    name, word = scores(names)
    name_s, word_s = scores(names[1:] + names[:1])
    return {"name_accuracy": name, "word_hit": word, "name_accuracy_shuffled": name_s,
            "word_hit_shuffled": word_s}


def evaluate_model(run, data_dir: str, adapter: str = "", style: str = "noto",
                   judge_cfg: Optional[JudgeConfig] = None, progress=print,
                   limit: int = 0) -> dict:
    """Caption -> image scored by the judge beside its ceiling; image -> caption by greedy
    decoding; the held-out losses (``data.eval_path``) of the model of ``run`` (+ adapter).
    ``limit``: the first N test emoji only (quick checks)."""
    import megalora
    from megalora.umm.encoders import load_encoder
    from megalora.umm.generate import captions_to_images, images_to_captions
    from megalora.umm.image_docs import ByteTokenizer
    from megalora.umm.session import (build_datasets, build_model, build_streams, evaluate,
                                      parallel_session)

    judge_cfg = judge_cfg or JudgeConfig()
    s = ("emojione", "noto").index(style)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    if limit:
        test = EmojiImages(test.codes[:limit], test.pairs[:limit], test.categories[:limit],
                           test.category_names)
    net = load_or_train(data_dir, judge_cfg, {"train": train.pairs}, train.categories,
                        len(train.category_names), progress)
    rows = {r["code"]: r for r in map(json.loads, open(os.path.join(data_dir, "emoji.jsonl")))}
    captions = [rows[c]["captions"]["en"] for c in test.codes]
    names = [rows[c]["name"] for c in test.codes]
    encoder = load_encoder(os.path.join(data_dir, "encoder.safetensors"))
    tok = ByteTokenizer()
    with parallel_session(run) as device:
        model, _ = build_model(run, device)
        if adapter:
            megalora.load_adapter(model, adapter)
        held_out = None
        if run.data.eval_path:
            _, evals = build_streams(run, *build_datasets(run))
            held_out = evaluate(model, run, evals, device)
        feats = captions_to_images(model, run, [tok.encode(c) for c in captions])
        real = test.pairs[:, s]
        texts = images_to_captions(model, run, encoder.encode(real))
    from megalora.umm.judge import judge_outputs

    generated = encoder.decode(feats)
    reference = judge_outputs(net, train.pairs[:, s])[0]  # once, for every row below
    other = test.pairs[:, 1 - s]
    return {
        "generated": score_generated(net, generated, other, reference, test.categories),
        "ceiling (real test)": score_generated(net, real, other, reference, test.categories),
        "encoder round trip": score_generated(net, encoder.decode(encoder.encode(real)), other,
                                              reference, test.categories),
        "chance": chance(test.categories, len(test.codes)),
        "captions": caption_hits([tok.decode(t) for t in texts], names),
        "held_out": held_out, "samples": [tok.decode(t) for t in texts],
        "image_features_mse": float(((feats - encoder.encode(real)) ** 2).mean())}


def add_eval_parser(sub) -> None:
    p = sub.add_parser("emojicap-eval", help="score a UMM (+ LoRA adapter) on EmojiCap's test "
                                             "emoji: generated images by the judge, greedy "
                                             "captions, held-out losses")
    p.add_argument("--config", required=True, help="run config (e.g. emojicap_tiny)")
    p.add_argument("--adapter", default="", help="adapter file (default: none: the base)")
    p.add_argument("--data", default="data/emojicap", help="the EmojiCap build")
    p.add_argument("--style", choices=["emojione", "noto"], default="noto",
                   help="the art style generated images are compared with")
    p.add_argument("--json", default="", help="also write the scores here")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from megalora.umm.config import RunConfig

    run = RunConfig.from_yaml(args.config, args.overrides)
    result = evaluate_model(run, args.data, args.adapter, args.style)
    rows = [(k, result[k]) for k in ("generated", "ceiling (real test)", "encoder round trip",
                                     "chance")]
    print(table(rows))
    c, h = result["captions"], result["held_out"]
    print(f"image -> caption (greedy): name accuracy {c['name_accuracy']:.4f} (against shuffled "
          f"names {c['name_accuracy_shuffled']:.4f}), word hit {c['word_hit']:.4f} (shuffled "
          f"{c['word_hit_shuffled']:.4f}); e.g. {result['samples'][:3]}")
    print(f"generated vs real features: MSE {result['image_features_mse']:.4f}")
    if h:
        print(f"held-out: text {h['text']:.4f} (of it, text after an image, over all text bytes: "
              f"{h.get('caption', float('nan')):.4f})  image {h['image']:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0

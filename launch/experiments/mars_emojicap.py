"""MARS vs a full 4x4 grid of (vision rank, LLM rank) on EmojiCap with the vision encoder in
the loop (docs/pareto-emojicap.md, MARS section).

    python launch/experiments/mars_emojicap.py --out results/mars_emojicap
    python launch/experiments/mars_emojicap.py --steps 3 --ranks 1 2 ... --out /tmp/me  # CI's

The base is emojicap_vision_base (every parameter, the ViT's too, pretrained on EmojiOne
pixels: ``megalora pretrain --config emojicap_vision_base``); LoRA adapts both the ViT and the
LLM to Noto art (launch/configs/emojicap_tiny.yaml with the encoder). Image -> caption needs
the encoder: the image enters as pixels. The grid trains every pair of ``--ranks`` per seed;
MARS probes ``--probe-samples`` documents of the training set at ``--probe-batch``, fits its
laws and chooses within ``--budget``; its cost includes one full run of its pair. Every grid
run is scored by ``megalora.umm.emojicap_metrics`` (multiple choice and losses; nothing is
generated with an in-loop encoder). Results: results.json and results.md (the grid, MARS's
pair, fits, gate, costs), and MARS's laws.png and candidates.png under mars/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from _mars import compare, markdown
from _report import provenance, provenance_line, write_text
from _runs import evaluate_many
from mars_tiny import add_mars_arguments, mars_config
from pareto_emojicap import check_inputs, recipe_overrides

VISION = ["vision.enabled=true", "vision.num_layers=2", "vision.hidden_size=24",
          "vision.num_attention_heads=2", "vision.ffn_hidden_size=96", "vision.image_size=32",
          "vision.patch_size=8"]
"""The encoder of launch/configs/emojicap_vision_base.yaml (the base checkpoint must match)."""
SCORES = {"image→caption choice": "choice_image_to_caption",
          "caption→image choice": "choice_caption_to_image", "text CE": "text_ce",
          "image MSE": "image_mse"}


def main(argv=None) -> int:
    from megalora.umm.config import RunConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/emojicap", help="the EmojiCap build")
    p.add_argument("--base", default="out/emojicap_vision_base/base.safetensors",
                   help="the pretrained base (megalora pretrain --config emojicap_vision_base)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=0, help="score the first N test emoji")
    p.add_argument("--choices", type=int, default=4)
    add_mars_arguments(p, probe_samples=[300, 1000], probe_batch=4)
    p.add_argument("--out", default="results/mars_emojicap")
    p.add_argument("overrides", nargs="*", help="section.field=value for every run")
    p.set_defaults(probe_steps=40, every=5)
    args = p.parse_args(argv)
    check_inputs(args)
    base = RunConfig.from_yaml("emojicap_tiny", [*recipe_overrides(args), *VISION,
                                                 "pareto.mode=off"]).to_dict()
    res = compare(base, args.ranks, args.seeds, mars_config(args, args.out), args.out,
                  args.jobs)
    full = os.path.join(args.out, "full")
    scored = evaluate_many(res["runs"], full, args.jobs,
                           "megalora.umm.emojicap_metrics:score_run", data_dir=args.data,
                           limit=args.eval_limit, choices=args.choices)
    extra = {title: {pr: statistics.mean(scored[f"rv{pr[0]}_rl{pr[1]}_s{s}"][key]
                                         for s in args.seeds) for pr in res["pairs"]}
             for title, key in SCORES.items()}
    text = markdown(res, extra)
    info = provenance(" ".join(["python", *sys.argv]))
    write_text(os.path.join(args.out, "results.md"),
               f"## MARS vs the grid on EmojiCap (vision encoder in the loop)\n\n{text}\n"
               f"{provenance_line(info)}\n")
    record = {k: v for k, v in res.items() if k not in ("params", "loss", "runs")}
    record.update(provenance=info, params={f"{a},{b}": v for (a, b), v in res["params"].items()},
                  loss={f"{a},{b}": v for (a, b), v in res["loss"].items()}, scored=scored)
    write_text(os.path.join(args.out, "results.json"), json.dumps(record, indent=1, default=list))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

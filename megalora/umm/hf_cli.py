"""``megalora export-peft`` and ``megalora export-merged``: a trained adapter as a PEFT LoRA
adapter for ``LlamaForCausalLM``, or that model's weights with the adapter merged in. With
``model.emu2_checkpoint`` set, both write Emu2's names instead (``megalora.umm.emu2``; ``--layout
hf`` or ``native``). Run them under torchrun at the run config's layout (a TP = PP = 1 config
also runs without); the model is built with the adapter's own LoRA settings
(``export_lora_config``)."""

from __future__ import annotations

import logging
import os

from megalora.config import LoRAConfig
from megalora.umm.hf import export_merged, export_peft

logger = logging.getLogger("megalora")


def add_parsers(subparsers) -> None:
    """``megalora export-peft`` and ``megalora export-merged``."""
    for name, handler, text in (
            ("export-peft", _cli_export_peft, "write a trained adapter as a PEFT LoRA adapter "
                                              "for LlamaForCausalLM"),
            ("export-merged", _cli_export_merged, "write LlamaForCausalLM weights with the "
                                                  "adapter merged in")):
        p = subparsers.add_parser(name, help=f"{text} (run under torchrun at the config's "
                                             "layout; a TP=PP=1 config also runs without)")
        p.add_argument("--config", required=True, help="run config YAML")
        p.add_argument("--adapter", required=True,
                       help="adapter.safetensors, or the directory holding it (train.out_dir)")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--head", type=int, default=0,
                       help="B head of a multi-head adapter (modality routing: 0 = text)")
        p.add_argument("--layout", choices=("hf", "native"), default=None,
                       help="Emu2 names to write (with model.emu2_checkpoint): hf = Emu2's "
                            "Hugging Face model (PEFT's default), native = Emu2's own .bin "
                            "layout (the merged default)")
        p.add_argument("overrides", nargs="*", help="section.field=value")
        p.set_defaults(handler=handler)


def _cli_export_peft(args) -> int:
    return _cli_export(args, merged=False)


def _cli_export_merged(args) -> int:
    return _cli_export(args, merged=True)


def _given_lora_fields(args) -> set:
    """The ``lora`` fields the YAML or the overrides set explicitly (not defaults)."""
    import yaml

    from megalora.umm.config import resolve_config

    with open(resolve_config(args.config)) as fh:
        raw = yaml.safe_load(fh) or {}
    given = set((raw.get("lora") or {}) if isinstance(raw, dict) else {})
    return given | {item.partition("=")[0][len("lora."):] for item in args.overrides or []
                    if item.startswith("lora.")}


def export_lora_config(path: str, manifest: dict, run_lora: LoRAConfig, given) -> LoRAConfig:
    """The LoRAConfig to export ``path`` with: the one stored in the adapter (the run config may
    have been edited since training). A field the run config sets explicitly (``given``) to
    another value is an error naming it; a file without a stored config (saved through DDP by an
    older megalora) falls back to ``run_lora``, and load_adapter still checks every module's
    rank and scale against the file."""
    from megalora.adapter_file import ADAPTER_FIELDS, adapter_config, config_differences

    stored = adapter_config(path, manifest)
    if stored is None:
        logger.warning("megalora: %s stores no LoRA config (an older adapter saved through a DDP "
                       "wrapper); using the run config's lora section", path)
        return run_lora
    diffs = config_differences(stored, run_lora, [f for f in ADAPTER_FIELDS if f in given])
    if diffs:
        raise ValueError(f"adapter {path!r} was trained with other LoRA settings than the run "
                         f"config gives (adapter vs config): lora.{'; lora.'.join(diffs)}. The "
                         "export uses the adapter's own settings: drop these lora fields from the "
                         "config or set them to the adapter's values")
    return stored


def _cli_export(args, merged: bool) -> int:
    """Build the model at the config's layout, load base weights and adapter, export."""
    import megalora
    from megalora.adapter_file import read_manifest
    from megalora.umm.config import RunConfig
    from megalora.umm.session import build_model, parallel_session

    run = RunConfig.from_yaml(args.config, args.overrides)
    adapter = args.adapter
    if os.path.isdir(adapter):
        adapter = os.path.join(adapter, "adapter.safetensors")
    manifest = read_manifest(adapter)  # clear errors before any process group exists
    lora = export_lora_config(adapter, manifest, run.lora, _given_lora_fields(args))
    emu2 = bool(run.model.emu2_checkpoint)
    if not (run.model.hf_checkpoint or emu2):
        logger.warning("megalora: model.hf_checkpoint is not set: the base is the random init "
                       "(fine for a PEFT adapter, not for a merged model)")
    if args.layout and not emu2:
        raise ValueError("--layout picks Emu2's names; it needs model.emu2_checkpoint")
    with parallel_session(run) as device:
        model, _ = build_model(run, device, lora=lora)
        megalora.load_adapter(model, adapter)
        if emu2:
            from megalora.umm.emu2 import export_emu2_merged, export_emu2_peft
            if merged:
                export_emu2_merged(model, args.out, args.head, args.layout or "native")
            else:
                export_emu2_peft(model, args.out, args.head, args.layout or "hf")
        elif merged:
            export_merged(model, args.out, head=args.head)
        else:
            export_peft(model, args.out, head=args.head)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {args.out}", flush=True)
    return 0

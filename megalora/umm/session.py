"""A training session of the UMM, built one way for everything that trains, evaluates or
exports it: ``megalora train``, the HF export commands, MARS's probes and the tests.

    with parallel_session(run) as device:          # process group + Megatron's parallel state
        session = TrainingSession.build(run, device)   # model + adapters, optimizer, data
        stats = session.forward_backward(batches)  # one step's microbatches, Megatron's schedule
        session.optimizer.step(lr)

- ``parallel_session(run)``: the process group (from any launcher, ``megalora.distributed``)
  and Megatron's model-parallel state for ``run.parallel``, inside the CPU harness
  (``megalora.cpu``) on a CPU; on exit it destroys what it created and nothing else (a caller's
  own process group, e.g. a test's, stays).
- ``build_model``, ``build_optimizer``, ``build_datasets``, ``build_streams``: the parts, for
  callers that need only some (the HF export builds a model; MARS's probes a held-out stream).
- ``forward_backward`` and ``evaluate``: microbatches through Megatron's forward/backward
  schedule with the model's losses weighted per objective (``objective_weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megalora.umm.config import RunConfig

logger = logging.getLogger("megalora")


def init_parallel(run: RunConfig) -> torch.device:
    """Start (or join) the process group and Megatron's parallel state; returns the device."""
    from megatron.core import parallel_state as ps

    from megalora.distributed import init

    tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
    env = init(tp, pp, device=run.train.device)
    logger.debug("megalora: %s", env.describe())
    if not ps.is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teardown(parallel_state: bool = True, process_group: bool = True) -> None:
    """Destroy Megatron's parallel state and the default process group, where they exist."""
    from megatron.core import parallel_state as ps

    if parallel_state and ps.is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_session(run: RunConfig) -> Iterator[torch.device]:
    """``init_parallel`` for the block (inside the CPU harness on a CPU); afterwards, destroy
    what was created here."""
    from megatron.core import parallel_state as ps

    from megalora.cpu import cpu_megatron

    had_group, had_state = dist.is_initialized(), ps.is_initialized()
    try:
        device = init_parallel(run)
        harness = cpu_megatron() if device.type == "cpu" else contextlib.nullcontext()
        with harness:
            yield device
    finally:
        teardown(parallel_state=not had_state, process_group=not had_group)


def build_datasets(run: RunConfig):
    """(training set, held-out set or None): the dataset at ``data.path``, or synthetic data."""
    from megalora.umm.data import UMMDataset
    from megalora.umm.synthetic import SyntheticSpec, synthetic_samples

    m, d = run.model, run.data
    dims = dict(base_vocab=m.base_vocab, image_tokens=m.image_tokens, visual_dim=m.visual_dim)
    pixels = dict(with_pixels=run.vision.enabled, pixel_size=run.vision.image_size)
    if d.path:
        train = UMMDataset.open(d.path, **dims)
        if d.max_samples:
            train = subset(train, d.max_samples, d.seed, dims)
    else:
        train = UMMDataset.from_samples(synthetic_samples(SyntheticSpec(
            num_samples=d.synthetic_samples, seq_length=d.seq_length, seed=d.seed, **dims,
            **pixels)), **dims)
    held_out = None
    if d.eval_path:
        held_out = UMMDataset.open(d.eval_path, **dims)
    elif d.eval_samples and not d.path:
        held_out = UMMDataset.from_samples(synthetic_samples(SyntheticSpec(
            num_samples=d.eval_samples, seq_length=d.seq_length, seed=d.seed + 1_000_003,
            **dims, **pixels)), **dims)
    return train, held_out


def subset(dataset, n: int, seed: int, dims: dict):
    """``n`` samples of ``dataset`` (the first of a permutation seeded by ``seed``; so a smaller
    n is a subset of a larger one), in memory."""
    from megalora.errors import UsageError
    from megalora.umm.data import UMMDataset

    if n > len(dataset):
        raise UsageError(f"data.max_samples={n} but {dataset.path} holds {len(dataset)} "
                         f"samples: lower it, or 0 for all")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return UMMDataset.from_samples([dataset[int(i)] for i in order[:n]], **dims)


def build_streams(run: RunConfig, train, held_out):
    """(training stream, held-out stream or None) for this data-parallel rank."""
    from megatron.core import parallel_state as ps

    from megalora.umm.data import DataStream

    common = dict(micro_batch_size=run.train.micro_batch_size, seq_length=run.data.seq_length,
                  special=train.special, dp_rank=ps.get_data_parallel_rank(),
                  dp_size=ps.get_data_parallel_world_size())
    stream = DataStream(train, seed=run.data.seed, **common)
    evals = DataStream(held_out, seed=0, shuffle=False, **common) if held_out else None
    return stream, evals


def build_model(run: RunConfig, device: torch.device, lora=None):
    """(this rank's stage of the UMM with adapters, apply_lora's report). The base is the
    deterministic random init, or ``model.hf_checkpoint`` when set; ``lora``: a LoRAConfig
    other than ``run.lora`` (the HF export uses the adapter file's)."""
    import megalora
    from megalora.umm.model import build_umm

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and run.train.bf16 else torch.float32
    if run.model.emu2_checkpoint:
        from megalora.umm.emu2 import resolve_vocab
        run = resolve_vocab(run)  # model.extra_vocab: null -> the checkpoint's extra rows
    model = build_umm(run, dtype=dtype, cpu=not cuda)
    from megalora.errors import agree

    # each stage reads its own tensors, so a missing or mis-shaped one fails some ranks only:
    # agreed, so every rank stops with the message instead of waiting in apply_lora
    with agree("model checkpoint"):
        if run.model.hf_checkpoint:  # the pretrained base, before the adapters are added
            from megalora.umm.hf import import_llama
            import_llama(model, run.model.hf_checkpoint)
        if run.model.emu2_checkpoint:
            from megalora.umm.emu2 import import_emu2
            import_emu2(model, run.model.emu2_checkpoint)
        if run.model.base_checkpoint:  # a base from `megalora pretrain`
            from megalora.umm.base_checkpoint import load_base
            load_base(model, run, run.model.base_checkpoint)
    if cuda:
        model.cuda()
    report = megalora.apply_lora(model, run.lora if lora is None else lora)
    return model, report


def build_optimizer(run: RunConfig, model, device: torch.device):
    """(optimizer, the module the forward runs through) per ``train.optimizer``."""
    from megatron.core import parallel_state as ps

    from megalora.umm.optim import AdapterOptimizer, MegatronAdapterOptimizer

    t = run.train
    if t.optimizer == "megatron":
        # Megatron picks its optimizer class from the trainable parameters' dtype: bf16 ones
        # get fp32 main copies (also with an fp32 base and lora.dtype=bfloat16)
        dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        if torch.float16 in dtypes:
            raise ValueError("lora.dtype=float16 needs loss scaling, which train.optimizer="
                             "megatron is not set up for here: use lora.dtype=bfloat16 or "
                             "train.optimizer=torch")
        if torch.bfloat16 in dtypes and device.type != "cuda":
            raise ValueError("megatron-core's mixed-precision optimizer takes CUDA tensors only: "
                             "on CPU use train.optimizer=torch with bf16 adapters (lora.dtype)")
        opt = MegatronAdapterOptimizer(model, model.config, lr=t.lr, weight_decay=t.weight_decay,
                                       clip_grad=t.clip_grad, bf16=torch.bfloat16 in dtypes)
        return opt, opt.module
    opt = AdapterOptimizer(model, lr=t.lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                           dp_group=ps.get_data_parallel_group(),
                           mp_group=ps.get_model_parallel_group())
    return opt, model


def _forward_step_func(run: RunConfig, weights: Dict[str, float]):
    import megalora
    from megalora.umm.batch import causal_mask

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if run.lora.routing == "modality":
            megalora.set_head_ids(model, batch.modality)
        mask = causal_mask(batch.tokens.shape[1]).to(batch.tokens.device)
        out = model(batch, mask)

        def loss_func(losses: Dict[str, torch.Tensor]):
            loss = sum(w * losses[name] for name, w in weights.items())
            # clones: the schedule divides the returned loss in place by the microbatch count
            report = {k: v.detach().clone() for k, v in losses.items()}
            report["loss"] = loss.detach().clone()
            return loss, report

        return out, loss_func

    return forward_step


def forward_backward(runner, run: RunConfig, batches, forward_only: bool = False,
                     objective_weights: Optional[Dict[str, float]] = None) -> List[dict]:
    """``batches`` through Megatron's forward/backward schedule on ``runner`` (the model, or
    its DDP wrapper); the loss is the model's losses weighted by ``objective_weights``
    (objective name -> weight; default the model's own, ``umm.model.objective_weights``).
    Returns the schedule's per-microbatch loss reports (empty off the last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megalora.umm.model import objective_weights as model_weights

    weights = objective_weights or model_weights(run)
    return get_forward_backward_func()(
        forward_step_func=_forward_step_func(run, weights), data_iterator=iter(batches),
        model=runner, num_microbatches=len(batches), seq_length=run.data.seq_length,
        micro_batch_size=run.train.micro_batch_size, forward_only=forward_only)


def global_scalars(stats: Optional[dict], device) -> dict:
    """Last-stage losses to every rank, averaged over data parallel."""
    from megatron.core import parallel_state as ps

    # means first (averaged over data parallel), then the token counts (summed)
    keys = ("text", "image", "loss", "lm", "caption", "text_tokens", "image_tokens")
    t = torch.tensor([float(stats.get(k, 0.0)) if stats else 0.0 for k in keys],
                     dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        t[:5] /= ps.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


def evaluate(model, run: RunConfig, stream, device, max_batches: int = 8) -> dict:
    """Held-out text and image losses (forward only), the same on every rank."""
    from megalora.umm.optim import loss_scalars

    model.eval()
    results = []
    steps = min(max_batches, max(1, stream.steps_per_epoch))
    with torch.no_grad():
        for _ in range(steps):
            results += forward_backward(model, run, [stream.next_batch().to(device)],
                                        forward_only=True)
    model.train()
    return global_scalars(loss_scalars(results), device)


@dataclasses.dataclass
class TrainingSession:
    """What a training run holds; what trainer hooks (``megalora.umm.hooks``) are given."""

    run: RunConfig
    device: torch.device
    model: torch.nn.Module
    """This rank's stage of the UMM with its adapters (unwrapped)."""
    runner: torch.nn.Module
    """The module the forward runs through (Megatron's DDP wrapper, or the model)."""
    optimizer: object
    """``AdapterOptimizer`` or ``MegatronAdapterOptimizer``: zero_grad(), reduce(), step(lr),
    state_dict(), load_state_dict()."""
    stream: object
    """The training ``DataStream`` of this data-parallel rank."""
    evals: Optional[object] = None
    """The held-out ``DataStream``, or None."""
    lora_report: Optional[object] = None
    """``apply_lora``'s report."""
    log: Optional[object] = None
    """The rank-0 progress log (``umm.progress.ProgressLog``): message(), scalars(); set by
    the trainer before the first step."""

    @classmethod
    def build(cls, run: RunConfig, device: torch.device) -> "TrainingSession":
        """Model with adapters, optimizer, data streams (inside ``parallel_session``). Data
        problems on any rank stop every rank with one message (``megalora.errors.agree``)."""
        from megalora.errors import agree

        model, report = build_model(run, device)
        optimizer, runner = build_optimizer(run, model, device)
        with agree("data"):  # a dataset missing or broken on one node stops every rank with it
            stream, evals = build_streams(run, *build_datasets(run))
        return cls(run, device, model, runner, optimizer, stream, evals, report)

    @property
    def objective_weights(self) -> Dict[str, float]:
        """The model's weight of each objective in its summed loss."""
        from megalora.umm.model import objective_weights
        return objective_weights(self.run)

    def forward_backward(self, batches, objective_weights: Optional[Dict[str, float]] = None
                         ) -> Optional[dict]:
        """Forward + backward of ``batches`` (one step's microbatches) into the gradients
        (not reduced); returns the token-weighted loss statistics (None off the last stage)."""
        from megalora.umm.optim import loss_scalars

        return loss_scalars(forward_backward(self.runner, self.run, batches,
                                             objective_weights=objective_weights))

"""Per-GPU memory, communication and step time of a run at a parallel layout; the layout search.

The ``megalora plan`` command that prints them is ``megalora.umm.plan_cli``.

Everything is per GPU, for one pipeline stage of a (TP, PP, DP) layout, in bytes.

**Parameters, gradients, optimizer states** are counted exactly, tensor by tensor, as the UMM
built by ``megalora.umm.model`` allocates them (``tests/umm/test_umm_plan.py`` compares with built
models): frozen base weights at the base dtype (bf16 on GPU); LoRA factors at the adapter
dtype (LoRAConfig.dtype, default the base dtype) sharded by the comm-optimal split of
``megalora.sharding``; gradients as Megatron's DDP keeps them (one fp32 main-grad buffer,
``grad_reduce_in_fp32``) or, with ``train.optimizer: torch``, ``.grad`` at the adapter dtype
plus an fp32 copy for the masters; optimizer: Adam's two fp32 moments (8 B/param) plus an fp32
master copy when adapters are not fp32 (12 B/param).

**Activations** (what autograd keeps for the backward of one microbatch of b sequences of s
tokens; e = bytes per activation element, t = TP, t_sp = t with sequence parallelism else 1).
Per transformer layer, following Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", §4.1) adapted to the block megalora builds (RMSNorm, fused SwiGLU,
unfused RoPE, no dropout):

    norm inputs + norm outputs (inputs of QKV and FC1)   4 s b h / t_sp
    QKV output (V, a view of it, keeps it all alive)     s b (n_q + 2 n_kv) d_head / t
    Q, K after RoPE                                      s b (n_q + n_kv) d_head / t
    attention output (the input of the out-projection)   s b h / t
    attention: flash (TE/cuDNN) softmax statistics       4 bytes x n_q s b / t
               unfused (CPU, no TE): probabilities       n_q s^2 b / t
    fused SwiGLU: FC1 output (gate, up) + FC2 input      3 s b f / t
    LoRA: the rank-r activation of each adapted module   s b (r + K with a router); its input
                                                         is the base's; dropout masks are
                                                         regenerated, not kept

With full recompute (``parallel.recompute``) a layer keeps only its input, s b h / t_sp, and
one layer's activations are live again during its backward. The 1F1B schedule keeps
min(PP - stage, microbatches) microbatches in flight on a stage, so stage 0 is the worst. The
last stage also holds the fp32 logits of one microbatch that the vocab-parallel cross-entropy
keeps, 4 s b V / t bytes. A fixed overhead (CUDA context, NCCL buffers, workspace) and a
fraction of headroom for allocator fragmentation are reserved (``Hardware``).
Measured against the tensors autograd really saves (CPU, unfused attention, tiny UMM at TP=1
and TP=2+SP; ``tests/umm/test_umm_plan.py``): the model is 2-3 % below (it leaves out RoPE tables,
norm statistics and masks).

**The in-loop encoder** (``vision.enabled``; stage 0) keeps activations only when one of its
modules is adapted (otherwise nothing below the decoder needs a gradient). Per image, per layer,
with s_v = patches + 1 tokens, width d, MLP f, h_v heads (EVA's block, no SP):
s_v (4 d + 4 d / t + 2 f / t) + 4 bytes x h_v s_v / t (SDPA's softmax statistics) + the
LoRA ranks, for ``micro_batch_size x (seq_length // (image_tokens + 2))`` images, the most a
microbatch can hold. Measured: 3.6 % below what autograd saves (tiny EVA in the loop with LoRA,
TP=1). Its FLOPs (``encoder_flops``) are added to the step time.

**Communication** per GPU per optimizer step (bytes put on the wire by ring collectives:
all-reduce 2(n-1)/n of the payload, all-gather and reduce-scatter (n-1)/n):
TP: per layer and microbatch 2 all-reduces (or all-gather + reduce-scatter with SP, the same
bytes) of s b h in the forward, 2 in the backward, 2 more with recompute; plus the embedding's
all-reduce; LoRA adds one rank-r collective per adapted module in each direction.
PP: one s b h / t_sp activation forward and one gradient backward per microbatch and boundary.
DP: one all-reduce of the fp32 adapter gradients (LoRA keeps it tiny).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from megalora.umm.config import RunConfig
from megalora.umm.tokens import padded_vocab_size

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """The GPUs and network a plan is made for (defaults: H100 SXM 80 GB nodes, 8 per node)."""

    gpu_memory_gb: float = 80.0
    """Memory per GPU (GB = 1e9 bytes)."""
    gpus_per_node: int = 8
    """GPUs sharing NVLink; tensor parallelism stays inside a node."""
    overhead_gb: float = 3.0
    """CUDA context, NCCL buffers and cuBLAS workspace per GPU."""
    headroom: float = 0.10
    """Fraction of the GPU kept free for allocator fragmentation."""
    peak_tflops: float = 989.0
    """Dense bf16 peak (H100 SXM), for the step-time estimate that orders layouts."""
    mfu: float = 0.40
    """Achievable fraction of peak for the matmuls."""
    nvlink_gb_s: float = 450.0
    """Per-GPU NVLink bandwidth (collectives inside a node)."""
    network_gb_s: float = 50.0
    """Per-GPU inter-node bandwidth (400 Gb/s InfiniBand)."""

    def __post_init__(self) -> None:
        for name in ("gpu_memory_gb", "peak_tflops", "mfu", "nvlink_gb_s", "network_gb_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"plan: {name} must be > 0, got {getattr(self, name)}")
        if self.gpus_per_node < 1 or self.overhead_gb < 0 or not 0 <= self.headroom < 1:
            raise ValueError("plan: gpus_per_node >= 1, overhead_gb >= 0, 0 <= headroom < 1")
        if self.usable_bytes <= 0:
            raise ValueError(f"plan: {self.gpu_memory_gb} GB per GPU leaves nothing after "
                             f"{self.overhead_gb} GB overhead and {self.headroom:.0%} headroom")

    @property
    def usable_bytes(self) -> float:
        return (self.gpu_memory_gb * (1.0 - self.headroom) - self.overhead_gb) * GB


@dataclass(frozen=True)
class ParallelLayout:
    """A parallel layout of the run (TP, PP, DP sizes; SP) and how a step runs on it (recompute,
    microbatches): one candidate of ``megalora plan``."""

    tp: int
    pp: int
    dp: int
    sp: bool
    recompute: bool
    microbatches: int
    """Microbatches per step and data-parallel rank (global batch / (micro-batch x DP))."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return (f"TP={self.tp}{'+SP' if self.sp else ''} PP={self.pp} DP={self.dp} "
                f"m={self.microbatches}{' recompute' if self.recompute else ''}")


@dataclass
class StageCounts:
    """Element counts of one pipeline stage on one TP rank."""

    frozen: int = 0
    lora: int = 0
    lora_tensors: int = 0
    lora_rank_sum: int = 0
    """Sum over adapted modules of r (+K with a router): the activation each keeps per token."""
    lora_modules: int = 0
    layers: int = 0
    vision_frozen: int = 0
    """Of ``frozen``: the in-loop encoder's (first stage)."""
    vision_rank_sum: int = 0
    """Of ``lora_rank_sum``: the in-loop encoder's adapted modules (0: it keeps nothing for
    the backward, since nothing below the decoder needs a gradient)."""


# ------------------------------------------------------------------ parameter counts
def _linears(run: RunConfig, vision: bool) -> List[Tuple[str, str, int, int, int]]:
    """(canonical suffix, kind, in, out, out_stride) of the adaptable linears of one layer."""
    if vision:
        v = run.vision
        qkv_stride = 3 if v.kind == "eva" else 1  # EVA: each rank's rows are [q_r; k_r; v_r]
        return [("self_attention.linear_qkv", "column", v.hidden_size, 3 * v.hidden_size,
                 qkv_stride),
                ("self_attention.linear_proj", "row", v.hidden_size, v.hidden_size, 1),
                ("mlp.linear_fc1", "column", v.hidden_size, v.ffn_hidden_size, 1),
                ("mlp.linear_fc2", "row", v.ffn_hidden_size, v.hidden_size, 1)]
    m = run.model
    d_head = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * groups) * d_head
    return [("self_attention.linear_qkv", "column", m.hidden_size, qkv, 1),
            ("self_attention.linear_proj", "row", m.num_attention_heads * d_head,
             m.hidden_size, 1),
            ("mlp.linear_fc1", "column", m.hidden_size, 2 * m.ffn_hidden_size, 2),
            ("mlp.linear_fc2", "row", m.ffn_hidden_size, m.hidden_size, 1)]


def _lora_module(run: RunConfig, path: str, kind: str, n_in: int, n_out: int, stride: int,
                 tp: int, counts: StageCounts) -> None:
    """Add the adapter of the module at canonical ``path`` (if targeted) to ``counts``."""
    from megalora.base_layers import BaseLinearSplit
    from megalora.sharding import factor_shardings, global_shapes

    cfg = run.lora
    if not cfg.selects(path):
        return
    s = cfg.settings_for(path)
    base = BaseLinearSplit(kind, "mcore", n_in, n_out, None, tp, 0, False, stride)
    shapes = global_shapes(base, s.rank, s.num_heads)
    shards = factor_shardings(base)
    names = ["lora_A", "lora_B"] + (["lora_router"] if s.routing == "router" else [])
    for name in names:
        numel = 1
        for size in shapes[name]:
            numel *= size
        split = shards[name].dim is not None
        if split and shapes[name][shards[name].dim] % (tp * shards[name].stride):
            raise ValueError(f"{path}.{name}: dim {shards[name].dim} of {shapes[name]} does not "
                             f"split over TP={tp}")
        counts.lora += numel // tp if split else numel
        counts.lora_tensors += 1
    counts.lora_rank_sum += s.rank + (s.num_heads if s.routing == "router" else 0)
    counts.lora_modules += 1


def _layer_frozen(n_in_out: List[Tuple[str, str, int, int, int]], tp: int, norm: int,
                  bias: bool) -> int:
    """Frozen elements of one layer on one TP rank: its linears (column split on out, row on
    in; a column bias is split, a row bias replicated) and its two norms (``norm`` each)."""
    total = 2 * norm
    for _, kind, n_in, n_out, _ in n_in_out:
        total += n_in * n_out // tp
        if bias:
            total += n_out // tp if kind == "column" else n_out
    return total


def _vision_counts(run: RunConfig, tp: int, counts: StageCounts) -> None:
    v = run.vision
    patches = (v.image_size // v.patch_size) ** 2
    eva = v.kind == "eva"
    # class token, position embeddings (patches + cls), the patch conv (EVA: with a bias),
    # CLIP's ln_pre (weight + bias)
    counts.frozen += v.hidden_size * (1 + patches + 1 + 3 * v.patch_size ** 2 +
                                      (1 if eva else 2))
    linears = _linears(run, True)
    for i in range(v.num_layers):
        counts.frozen += _layer_frozen(linears, tp, 2 * v.hidden_size, bias=True)
        if eva:  # q_bias and v_bias (split like q and v) instead of a full qkv bias
            counts.frozen -= v.hidden_size // tp
        for suffix, kind, n_in, n_out, stride in linears:
            _lora_module(run, f"vision.decoder.layers.{i}.{suffix}", kind, n_in, n_out, stride,
                         tp, counts)


def stage_counts(run: RunConfig, tp: int, pp: int, stage: int) -> StageCounts:
    """Exact element counts of pipeline ``stage`` on one TP rank of a TP x PP layout."""
    m = run.model
    if m.num_layers % pp or not 0 <= stage < pp:
        raise ValueError(f"stage {stage} of PP={pp} for model.num_layers={m.num_layers}")
    counts = StageCounts()
    vocab = padded_vocab_size(m.vocab_rows())
    per_stage = m.num_layers // pp
    linears = _linears(run, False)
    for i in range(stage * per_stage, (stage + 1) * per_stage):
        counts.frozen += _layer_frozen(linears, tp, m.hidden_size, bias=False)
        for suffix, kind, n_in, n_out, stride in linears:
            _lora_module(run, f"llm.decoder.layers.{i}.{suffix}", kind, n_in, n_out, stride, tp,
                         counts)
    counts.layers = per_stage
    if stage == 0:  # word embeddings (vocab-parallel), project_up, the in-loop encoder
        counts.frozen += vocab * m.hidden_size // tp + m.visual_dim * m.hidden_size
        if run.vision.enabled:
            frozen, ranks = counts.frozen, counts.lora_rank_sum
            _vision_counts(run, tp, counts)
            counts.vision_frozen = counts.frozen - frozen
            counts.vision_rank_sum = counts.lora_rank_sum - ranks
    if stage == pp - 1:  # final norm, output layer (column-parallel), project_down
        counts.frozen += m.hidden_size + vocab * m.hidden_size // tp + \
            m.hidden_size * m.visual_dim
        _lora_module(run, "llm.output_layer", "column", m.hidden_size, vocab, 1, tp, counts)
    return counts


# ------------------------------------------------------------------ memory
@dataclass
class Memory:
    """Bytes per GPU of one stage."""

    weights: float
    lora: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.grads + self.optimizer + self.activations + \
            self.logits


def dtype_bytes(run: RunConfig, cuda: bool = True) -> Tuple[int, int]:
    """(base, adapter) bytes per element: bf16 on GPU when train.bf16, else fp32."""
    base = 2 if cuda and run.train.bf16 else 4
    adapter = {None: base, "float32": 4, "bfloat16": 2, "float16": 2}[run.lora.dtype]
    return base, adapter


def state_bytes(run: RunConfig, counts: StageCounts, cuda: bool = True) -> Dict[str, int]:
    """Exact bytes of weights, adapters, gradients and optimizer states of one stage."""
    base, adapter = dtype_bytes(run, cuda)
    master = 0 if adapter == 4 else 4
    if run.train.optimizer == "megatron":
        grads = 4 * counts.lora  # fp32 main-grad buffer (grad_reduce_in_fp32)
    else:
        grads = (adapter + master) * counts.lora  # .grad, and the fp32 masters' .grad
    return {"weights": base * counts.frozen, "lora": adapter * counts.lora, "grads": grads,
            "optimizer": (8 + master) * counts.lora}


def encoder_images(run: RunConfig) -> int:
    """Images in one microbatch at most: every sequence packed with [IMG] N x <image> [/IMG]."""
    return run.train.micro_batch_size * (run.data.seq_length // (run.model.image_tokens + 2))


def encoder_activation_bytes(run: RunConfig, t: int, counts: StageCounts, images: int,
                             cuda: bool = True) -> float:
    """What the in-loop encoder keeps for the backward of one microbatch (module doc); 0
    unless one of its modules is adapted. EVA's attention is torch's SDPA, a fused kernel on
    CPU and GPU alike: it keeps softmax statistics, not probabilities."""
    v = run.vision
    if not v.enabled or not counts.vision_rank_sum:
        return 0.0
    e = dtype_bytes(run, cuda)[0]
    d, f, heads = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads
    sv = (v.image_size // v.patch_size) ** 2 + 1
    attn = (4 / e) * heads * sv / t
    lora = sv * counts.vision_rank_sum / v.num_layers
    layer = (sv * (4 * d + 4 * d / t + 2 * f / t) + attn + lora) * e
    return images * v.num_layers * layer


def activation_bytes(run: RunConfig, layout: ParallelLayout, counts: StageCounts, stage: int,
                     cuda: bool = True, flash: bool = True, images: Optional[int] = None
                     ) -> Tuple[float, float]:
    """(activations kept for backward on ``stage``, logits of the last stage); see module doc.
    ``images``: per microbatch, for the in-loop encoder (default: ``encoder_images``)."""
    m, t = run.model, layout.tp
    e = dtype_bytes(run, cuda)[0]
    s, b = run.data.seq_length, run.train.micro_batch_size
    h, f = m.hidden_size, m.ffn_hidden_size
    n_q = m.num_attention_heads
    n_kv = m.num_query_groups or n_q
    d_head = h // n_q
    t_sp = t if layout.sp else 1
    tokens = s * b
    ranks = counts.lora_rank_sum - counts.vision_rank_sum
    lora = tokens * ranks / max(counts.layers, 1)  # averaged over the layers
    attn = (4 / e) * n_q * tokens / t if flash else n_q * s * s * b / t
    layer = (4 * tokens * h / t_sp + tokens * (2 * n_q + 3 * n_kv) * d_head / t
             + tokens * h / t + attn + 3 * tokens * f / t + lora) * e
    in_flight = min(layout.pp - stage, layout.microbatches)
    if layout.recompute:
        kept = counts.layers * tokens * h / t_sp * e * in_flight + layer
    else:
        kept = counts.layers * layer * in_flight
    if stage == 0:  # the in-loop encoder (never recomputed)
        images = encoder_images(run) if images is None else images
        kept += encoder_activation_bytes(run, t, counts, images, cuda) * in_flight
    vocab = padded_vocab_size(m.vocab_rows())
    logits = 4.0 * tokens * vocab / t if stage == layout.pp - 1 else 0.0
    return kept, logits


def stage_memory(run: RunConfig, layout: ParallelLayout, stage: int, cuda: bool = True,
                 flash: bool = True) -> Memory:
    counts = stage_counts(run, layout.tp, layout.pp, stage)
    states = state_bytes(run, counts, cuda)
    kept, logits = activation_bytes(run, layout, counts, stage, cuda, flash)
    return Memory(activations=kept, logits=logits, **states)


# ------------------------------------------------------------------ communication and time
def _ring(n: int, payload: float, kind: str = "all_reduce") -> float:
    if n <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (n - 1) / n * payload


def step_comm(run: RunConfig, layout: ParallelLayout, cuda: bool = True) -> Dict[str, float]:
    """Bytes each GPU sends per optimizer step, by parallel dimension (worst stage)."""
    m = run.model
    e = dtype_bytes(run, cuda)[0]
    tokens = run.data.seq_length * run.train.micro_batch_size
    mb = layout.microbatches
    counts = stage_counts(run, layout.tp, layout.pp, 0)
    per_layer = (6 if layout.recompute else 4) * _ring(layout.tp, tokens * m.hidden_size * e)
    lora = 2 * counts.lora_modules * _ring(layout.tp, tokens * run.lora.rank * e)
    embed = _ring(layout.tp, tokens * m.hidden_size * e)
    tp = mb * (counts.layers * per_layer + lora + embed)
    t_sp = layout.tp if layout.sp else 1
    pp = 0.0 if layout.pp == 1 else 2 * mb * tokens * m.hidden_size / t_sp * e
    dp = _ring(layout.dp, 4 * max(stage_counts(run, layout.tp, layout.pp, s).lora
                                  for s in range(layout.pp)))
    return {"tp": tp, "pp": pp, "dp": dp}


def step_time(run: RunConfig, layout: ParallelLayout, hw: Hardware, cuda: bool = True) -> float:
    """Seconds per optimizer step: matmul FLOPs of a frozen-base LoRA step (forward 2N,
    input-gradient backward 2N, no base weight gradients; attention 4sh per token and layer
    forward, twice that backward; recompute repeats the forward) at ``mfu`` of peak, stretched
    by the pipeline bubble (m + PP - 1) / m, plus exposed communication."""
    m = run.model
    s = run.data.seq_length
    # matmul weights: everything but the embedding table (a lookup, not a matmul)
    whole = stage_counts(run, 1, 1, 0)
    n_dense = whole.frozen - whole.vision_frozen - \
        padded_vocab_size(m.vocab_rows()) * m.hidden_size
    attn = 4 * s * m.hidden_size * m.num_layers
    per_token = 4 * n_dense + 3 * attn + (2 * n_dense + attn if layout.recompute else 0)
    tokens = s * run.train.micro_batch_size * layout.microbatches
    flops = tokens * per_token + encoder_flops(run, whole) * layout.microbatches
    compute = flops / (layout.tp * layout.pp * hw.peak_tflops * 1e12 * hw.mfu)
    compute *= (layout.microbatches + layout.pp - 1) / layout.microbatches
    comm = step_comm(run, layout, cuda)
    in_node = layout.tp * layout.pp <= hw.gpus_per_node
    tp_bw = hw.nvlink_gb_s * GB
    pp_bw = (hw.nvlink_gb_s if in_node else hw.network_gb_s) * GB
    dp_bw = (hw.nvlink_gb_s if layout.gpus <= hw.gpus_per_node else hw.network_gb_s) * GB
    return compute + comm["tp"] / tp_bw + comm["pp"] / pp_bw + comm["dp"] / dp_bw


def encoder_flops(run: RunConfig, whole: StageCounts) -> float:
    """Matmul FLOPs of the in-loop encoder per microbatch (``encoder_images`` images, each
    2 x params x tokens + attention 4 s_v^2 d per layer forward). Adapted, the backward runs
    through it too: the frozen matmuls' input gradients once more (x2), attention twice more
    (x3), as for the decoder. It runs on stage 0's TP group only: the PP split of the step
    time counts it as if spread over the stages (optimistic for PP > 1)."""
    v = run.vision
    if not v.enabled:
        return 0.0
    sv = (v.image_size // v.patch_size) ** 2 + 1
    adapted = bool(whole.vision_rank_sum)
    dense = 2 * whole.vision_frozen * sv * (2 if adapted else 1)
    attn = 4 * sv * sv * v.hidden_size * v.num_layers * (3 if adapted else 1)
    return encoder_images(run) * (dense + attn)


@dataclass
class Estimate:
    layout: ParallelLayout
    memory: List[Memory]
    """Per stage."""
    comm: Dict[str, float]
    seconds: float
    worst_stage: int = field(init=False)

    def __post_init__(self) -> None:
        self.worst_stage = max(range(len(self.memory)), key=lambda i: self.memory[i].total)

    @property
    def peak(self) -> float:
        return self.memory[self.worst_stage].total


def estimate(run: RunConfig, layout: ParallelLayout, hw: Hardware, cuda: bool = True,
             flash: bool = True) -> Estimate:
    mem = [stage_memory(run, layout, i, cuda, flash) for i in range(layout.pp)]
    return Estimate(layout, mem, step_comm(run, layout, cuda), step_time(run, layout, hw, cuda))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check(run: RunConfig, tp: int, pp: int, dp: int, global_batch: int,
           hw: Hardware) -> Tuple[Optional[int], Optional[str]]:
    """(microbatches, None) when the layout is valid, else (None, the reason)."""
    if tp > hw.gpus_per_node:
        return None, f"TP={tp} spans nodes ({hw.gpus_per_node} GPUs per node): TP traffic " \
                     "needs NVLink"
    try:
        replace(run, parallel=replace(
            run.parallel, tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=tp > 1))
        for stage in range(pp):
            stage_counts(run, tp, pp, stage)
    except ValueError as exc:
        return None, str(exc)
    mbs = run.train.micro_batch_size
    if global_batch % (mbs * dp):
        return None, f"global batch {global_batch} is not a multiple of micro-batch {mbs} x " \
                     f"DP={dp}"
    return global_batch // (mbs * dp), None


def search(run: RunConfig, gpus: int, hw: Hardware, global_batch: int, cuda: bool = True,
           flash: bool = True) -> Tuple[List[Estimate], List[Tuple[str, str]]]:
    """(layouts that fit, fastest estimated step first; [(layout, why not)] for the rest).
    A layout runs without recompute when that fits, else with full recompute."""
    fits, rejected = [], []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            name = f"TP={tp} PP={pp} DP={dp}"
            microbatches, reason = _check(run, tp, pp, dp, global_batch, hw)
            if reason:
                rejected.append((name, reason))
                continue
            best = None
            for recompute in (False, True):
                layout = ParallelLayout(tp, pp, dp, tp > 1, recompute, microbatches)
                best = estimate(run, layout, hw, cuda, flash)
                if best.peak <= hw.usable_bytes:
                    break
            if best.peak <= hw.usable_bytes:
                fits.append(best)
            else:
                rejected.append((name, f"needs {best.peak / GB:.1f} GB per GPU (stage "
                                       f"{best.worst_stage}) even with full recompute; "
                                       f"{hw.usable_bytes / GB:.1f} GB usable"))
    fits.sort(key=lambda e: (e.seconds, e.peak))
    return fits, rejected


def smallest_gpu_count(run: RunConfig, hw: Hardware, global_batch: int, cuda: bool = True,
                       flash: bool = True, limit: int = 4096) -> int:
    """The fewest GPUs (1..gpus_per_node, then whole nodes) with a layout that fits."""
    counts = list(range(1, hw.gpus_per_node + 1)) + \
        list(range(2 * hw.gpus_per_node, limit + 1, hw.gpus_per_node))
    for n in counts:
        if search(run, n, hw, global_batch, cuda, flash)[0]:
            return n
    raise ValueError(f"no layout fits on up to {limit} GPUs of {hw.gpu_memory_gb} GB: lower "
                     "data.seq_length or train.micro_batch_size, or use larger GPUs")

"""A tiny Emu2 in plain PyTorch + transformers, written for the tests from Emu2's public code
(GitHub baaivision/Emu, Emu2/emu/emu.py): the same module tree and tensor names as Emu2, its
caption path (``<image>`` embeddings replaced by project_up of the slot features, logits from
``lm_head``) and its ``generate_image`` regression (the final-normed hidden state at ``[IMG]``
and each slot, through project_down, fed back through project_up).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# tiny sizes: text vocabulary 64, Emu2's 4 UMM specials at 64..67, then 6 "grounding" rows
VOCAB, EXTRA, HIDDEN, FFN, HEADS, SLOTS, VISUAL = 64, 6, 64, 172, 4, 4, 16
ROWS = VOCAB + 4 + EXTRA
PAD, IMG, IMG_END, SLOT = VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3
EVA = dict(image_size=8, patch_size=2, width=VISUAL, layers=2, heads=2, mlp=24)


class Attention(nn.Module):
    """Emu2's eva_vit.Attention (subln=False, no rope): F.linear on qkv.weight with the bias
    cat(q_bias, 0, v_bias); the qkv module itself is never called."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """postnorm=True, no layer scale: x + norm1(attn(x)), then x + norm2(mlp(x))."""

    def __init__(self, d, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn, self.mlp = Attention(d, heads), Mlp(d, hidden)

    def forward(self, x):
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, d, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)


class EVAVisionTransformer(nn.Module):
    """Emu2's encoder: patch conv with bias, CLS, absolute positions, blocks, no final norm."""

    def __init__(self, image_size, patch_size, width, layers, heads, mlp):
        super().__init__()
        self.patch_embed = PatchEmbed(width, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(layers))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def _lm(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=layers, num_attention_heads=HEADS, rms_norm_eps=1e-6,
                      max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


class TinyEmu2(nn.Module):
    """``layout="native"``: visual, decoder.lm, project_up, project_down at the top (Emu2's
    EmuModel); ``"hf"``: visual and decoder under ``model.``, the connectors at the top."""

    def __init__(self, layers: int, layout: str = "native", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        core = self if layout == "native" else nn.Module()
        core.visual = EVAVisionTransformer(**EVA)
        core.decoder = nn.Module()
        core.decoder.lm = _lm(layers)
        if layout == "hf":
            self.model = core
        self.project_up = nn.Linear(VISUAL, HIDDEN, bias=False)
        self.project_down = nn.Linear(HIDDEN, VISUAL, bias=False)
        with torch.no_grad():  # norms away from 1 so a misplaced norm shows
            for name, p in self.named_parameters():
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else
                        0.1 * torch.randn_like(p))

    @property
    def core(self):
        return self if hasattr(self, "decoder") else self.model

    @property
    def lm(self):
        return self.core.decoder.lm

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Emu2's encode_image for pixels in [0, 1] (its transform normalises first): drop CLS,
        grid, avg_pool2d with stride grid // sqrt(slots) -> [B * SLOTS, visual] row-major."""
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        x = self.core.visual((pixels - mean) / std)[:, 1:]
        b, n, c = x.shape
        grid = math.isqrt(n)
        x = x.permute(0, 2, 1).reshape(b, c, grid, grid)
        stride = grid // math.isqrt(SLOTS)
        x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
        return x.view(b, c, -1).permute(0, 2, 1).reshape(-1, c)

    def hidden(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [b, s, h]; ``features`` [n, visual] fill the ``<image>``
        positions in row-major order (Emu2: text_embeds[ids == <image>] = project_up(...))."""
        emb = self.lm.model.embed_tokens(tokens)
        emb = emb.clone()
        emb[tokens == SLOT] = self.project_up(features).to(emb.dtype)
        return self.lm.model(inputs_embeds=emb).last_hidden_state

    def caption_logits(self, tokens, features):
        return self.lm.lm_head(self.hidden(tokens, features))

    def regressed(self, tokens, features):
        """project_down at the positions whose next token is ``<image>``, row-major."""
        h = self.hidden(tokens, features)
        target = torch.zeros_like(tokens, dtype=torch.bool)
        target[:, :-1] = tokens[:, 1:] == SLOT
        return self.project_down(h[target])

    def generate_image(self, prefix: torch.Tensor) -> torch.Tensor:
        """Emu2's ``generate_image`` loop for one sequence: ``prefix`` [p] ends with ``[IMG]``;
        returns the SLOTS regressed features [SLOTS, visual]."""
        emb = self.lm.model.embed_tokens(prefix[None])
        preds = []
        for _ in range(SLOTS):
            h = self.lm.model(inputs_embeds=emb).last_hidden_state[:, -1]
            pred = self.project_down(h)
            preds.append(pred[0])
            emb = torch.cat([emb, self.project_up(pred)[:, None]], dim=1)
        return torch.stack(preds)


def sequences(seed: int = 7):
    """Two sequences of 16: 5 text ids, [IMG], 4 x <image>, [/IMG], 5 text ids."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB, (2, 10), generator=g)
    image = torch.tensor([IMG] + [SLOT] * SLOTS + [IMG_END]).expand(2, -1)
    return torch.cat([text[:, :5], image, text[:, 5:]], dim=1)


def save_native(model: TinyEmu2, path: str, prefix: str = "", junk: bool = False) -> str:
    """Emu2's native file: a torch .bin, or .safetensors (Emu2-Gen: prefix multimodal_encoder.
    and the diffusion parts' keys, which are not ours)."""
    state = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    if junk:
        state["unet.conv_in.weight"] = torch.ones(2, 2)
        state["vae.decoder.conv_out.bias"] = torch.ones(3)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def save_hf(model: TinyEmu2, folder, shards: int = 3) -> str:
    """The Hugging Face layout (model must be built with layout="hf"): safetensors shards
    with model.safetensors.index.json."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"architectures": ["EmuForCausalLM"]}, fh)
    return str(folder)

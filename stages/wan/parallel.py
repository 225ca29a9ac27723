"""Sequence parallelism (DeepSpeed-Ulysses, as xDiT runs it) for the Wan DiT.

A denoise worker may span ``k`` processes joined by ``torch.distributed``
(nccl on GPU, gloo on CPU). Each rank runs the same ``compute.denoise`` loop on
the same inputs; only the transformer's forward is split: every rank computes
``S/k`` of the ``S`` video tokens, and the ranks exchange data in self-attention
(two ``all_to_all``) and once at the end (one ``all_gather``). Every rank ends a
forward with the whole, bitwise identical output, so the scheduler steps (and so
the latents and any denoise state) are identical on every rank; rank 0's are
the ones the caller ships.

Invariants (``S``: tokens after patchify, ``H``: attention heads, ``k``: ranks,
``r``: this rank; ``k`` divides ``H`` and ``S``, checked before any collective):

* Token order is the model's own (``patch_embedding`` output ``flatten(2)``:
  frame-major, then row, then column). Rank ``r`` holds the contiguous tokens
  ``[r*S/k, (r+1)*S/k)``. No padding: a ``k`` that does not divide ``S`` is
  refused (``ValueError``), the job must choose another resolution or ``k``.
* Sharded along the tokens (dim 1), from the input of ``blocks[0]`` to the output
  of ``proj_out``: the hidden states, the rotary ``cos``/``sin`` (``rope``'s
  ``[1, S, 1, D]`` outputs, sliced so each token keeps its global position),
  and, for a per-token timestep (``timestep`` of shape ``[B, S]``, Wan2.2 TI2V),
  the timestep and the modulation derived from it.
* Replicated on every rank: the weights, the input latents, the text and image
  context (cross-attention queries attend to all of it, so it needs no
  exchange), a per-sample timestep (``[B]``) and its modulation, and the
  forward's output.
* Inside each self-attention (``blocks[i].attn1``), between the two
  ``all_to_all``: query, key, value and the attention output hold all ``S``
  tokens of heads ``[r*H/k, (r+1)*H/k)``. The projections, the q/k RMSNorm
  (across all heads of a token) and the rotary embedding run before the first
  exchange, on the rank's own tokens with all heads; ``to_out`` after the second.
* Norms, FFN, modulation and cross-attention are per token and run unchanged on
  the rank's tokens.
* The output is gathered after ``proj_out`` (a per-token linear, so this is
  exact) rather than before it: fewer channels cross the wire
  (``out_channels * prod(patch_size)`` instead of ``H * head_dim``).

Device placement is the caller's (e.g. ``torch.cuda.set_device`` before the
nccl group is made); this module only uses the devices of the tensors it gets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

__all__ = ["SequenceParallel", "check_split", "process_group", "sequence_length"]


def sequence_length(transformer: WanTransformer3DModel, latent_shape: tuple[int, ...]) -> int:
    """The number of tokens ``S`` the transformer makes of latents of shape
    ``[B, C, F, H, W]`` (what ``k`` must divide)."""
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, frames, height, width = latent_shape
    return (frames // p_t) * (height // p_h) * (width // p_w)


def check_split(k: int, heads: int, seq_len: int | None = None) -> None:
    """Refuse a split Ulysses cannot do exactly: ``k`` ranks must divide the
    attention heads (each rank attends with ``heads/k`` of them) and, when given,
    the token count (each rank holds ``seq_len/k`` tokens; no padding).

    Raises:
        ValueError: naming the numbers.
    """
    if k < 1:
        raise ValueError(f"sequence parallel: {k} ranks; need at least 1")
    if heads % k:
        raise ValueError(f"sequence parallel: {k} ranks do not divide the model's {heads} attention heads")
    if seq_len is not None and seq_len % k:
        raise ValueError(
            f"sequence parallel: {k} ranks do not divide the {seq_len} tokens of this video"
            " (latent frames x height x width after patchify); choose another resolution, frame count or k"
        )


@contextmanager
def process_group(
    rank: int,
    world_size: int,
    *,
    init_method: str,
    backend: str = "gloo",
    timeout: timedelta = timedelta(seconds=60),
) -> Iterator[dist.ProcessGroup]:
    """The default process group for the ranks of one denoise worker, destroyed
    on exit whatever happens inside.

    ``timeout`` bounds every collective: a rank whose peer died or hung raises
    instead of waiting forever. gloo's socket interface defaults to the
    loopback (``GLOO_SOCKET_IFNAME=lo``) when ``init_method`` is a
    ``tcp://127.0.0.1`` address, so a host whose name resolves elsewhere still
    joins; set the variable yourself for multi-host groups.

    After a collective has failed (a peer died, or the timeout fired) the group
    is lost: report, leave the block and end the process; the ranks start over
    in a new group. gloo may abort the process at exit (SIGABRT, after
    ``destroy_process_group`` returned) when an operation had timed out.
    """
    if backend == "gloo" and init_method.startswith("tcp://127.0.0.1:"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Send chunk ``j`` of ``x`` (dim 0, ``k`` equal chunks) to rank ``j``; the
    result's chunk ``j`` is what rank ``j`` sent here."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _tokens_to_heads(x: torch.Tensor, k: int, group: dist.ProcessGroup) -> torch.Tensor:
    """``[..., S/k, H, D]`` (own tokens, all heads) -> ``[..., S, H/k, D]`` (all
    tokens, own heads). Leading dims (batch, or q/k/v stacked) ride along."""
    *lead, tokens, heads, dim = x.shape
    x = x.unflatten(-2, (k, heads // k)).movedim(-3, 0)  # [k (head group), ..., S/k, H/k, D]
    x = _all_to_all(x, group)  # [k (source rank = token block), ..., S/k, H/k, D]
    return x.movedim(0, -4).flatten(-4, -3)  # token blocks in rank order = global token order


def _heads_to_tokens(x: torch.Tensor, k: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of ``_tokens_to_heads``: ``[..., S, H/k, D]`` -> ``[..., S/k, H, D]``."""
    x = x.unflatten(-3, (k, x.shape[-3] // k)).movedim(-4, 0)  # [k (token block), ..., S/k, H/k, D]
    x = _all_to_all(x, group)  # [k (source rank = head group), ..., S/k, H/k, D]
    return x.movedim(0, -3).flatten(-3, -2)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs, the arithmetic of
    diffusers' ``WanAttnProcessor``: ``x`` ``[B, tokens, H, D]``, ``cos``/``sin``
    ``[1, tokens, 1, D]`` of the same tokens."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _UlyssesSelfAttention:
    """Attention processor for a Wan self-attention (``attn1``) whose input is
    this rank's tokens: projections, q/k norm and rotary on the own tokens, an
    ``all_to_all`` to all tokens of ``H/k`` heads, attention, and back."""

    def __init__(self, group: dist.ProcessGroup, k: int, attention_backend: Any) -> None:
        self.group = group
        self.k = k
        self._attention_backend = attention_backend  # the backend the replaced processor had

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence parallel self-attention: takes no context and no attention mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        # one exchange for q, k and v together: [3, B, S/k, H, D] -> [3, B, S, H/k, D]
        query, key, value = _tokens_to_heads(torch.stack([query, key, value]), self.k, self.group)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )
        out = _heads_to_tokens(out, self.k, self.group).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _arg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


class SequenceParallel:
    """Splits a loaded ``WanTransformer3DModel``'s forward over the ranks of
    ``group`` (Ulysses sequence parallelism, see the module invariants).

    Every rank of the group must wrap its own copy of the same model and call
    its forward with the same arguments, in the same order; each call then
    returns, on every rank, what the plain model returns (up to float rounding
    of attention over head subsets). ``compute.denoise`` runs unchanged on each
    rank.

    Installing replaces the processors of the self-attentions and adds forward
    hooks; ``remove()`` (or leaving the ``with`` block) restores the plain model.
    With ``k == 1`` nothing is exchanged but the same path runs.

    Raises (at construction, before any collective):
        ValueError: ``k`` does not divide the attention heads, or the model is
        already split (splitting twice would shard shards). A ``k`` that does
        not divide a forward's token count raises from that forward, on every
        rank alike, before its first collective.
    """

    def __init__(self, transformer: WanTransformer3DModel, group: dist.ProcessGroup | None = None) -> None:
        self.transformer = transformer
        self.group = group if group is not None else dist.group.WORLD
        self.k = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        check_split(self.k, transformer.config.num_attention_heads)
        if any(isinstance(block.attn1.processor, _UlyssesSelfAttention) for block in transformer.blocks):
            raise ValueError("sequence parallel: this transformer is already split; remove() the other first")
        self._processors: dict[WanAttention, Any] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    def __enter__(self) -> SequenceParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _own(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of ``x`` (dim 1)."""
        n = x.shape[1] // self.k
        return x[:, self.rank * n : (self.rank + 1) * n]

    def _install(self) -> None:
        model = self.transformer
        for block in model.blocks:
            old = block.attn1.processor
            self._processors[block.attn1] = old
            block.attn1.set_processor(_UlyssesSelfAttention(self.group, self.k, old._attention_backend))
        self._hooks += [
            model.register_forward_pre_hook(self._check_and_split_timestep, with_kwargs=True),
            model.rope.register_forward_hook(lambda _m, _a, out: tuple(self._own(t) for t in out)),
            model.blocks[0].register_forward_pre_hook(self._split_hidden_states, with_kwargs=True),
            model.proj_out.register_forward_hook(lambda _m, _a, out: self._gather(out)),
        ]

    def remove(self) -> None:
        """Restore the plain model (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for attn, processor in self._processors.items():
            attn.set_processor(processor)
        self._processors.clear()

    def _check_and_split_timestep(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Before anything else of the forward: refuse a token count ``k`` does not
        divide (deterministic, so every rank refuses alike and no collective is
        left half-entered), and take the own tokens of a per-token timestep."""
        hidden_states = _arg(args, kwargs, "hidden_states", 0)
        check_split(self.k, self.transformer.config.num_attention_heads,
                    sequence_length(self.transformer, tuple(hidden_states.shape)))
        timestep = _arg(args, kwargs, "timestep", 1)
        if timestep is not None and timestep.ndim == 2:
            if "timestep" in kwargs:
                kwargs = {**kwargs, "timestep": self._own(timestep)}
            else:
                args = (*args[:1], self._own(timestep), *args[2:])
        return args, kwargs

    def _split_hidden_states(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``blocks[0]``'s hidden states ``[B, S, C]`` -> this rank's ``[B, S/k, C]``."""
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._own(kwargs["hidden_states"])}
        return (self._own(args[0]), *args[1:]), kwargs

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        """``proj_out``'s ``[B, S/k, C]`` of every rank -> ``[B, S, C]`` in token order."""
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(self.k)]
        dist.all_gather(parts, out, group=self.group)
        return torch.cat(parts, dim=1)

"""What both model families share: CausalLM's forward (embed, blocks, final norm, head or loss) and
PreNormBlock's forward (the residual stream around attention and the MLP)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor

import torch
from torch import nn

from fmcore.train.config import checkpointing_mode
from fmcore.train.models.checkpointing import block_mode, run_block
from fmcore.train.models.common import DocMask, add_norm, doc_mask, lm_loss


class PreNormBlock(nn.Module):
    """A pre-norm block: stream += attention(norm(stream)); stream += mlp(norm(stream)).

    Subclasses set ``ops`` and define pre_norms() -> (the norm before attention, the one before the
    MLP), _attention(x, positions, docs) and _mlp(x)."""

    ops: str
    # What the backward recomputes when training: "none", "full" or "selective" (CausalLM sets it per block).
    checkpointing: str = "none"

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor | None,
                docs: DocMask | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """_stream(h, residual, positions, docs), checkpointed as self.checkpointing says when training.

        The checkpoint is inside the block's forward, not around its call: a block compiled on its own
        (train.compile "blocks") then holds it in its graph, where the partitioner follows the selective
        policy (an eager checkpoint around an inductor-compiled block was asked about inductor's out=
        matmuls, not the ops the policy keeps, and recomputed them), and FSDP2's hooks on the block stay
        outside the recompute."""
        mode = self.checkpointing if self.training else "none"
        return run_block(self._stream, mode, h, residual, positions, docs)

    def _stream(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor | None,
                docs: DocMask | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream entering the block is ``residual + h`` (h alone when residual is None).

        torch: adds eagerly and returns (the stream after the block, None), plain PyTorch's pre-norm block.
        fmcore: returns (the MLP's output, the stream before it); each norm adds its input to the stream
        in the fused add_norm kernel, the next block's first norm (or the final norm) this block's MLP output."""
        attn_norm, mlp_norm = self.pre_norms()
        if self.ops != "fmcore":
            if residual is not None:
                h = residual + h
            h = h + self._attention(attn_norm(h), positions, docs)
            return h + self._mlp(mlp_norm(h)), None
        x, residual = add_norm(attn_norm, h, residual)
        x, residual = add_norm(mlp_norm, self._attention(x, positions, docs), residual)
        return self._mlp(x), residual


class CausalLM(nn.Module):
    """Subclasses define embed(x, positions) -> (B, S, dim), ``blocks`` (a ModuleList whose blocks map
    (h, residual, positions, docs) to (h, residual), the stream being residual + h), ``norm`` and
    head_weight() -> (V, dim).

    forward(x, y=None, positions=None, cu_seqlens=None, max_seqlen=None): x (B, S) token ids. Without y it returns the
    fp32 logits (B, S, V); with y (B, S) the mean cross-entropy, computed by the fused linear
    cross-entropy on the fmcore path (no logits in memory). positions (B, S) restart at each document,
    and attention stays inside documents (a row's start opens one too); cu_seqlens (the loader's, needs
    positions) spares the fmcore path deriving them from positions with a host sync; max_seqlen (the
    longest document, from the loader) sizes the varlen kernel's grid (None: S, always safe).
    """

    ops: str
    _checkpointing: str = "none"

    @property
    def activation_checkpointing(self) -> str:
        """What the blocks recompute in the backward when training: "none", "full", "selective" or "N"
        (every N-th block full); set it as train.activation_checkpointing takes it (True means "full")."""
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value) -> None:
        self._checkpointing = checkpointing_mode(value, "activation_checkpointing")
        for i, block in enumerate(self.blocks):
            block.checkpointing = block_mode(self._checkpointing, i)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        if x.shape[-1] > self.cfg.max_seq_len:  # else a shape mismatch deep inside embed or RoPE
            raise ValueError(f"x has {x.shape[-1]} tokens per sequence but the model takes at most "
                             f"model.max_seq_len = {self.cfg.max_seq_len}")
        if cu_seqlens is not None and positions is None:
            # Else cu_seqlens was ignored: attention across documents, on both ops paths, silently.
            raise ValueError("cu_seqlens needs positions (B, S), restarting at 0 at each document (the "
                             "loader's Batch.positions), got positions=None")
        docs = doc_mask(positions, cu_seqlens, self.ops, max_seqlen) if positions is not None else None
        h, residual = self.embed(x, positions), None
        for block in self.blocks:
            h, residual = block(h, residual, positions, docs)
        # torch blocks add eagerly (residual stays None); fmcore's leave the last add to the final norm
        h = self.norm(h) if residual is None else add_norm(self.norm, h, residual)[0]
        if y is None:
            return torch.nn.functional.linear(h, self.head_weight()).float()
        return lm_loss(h, self.head_weight(), y, self.ops)

    def initial_weights(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 CPU tensor) of each parameter's initial value, in named_parameters order, one
        at a time: Normal(0, init_std) for matrices and embeddings, init_std/sqrt(2 L) for the
        projections that write into the residual stream (GPT-2's scaling, so the residual's variance
        does not grow with depth), zero biases, unit norm weights.

        The normal draws come in chunks of whole rows, each chunk from its own generator seeded by seed
        and the chunk's number in the model, so the weights are the same whatever the device, dtype or
        parallel layout that later holds them, the chunks are drawn on all of torch's CPU threads, and a
        rank draws only the rows that its shards of the model hold (materialize.rows_held, asked when
        the draws start): the other rows are left unwritten (fill's cut never reads them), so that a
        rank's start-up time and memory follow its shards, not the model. The names and shapes are the
        model's now (call it before tensor parallelism splits the fused projections; fill cuts them)."""
        std, n_layers = self.cfg.init_std, self.cfg.n_layers
        shapes = [(name, p.shape) for name, p in self.named_parameters()]  # (now: the draws come later)

        def draw() -> Iterator[tuple[str, torch.Tensor]]:
            from fmcore.train.models.materialize import rows_held

            held = rows_held(self)  # (the model as it is sharded when the draws start)
            # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: the chunks' seeds count
            # up from a 32-bit hash of seed, so that a model's chunks never share one (mt19937's seeding
            # decorrelates consecutive seeds).
            chunk_seed = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")
            with ThreadPoolExecutor(torch.get_num_threads()) as pool:
                for name, shape in shapes:
                    if len(shape) == 1:
                        yield name, torch.full(shape, 1.0 if name.endswith("weight") else 0.0)
                        continue
                    scale = std / (2 * n_layers) ** 0.5 if name.endswith(self.residual_out_names) else std
                    value, chunks = _draw_normal(shape, scale, chunk_seed, held[name], pool)
                    chunk_seed += chunks
                    yield name, value

        return draw()

    def reset_buffers(self) -> None:
        """Recompute the buffers (functions of the config) on their device, after to_empty."""


# Values a chunk of the initial weights draws from one generator: enough to make its setup (a few µs)
# negligible, few enough that a 1B model has a thousand chunks to share out among threads and ranks.
CHUNK_VALUES = 1 << 20


def _draw_normal(shape: torch.Size, std: float, first_seed: int, rows: torch.Tensor | None,
                 pool: Executor) -> tuple[torch.Tensor, int]:
    """(a tensor of shape whose rows are Normal(0, std), the number of chunks it spans): chunk c (whole
    rows, about CHUNK_VALUES values) is drawn from a generator seeded with first_seed + c (mod 2^32).
    rows None draws every row; else only the chunks holding these rows, the others left unwritten:
    torch.empty's pages, which are never touched (filling them, with NaN, cost a rank as much time as
    drawing the whole model on one thread does: 1.8 s for llama-1b's 1.1 G values, 2 minutes for a
    70B model, on every rank however many there are)."""
    per_row = shape[1:].numel()
    rows_per_chunk = max(1, CHUNK_VALUES // max(per_row, 1))
    n_chunks = -(-shape[0] // rows_per_chunk)
    value = torch.empty(shape)
    wanted = range(n_chunks) if rows is None else torch.unique(rows // rows_per_chunk).tolist()

    def draw_chunk(c: int) -> None:
        _draw_rows(value[c * rows_per_chunk:(c + 1) * rows_per_chunk], std, (first_seed + c) % 2**32)

    list(pool.map(draw_chunk, wanted))
    return value, n_chunks


def _draw_rows(rows: torch.Tensor, std: float, seed: int) -> None:
    """One chunk's draw, from its own generator (normal_ releases the GIL: the chunks run in parallel)."""
    rows.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))

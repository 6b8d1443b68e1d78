"""KV cache for incremental decoding: preallocated per-layer key/value buffers (a rolling buffer for
sliding-window models) and the attention over what they hold, behind the model's `cache.attend` hook.

Position p of a row lives in slot p mod n_slots. A sliding-window model never looks further back than W
positions, so it gets n_slots = W (or fewer when no sequence is that long) and its memory stays flat however
long generation runs; without a window, n_slots covers the longest sequence and no slot is ever reused.
`slot_pos` records which position each slot holds (-1: empty), and the attention mask follows from it: a
query at position i sees the keys at positions j with i - W < j <= i (Mistral's window, docs/design.md).

Rows are independent: each carries its own positions, so sequences of different lengths share a batch
without padding. A forward pass covers a slice of rows: call `begin(rows, positions)` once, then
`model(tokens, positions=positions, cache=cache)` (the Generator calls the model's decoding form,
model.fuse_for_decoding, the same way); every layer then calls `attend`, or, in the decoding form at one token per
row on CPU, `attend_step`: the whole step's rotation, store and attention in one C++ call (decode_attention.py).
"""
import torch
import torch.nn.functional as F

from . import decode_attention


class KVCache:
    def __init__(self, n_layers, batch, n_slots, n_heads, n_kv_heads, head_dim, *, window=None,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, n_slots, head_dim)   # slots next to head_dim: attention reads
        self.k = torch.zeros(shape, dtype=dtype, device=device)    # each head's keys contiguously
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((batch, n_slots), -1, dtype=torch.int64, device=device)
        self.n_slots, self.window = n_slots, window
        self.groups = n_heads // n_kv_heads
        self.batch_index = torch.arange(batch, device=device)[:, None]
        # Set by begin() for the coming forward pass.
        self.rows = slice(0, batch)
        self.used = n_slots          # slots a multi-token pass attends over: all up to the last one held
        self.write_slots = None
        self.positions = None        # each row's first new position, [n]
        self.visibility = None       # (key positions, query positions) the mask is built from, when first needed
        self._mask = None
        # Whether attend_step can run this cache's one-token passes (the Generator's decode steps).
        self.step_kernel = decode_attention.usable(self.k)

    @classmethod
    def for_model(cls, args, batch: int, max_len: int, *, dtype, device) -> "KVCache":
        """A cache for `batch` sequences of at most `max_len` positions each of a model with ModelArgs `args`."""
        n_slots = max_len if args.sliding_window is None else min(args.sliding_window, max_len)
        return cls(args.n_layers, batch, n_slots, args.n_heads, args.n_kv_heads, args.head_dim,
                   window=args.sliding_window, dtype=dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one position takes, over all layers."""
        n_layers, _, n_kv_heads, _, head_dim = self.k.shape
        return 2 * n_layers * n_kv_heads * head_dim * self.k.element_size()

    def begin(self, rows: slice, positions: torch.Tensor) -> None:
        """Prepare a forward pass over the batch rows `rows` whose new tokens sit at `positions` [n, T]
        (consecutive within a row): where their keys go and what each query may see. Once per pass."""
        n, T = positions.shape
        slot_pos = self.slot_pos[rows]
        if T == 1:
            # One token per row: store it first, then attend over the buffer. The slot it takes held position
            # p - n_slots, which no query at p can see (n_slots >= W, or nothing was stored there yet).
            self.write_slots = positions % self.n_slots
            slot_pos.scatter_(1, self.write_slots, positions)
            key_pos = slot_pos
        else:
            # A chunk attends to the cache as it was plus to itself, and is stored afterwards: storing first
            # would let its later tokens overwrite slots its earlier queries still need (rolling buffer). Slots
            # past the last one any row holds are left out: a prompt's first chunk would otherwise attend over
            # the whole empty cache (one host sync per chunk).
            self.used = used_slots(slot_pos)
            key_pos = torch.cat([slot_pos[:, :self.used], positions], dim=1)
            kept = positions[:, -self.n_slots:]
            self.write_slots = kept % self.n_slots
            slot_pos.scatter_(1, self.write_slots, kept)
        self.visibility, self._mask = (key_pos, positions), None
        self.positions = positions[:, 0].contiguous()
        self.rows = rows

    @property
    def mask(self):
        """The additive attention mask of the pass begin() prepared, [n, 1, T * groups, keys]: built at the first
        attend() of the pass (once, not per layer; SDPA would convert a boolean one in every layer), never when
        attend_step does all the layers' attention."""
        if self._mask is None:
            key_pos, positions = self.visibility
            n, T = positions.shape
            key_pos, query_pos = key_pos[:, None, :], positions[:, :, None]
            visible = (key_pos >= 0) & (key_pos <= query_pos)
            if self.window is not None:
                visible &= key_pos > query_pos - self.window
            # Queries are laid out [n, Hkv, T * groups, D] by attend(): repeat each query's mask row per group.
            K = visible.shape[-1]
            visible = visible[:, None, :, None, :].expand(n, 1, T, self.groups, K).reshape(n, 1, T * self.groups, K)
            self._mask = torch.zeros(visible.shape, dtype=self.k.dtype, device=self.k.device).masked_fill_(
                ~visible, -torch.inf)
        return self._mask

    def attend(self, layer_id: int, q, k, v):
        """Store this pass's k, v [n, T, Hkv, D] for layer `layer_id` and return the attention of q
        [n, T, Hq, D] (already rotated) over the cache and themselves: [n, T, Hq, D]."""
        n, T, Hq, D = q.shape
        Hkv = k.shape[2]
        k_cache, v_cache = self.k[layer_id, self.rows], self.v[layer_id, self.rows]   # [n, Hkv, S, D] views
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if T == 1:
            self.store(k_cache, v_cache, k, v)
            keys, values = k_cache, v_cache
        else:
            keys = torch.cat([k_cache[:, :, :self.used], k], dim=2)
            values = torch.cat([v_cache[:, :, :self.used], v], dim=2)
            self.store(k_cache, v_cache, k[:, :, -self.n_slots:], v[:, :, -self.n_slots:])
        # The query heads sharing a KV head are folded into the query axis: K and V are read once per group.
        qg = q.view(n, T, Hkv, self.groups, D).transpose(1, 2).reshape(n, Hkv, T * self.groups, D)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=self.mask)
        return out.view(n, Hkv, T, self.groups, D).transpose(1, 2).reshape(n, T, Hq, D)

    def attend_step(self, layer_id: int, qkv, cos, sin):
        """What a decode step's layer needs from the cache when `step_kernel` is set and every row brings one token:
        qkv [n, 1, Hq + 2 Hkv, D] (the fused projection, not rotated) and its rotary angles cos, sin [n, 1, D/2] in,
        the attention [n, 1, Hq, D] out, k and v stored (decode_attention.attend_step)."""
        # The rotary tables are fp32 unless the model was cast whole (.to(bfloat16) casts buffers too); rotate()
        # widens them, so does this.
        return decode_attention.attend_step(qkv, cos.float(), sin.float(), self.k[layer_id, self.rows],
                                            self.v[layer_id, self.rows], self.slot_pos[self.rows], self.positions,
                                            window=self.window)

    def store(self, k_cache, v_cache, k, v):
        """Write k, v [n, Hkv, m, D] into the slots chosen by begin()."""
        rows = self.batch_index[:k.shape[0]]
        k_cache[rows, :, self.write_slots] = k.transpose(1, 2)
        v_cache[rows, :, self.write_slots] = v.transpose(1, 2)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Make row i a copy of row keep[i], for i < len(keep): finished sequences leave the batch and stop costing
        work; a beam search's beams take their parents' rows (an index may repeat)."""
        rows = torch.arange(len(keep), device=keep.device)
        moved = (keep != rows).nonzero()[:, 0]
        if len(moved) == 0:
            return
        # Only rows that change, and only over the slots the moved rows hold: the whole cache is the largest
        # tensor of a decode step, and copying it at every beam step cost more than the step's forward pass.
        dest, src = rows[moved], keep[moved]
        used = used_slots(self.slot_pos[src])
        self.k[:, dest, :, :used] = self.k[:, src, :, :used]
        self.v[:, dest, :, :used] = self.v[:, src, :, :used]
        self.slot_pos[dest] = self.slot_pos[src]


def used_slots(slot_pos: torch.Tensor) -> int:
    """1 + the last slot index any row of slot_pos [n, S] holds a position in (0 when all are empty)."""
    held = (slot_pos >= 0).any(dim=0)
    return int((held * torch.arange(1, held.shape[0] + 1, device=held.device)).max()) if held.numel() else 0

"""Running per-component statistics for collation, exact under batching, resuming and sharding.

One `LayerAccumulator` holds, for every component of one (family, layer), on the model's device:

- **top-k windows** by score = the window's max activation (over tokens, or token pairs for heads),
  best first; ties broken by the lower window index. Exact: every window is compared.
- **random sample**: the `random_sample_size` windows with the smallest sample key, where a window's
  key is a hash of (seed, family, layer, component, window index). Keeping the smallest keys is
  bottom-k sampling, a uniform sample without replacement (the same law as reservoir sampling), and
  because keys depend on nothing but those five values, the sample is the same whatever the batch
  size, wherever a run resumed, and however the corpus was split into shards: merging two samples
  is taking the smallest keys of their union.
- **random sample by quantile**: the same with an independent key stream, kept separately in each
  of `len(quantiles) + 1` bins of the window score. The bin boundaries are the `quantiles` (default
  0.5, 0.9, 0.99, 0.999, as in OpenAI's datasets) of the scores of the *calibration windows*, the
  first `calibration_windows` windows of the corpus (linear interpolation, `torch.quantile`).
  Calibration windows themselves are not sampled into bins (they were seen before the boundaries
  existed); every later window is. Every shard computes the same boundaries from the same windows.
- **moments**: count, mean and central moment sums M2, M3, M4 of the activation over all tokens
  (pairs), merged per batch with the pairwise update of Chan et al. / Pébay (2008), and the number
  of values above `active_threshold`. These merge exactly across shards too (up to float64
  rounding, which is deterministic for a given order).

Activations of kept windows are rounded to float16 precision when they fit (|x| <= 65504) as they
enter the state, so the stored values (float16 blobs) are exactly the in-memory ones and a resumed
run reproduces an uninterrupted one bit for bit. Scores stay float32.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.9, 0.99, 0.999)
FLOAT16_MAX = 65504.0
EMPTY_KEY = torch.iinfo(torch.int64).max
_MASK32 = 0xFFFFFFFF
RANDOM_SALT = 0x52414E44  # "RAND"
QUANTILE_SALT = 0x5155414E  # "QUAN"


# ---- sample keys --------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the 'lowbias32' finalizer) applied elementwise to int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def component_hashes(seed: int, salt: int, family: str, layer: int, n: int) -> torch.Tensor:
    """[n] int64: one 32-bit hash per component, from (seed, salt, family, layer, index)."""
    head = torch.tensor(seed & _MASK32, dtype=torch.int64)
    for part in (seed >> 32, salt, zlib.crc32(family.encode()), layer):
        head = _mix32(head ^ (part & _MASK32))
    return _mix32(head ^ torch.arange(n, dtype=torch.int64))


def sample_keys(component_hash: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """[C, b] unique int64 sample keys: a 32-bit hash of (component, window) in the high bits, the
    window index (< 2^31) in the low 31 bits, so equal hashes fall back to window order."""
    h = _mix32(component_hash[:, None] ^ _mix32(windows)[None, :])
    return (h << 31) | windows[None, :]


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: as configured), then restore them."""
    before = torch.get_num_threads()
    if n is None or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- selection ----------------------------------------------------------------------------------


def score_order(scores: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort (ascending) by score descending, then window ascending; unique per
    window. scores float32 (NaN counts as -inf), windows int64 in [0, 2^31)."""
    bits = scores.float().nan_to_num(nan=float("-inf")).contiguous().view(torch.int32).long()
    # Monotone map of float32 bit patterns onto [0, 2^32): negative floats below positive ones.
    monotone = torch.where(bits >= 0, bits + 2**31, 2**31 - 1 - (bits & 0x7FFFFFFF))
    return ((2**32 - 1 - monotone) << 31) | windows


def round_for_storage(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to float16 precision where they fit in float16 (see module doc)."""
    x = x.float()
    return torch.where(x.abs() <= FLOAT16_MAX, x.half().float(), x)


@dataclass
class SampleSet:
    """The k best entries of each of R rows by a unique int64 `order` key (smaller is better):
    `order`, `windows` (-1 for an empty slot) and `values` (the window score) [R, k], sorted
    best first. Activations live in `acts` [R, k, P] at unsorted storage slots, `slots` [R, k]
    pointing into them, so admitting a window writes its activations once and moves nothing."""

    order: torch.Tensor
    windows: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    acts: torch.Tensor

    @classmethod
    def empty(cls, rows: int, k: int, positions: int, device: torch.device) -> SampleSet:
        return cls(
            order=torch.full((rows, k), EMPTY_KEY, dtype=torch.int64, device=device),
            windows=torch.full((rows, k), -1, dtype=torch.int64, device=device),
            values=torch.full((rows, k), float("-inf"), dtype=torch.float32, device=device),
            slots=torch.arange(k, device=device).expand(rows, k).contiguous(),
            acts=torch.zeros((rows, k, positions), dtype=torch.float32, device=device),
        )

    @property
    def k(self) -> int:
        return int(self.order.shape[1])

    def sorted_acts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, k, P] (or [len(rows), k, P]) activations in rank order."""
        if rows is None:
            rows = torch.arange(self.order.shape[0], device=self.order.device)
        return self.acts[rows[:, None], self.slots[rows]]

    def merge(
        self,
        order: torch.Tensor,
        windows: torch.Tensor,
        values: torch.Tensor,
        acts: torch.Tensor,
        source_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Keep the best k of self and the candidates: order/windows/values [R, n], acts [n, S, P]
        with row r's candidate j activations at acts[j, source_rows[r]] (S = R and identity when
        source_rows is None). Returns a [R] bool mask of rows that admitted a candidate."""
        n_rows, k = self.order.shape
        changed = torch.zeros(n_rows, dtype=torch.bool, device=self.order.device)
        # Only rows with a candidate better than their worst kept entry can change.
        rows = (order.min(dim=1).values < self.order[:, -1]).nonzero().flatten()
        if rows.numel() == 0:
            return changed
        merged_order, idx = torch.topk(
            torch.cat([self.order[rows], order[rows]], 1), k, dim=1, largest=False, sorted=True
        )
        from_state = idx < k
        state_idx = idx.clamp(max=k - 1)
        new_idx = (idx - k).clamp(min=0)
        old_slots = self.slots[rows]
        # Slots of evicted entries are reused, in order, by the admitted candidates.
        kept = torch.zeros(len(rows), k + 1, dtype=torch.bool, device=idx.device)
        kept.scatter_(1, torch.where(from_state, idx, k), True)
        free = old_slots.gather(1, torch.argsort(kept[:, :k].to(torch.int8), dim=1, stable=True))
        rank = (~from_state).long().cumsum(dim=1) - 1
        slots = torch.where(
            from_state, old_slots.gather(1, state_idx), free.gather(1, rank.clamp(min=0))
        )
        admitted = (~from_state).nonzero(as_tuple=True)  # (row position, rank position)
        src = rows if source_rows is None else source_rows[rows]
        self.acts[rows[admitted[0]], slots[admitted]] = round_for_storage(
            acts[new_idx[admitted], src[admitted[0]]]
        )
        self.windows[rows] = torch.where(
            from_state, self.windows[rows].gather(1, state_idx), windows[rows].gather(1, new_idx)
        )
        self.values[rows] = torch.where(
            from_state, self.values[rows].gather(1, state_idx), values[rows].gather(1, new_idx)
        )
        self.order[rows] = merged_order
        self.slots[rows] = slots
        changed[rows] = (~from_state).any(dim=1)
        return changed


# ---- the accumulator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccumulatorConfig:
    k: int = 20
    random_sample_size: int = 20
    quantile_sample_size: int = 5
    quantiles: tuple[float, ...] = QUANTILES
    calibration_windows: int = 256
    seed: int = 0
    active_threshold: float = 0.0

    @property
    def n_bins(self) -> int:
        return len(self.quantiles) + 1


class LayerAccumulator:
    """Running statistics of the C components of one (family, layer); see the module doc."""

    def __init__(
        self,
        family: str,
        layer: int,
        n_components: int,
        positions: int,
        config: AccumulatorConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        self.family, self.layer, self.config = family, layer, config
        self.n_components, self.positions = n_components, positions
        self.device = torch.device(device)
        c, cfg, dev = n_components, config, self.device
        self.top = SampleSet.empty(c, cfg.k, positions, dev)
        self.random = SampleSet.empty(c, cfg.random_sample_size, positions, dev)
        self.by_quantile = SampleSet.empty(c * cfg.n_bins, cfg.quantile_sample_size, positions, dev)
        self.boundaries: torch.Tensor | None = None  # [C, n_bins - 1] float32
        self.n_values = 0  # activations seen per component (the same for all)
        self.mean = torch.zeros(c, dtype=torch.float64, device=dev)
        self.m2 = torch.zeros_like(self.mean)
        self.m3 = torch.zeros_like(self.mean)
        self.m4 = torch.zeros_like(self.mean)
        self.n_active = torch.zeros(c, dtype=torch.int64, device=dev)
        self.dirty = torch.zeros(c, dtype=torch.bool, device=dev)  # samples changed since saved
        self._calibration: torch.Tensor | None = None  # [C, calibration_windows] scores
        self._calibration_seen = 0
        self._random_hash = component_hashes(cfg.seed, RANDOM_SALT, family, layer, c).to(dev)
        self._quantile_hash = component_hashes(cfg.seed, QUANTILE_SALT, family, layer, c).to(dev)
        self._bin_ids = torch.arange(cfg.n_bins, device=dev)
        self._bin_rows = torch.arange(c, device=dev).repeat_interleave(cfg.n_bins)

    # ---- updates ------------------------------------------------------------------------------

    def update(self, acts: torch.Tensor, first_window: int) -> None:
        """Add windows [first_window, first_window + b): acts [b, C, P] (any float dtype, any
        strides: MLP activations arrive as a transposed view of [b, P, C])."""
        b, c, p = acts.shape
        if c != self.n_components or p != self.positions:
            raise ValueError(
                f"{self.family} layer {self.layer}: expected [b, {self.n_components}, "
                f"{self.positions}] activations, got {list(acts.shape)}"
            )
        if first_window + b > 2**31:
            raise ValueError("window indices must stay below 2^31")
        windows = torch.arange(first_window, first_window + b, device=self.device)
        scores = acts.amax(dim=2).T.float().nan_to_num(nan=float("-inf"))  # [C, b]
        # Some float reductions over few components (a head's third moment over [32, 1, 2080]
        # values, say) round differently when split over 2 threads, so the moments are always
        # summed on one: a store is the same bit for bit whatever thread count the rest of the
        # collation used (resumed runs included).
        with intra_op_threads(1 if self.device.type == "cpu" else None):
            self._add_moments(acts)
        win = windows.expand(c, b)
        self.dirty |= self.top.merge(score_order(scores, win), win, scores, acts)
        keys = sample_keys(self._random_hash, windows)
        self.dirty |= self.random.merge(keys, win, scores, acts)

        calibration_end = self.config.calibration_windows
        if self.boundaries is None:
            n_cal = max(0, min(b, calibration_end - first_window))
            self.calibrate(scores[:, :n_cal], first_window)
        eligible = windows >= calibration_end
        if bool(eligible.any()):
            if self.boundaries is None:
                raise RuntimeError("quantile boundaries are not set: calibrate first")
            self._add_to_quantile_bins(scores, windows, eligible, acts)

    def calibrate(self, scores: torch.Tensor, first_window: int) -> None:
        """Record the scores [C, b] of calibration windows [first_window, first_window + b); set
        the quantile boundaries once all calibration windows are in."""
        n_cal = self.config.calibration_windows
        if self.boundaries is not None or scores.shape[1] == 0:
            return
        if self._calibration is None:
            self._calibration = torch.full(
                (self.n_components, n_cal), float("nan"), device=self.device
            )
        b = scores.shape[1]
        if first_window < 0 or first_window + b > n_cal:
            raise ValueError(f"calibration windows are [0, {n_cal}), got [{first_window}, +{b})")
        self._calibration[:, first_window : first_window + b] = scores.float()
        self._calibration_seen += b
        if self._calibration_seen >= n_cal:
            q = torch.tensor(self.config.quantiles, dtype=torch.float32, device=self.device)
            self.boundaries = torch.quantile(self._calibration, q, dim=1).T.contiguous()
            self._calibration = None

    def _add_to_quantile_bins(
        self,
        scores: torch.Tensor,
        windows: torch.Tensor,
        eligible: torch.Tensor,
        acts: torch.Tensor,
    ) -> None:
        assert self.boundaries is not None
        c, b = scores.shape
        n_bins = self.config.n_bins
        # bin j holds boundaries[j-1] <= score < boundaries[j]
        bins = torch.searchsorted(self.boundaries, scores.contiguous(), right=True)  # [C, b]
        keys = sample_keys(self._quantile_hash, windows)
        in_bin = (bins[:, None, :] == self._bin_ids[None, :, None]) & eligible  # [C, bins, b]
        order = torch.where(in_bin, keys[:, None, :], EMPTY_KEY).reshape(c * n_bins, b)
        win = torch.where(in_bin, windows, -1).reshape(c * n_bins, b)
        values = scores.repeat_interleave(n_bins, dim=0)
        changed = self.by_quantile.merge(order, win, values, acts, source_rows=self._bin_rows)
        self.dirty |= changed.reshape(c, n_bins).any(dim=1)

    def _add_moments(self, x: torch.Tensor) -> None:
        """x [b, C, P]: one batch of values. Its centred sums are taken in float32 (a batch is
        small and centred) and merged into the float64 running sums. Reducing over dims (0, 2)
        lets PyTorch follow the tensor's memory layout, whatever it is.

        After the mean, the batch is processed a few windows at a time (about 512 KiB of values):
        the powers of each chunk stay in the CPU cache while they are summed, which halves the
        time of this memory-bound step for an MLP layer (17 -> 10 ms here)."""
        b, c, p = x.shape
        x = x.float()
        mean_b = x.mean(dim=(0, 2), keepdim=True)
        sums = torch.zeros(3, c, dtype=torch.float64, device=x.device)
        n_active = torch.zeros(c, dtype=torch.int64, device=x.device)
        step = max(1, (1 << 17) // max(1, c * p))
        for i in range(0, b, step):
            chunk = x[i : i + step]
            d = chunk - mean_b
            power = d * d
            sums[0] += power.sum(dim=(0, 2))
            sums[1] += power.mul_(d).sum(dim=(0, 2))
            sums[2] += power.mul_(d).sum(dim=(0, 2))
            n_active += (chunk > self.config.active_threshold).sum(dim=(0, 2))
        self.n_active += n_active
        self._merge_moments(b * p, mean_b.flatten().double(), sums[0], sums[1], sums[2])

    def _merge_moments(
        self,
        n_b: int,
        mean_b: torch.Tensor,
        m2_b: torch.Tensor,
        m3_b: torch.Tensor,
        m4_b: torch.Tensor,
    ) -> None:
        """Pébay's (2008) pairwise update of count, mean and central sums M2..M4."""
        n_a = self.n_values
        if n_b == 0:
            return
        if n_a == 0:
            self.n_values, self.mean, self.m2, self.m3, self.m4 = n_b, mean_b, m2_b, m3_b, m4_b
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        d_n = delta / n
        m2_a, m3_a = self.m2, self.m3
        self.m4 = (
            self.m4
            + m4_b
            + delta * d_n**3 * n_a * n_b * (n_a * n_a - n_a * n_b + n_b * n_b)
            + 6 * d_n**2 * (n_a * n_a * m2_b + n_b * n_b * m2_a)
            + 4 * d_n * (n_a * m3_b - n_b * m3_a)
        )
        self.m3 = (
            m3_a
            + m3_b
            + delta * d_n**2 * n_a * n_b * (n_a - n_b)
            + 3 * d_n * (n_a * m2_b - n_b * m2_a)
        )
        self.m2 = m2_a + m2_b + delta * d_n * n_a * n_b
        self.mean = self.mean + d_n * n_b
        self.n_values = n

    def merge(self, other: LayerAccumulator) -> None:
        """Fold in the statistics of a disjoint set of windows (another shard) exactly."""
        if (other.family, other.layer, other.n_components, other.positions) != (
            self.family,
            self.layer,
            self.n_components,
            self.positions,
        ) or other.config != self.config:
            raise ValueError("cannot merge accumulators of different components or settings")
        if self.boundaries is None or other.boundaries is None:
            raise ValueError("cannot merge before both have their quantile boundaries")
        if not torch.equal(self.boundaries, other.boundaries):
            raise ValueError(
                f"{self.family} layer {self.layer}: the shards have different quantile boundaries "
                "(they were calibrated on different windows or settings)"
            )
        for mine, theirs in ((self.top, other.top), (self.random, other.random)):
            acts = theirs.sorted_acts().transpose(0, 1)
            self.dirty |= mine.merge(theirs.order, theirs.windows, theirs.values, acts)
        q = other.by_quantile
        acts = q.sorted_acts().transpose(0, 1)
        changed = self.by_quantile.merge(q.order, q.windows, q.values, acts)
        self.dirty |= changed.reshape(self.n_components, -1).any(dim=1)
        self._merge_moments(other.n_values, other.mean, other.m2, other.m3, other.m4)
        self.n_active = self.n_active + other.n_active

    # ---- derived statistics -------------------------------------------------------------------

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per component [C] float64: max_activation, mean, variance (population), skewness,
        kurtosis (excess, Fisher), fraction_active; NaN where undefined (no values seen, or zero
        variance for skewness and kurtosis)."""
        n = self.n_values
        nan = torch.full_like(self.mean, float("nan"))
        if n == 0:
            return {
                name: nan
                for name in (
                    "max_activation",
                    "mean",
                    "variance",
                    "skewness",
                    "kurtosis",
                    "fraction_active",
                )
            }
        variance = self.m2 / n
        constant = variance <= 0
        safe = torch.where(constant, 1.0, variance)
        return {
            "max_activation": torch.where(
                self.top.windows[:, 0] >= 0, self.top.values[:, 0].double(), nan
            ),
            "mean": self.mean,
            "variance": variance,
            "skewness": torch.where(constant, nan, (self.m3 / n) / safe.pow(1.5)),
            "kurtosis": torch.where(constant, nan, (self.m4 / n) / safe.pow(2) - 3.0),
            "fraction_active": self.n_active.double() / n,
        }

"""Dead-unit monitoring: activation statistics gathered by the forward kernels in the same pass.

``y, stats = fastrelu.relu(x, stats=True, axis=1)`` counts, per unit along `axis` (the features
of an (N, F) batch, the channels of NCHW or NHWC data), the inputs that were positive; a unit whose
inputs are never positive over a whole epoch is dead: ReLU passes it no gradient, so it cannot
recover.  :class:`DeadUnitTracker` adds those counts up per layer over an epoch.
"""
import numpy as np

__all__ = ["ActivationStats", "DeadUnitTracker"]


class ActivationStats:
    """Counts from one forward pass: ``positive[u]`` inputs of unit u were > 0, out of
    ``per_unit`` inputs per unit (NaN counts as not positive)."""

    __slots__ = ("positive", "per_unit")

    def __init__(self, positive, per_unit):
        if type(positive) is not np.ndarray:
            positive = np.asarray(positive)
            if positive.ndim == 1 and positive.size == 0:
                positive = positive.astype(np.int64)  # [] is float64 to NumPy
        if positive.ndim != 1 or positive.dtype.kind not in "iu":
            raise TypeError(f"positive must be a 1-d array of integer counts, got "
                            f"{positive.ndim}-d {positive.dtype}")
        if type(per_unit) is not int and (isinstance(per_unit, (bool, np.bool_)) or
                                          not isinstance(per_unit, np.integer)) or per_unit < 0:
            raise TypeError(f"per_unit must be an integer >= 0, not {per_unit!r}")
        if per_unit > np.iinfo(np.int64).max:
            raise ValueError(f"per_unit={per_unit} is beyond the int64 counts")
        if positive.size and not (0 <= positive.min() and positive.max() <= per_unit):
            raise ValueError(f"positive counts must lie in [0, per_unit={per_unit}], got "
                             f"{positive.min()} to {positive.max()}")
        self.positive = positive.astype(np.int64, copy=False)
        self.per_unit = int(per_unit)

    @classmethod
    def _counted(cls, positive, per_unit):
        """The kernels' own int64 counts, already in range: no checks on the op's hot path."""
        stats = cls.__new__(cls)
        stats.positive, stats.per_unit = positive, per_unit
        return stats

    @property
    def units(self):
        return self.positive.size

    @property
    def total(self):
        return self.units * self.per_unit

    @property
    def sparsity(self):
        """Fraction of inputs that were not positive (ReLU's zero outputs)."""
        return 1.0 - float(self.positive.sum()) / self.total if self.total else 0.0

    @property
    def activation_rate(self):
        """Per unit, the fraction of its inputs that were positive."""
        return self.positive / self.per_unit if self.per_unit else np.zeros(self.units)

    @property
    def dead(self):
        """Per unit, True when it had inputs and none of them was positive (a unit that saw no
        input, as in an empty batch, is not counted dead: nothing is known of it)."""
        return (self.positive == 0) & (self.per_unit > 0)

    @property
    def dead_fraction(self):
        return float(self.dead.mean()) if self.units else 0.0

    def __repr__(self):
        return (f"ActivationStats(units={self.units}, per_unit={self.per_unit}, "
                f"sparsity={self.sparsity:.3f}, dead_fraction={self.dead_fraction:.3f})")


class DeadUnitTracker:
    """Adds up :class:`ActivationStats` per layer over the batches of an epoch.

    >>> tracker = DeadUnitTracker()
    >>> for x in batches:                       # doctest: +SKIP
    ...     h, stats = fastrelu.relu(x @ w + b, stats=True)
    ...     tracker.update("hidden1", stats)
    >>> tracker.end_epoch()                     # doctest: +SKIP
    {'hidden1': {'units': 100, 'dead_fraction': 0.12, 'sparsity': 0.61, ...}}

    Only counts are kept (one int64 per unit), so it is cheap enough to leave on."""

    def __init__(self):
        self._positive = {}
        self._per_unit = {}
        self._batches = {}
        self.history = []  # one end_epoch() report per finished epoch

    def update(self, layer, stats):
        """Adds one batch's statistics of `layer` (any hashable name)."""
        if not isinstance(stats, ActivationStats):
            raise TypeError(f"stats must be an ActivationStats (from an op called with "
                            f"stats=True), not {type(stats).__name__}")
        try:
            hash(layer)
        except TypeError:
            raise TypeError(f"layer must be a hashable name, not {type(layer).__name__}") from None
        if layer in self._positive:
            if self._positive[layer].shape != stats.positive.shape:
                raise ValueError(f"layer {layer!r} had {self._positive[layer].size} units, "
                                 f"these stats have {stats.units}")
            self._positive[layer] += stats.positive
            self._per_unit[layer] += stats.per_unit
            self._batches[layer] += 1
        else:
            self._positive[layer] = stats.positive.astype(np.int64, copy=True)
            self._per_unit[layer] = stats.per_unit
            self._batches[layer] = 1

    @property
    def layers(self):
        return list(self._positive)

    def stats(self, layer):
        """The epoch so far as one ActivationStats (KeyError for a layer not seen this epoch)."""
        if layer not in self._positive:
            known = ", ".join(map(repr, self._positive)) or "none yet"
            raise KeyError(f"no statistics for layer {layer!r} in this epoch (layers: {known})")
        return ActivationStats(self._positive[layer].copy(), self._per_unit[layer])

    def dead_fraction(self, layer):
        """Fraction of the layer's units never positive in this epoch so far."""
        return self.stats(layer).dead_fraction

    def activation_rates(self, layer):
        return self.stats(layer).activation_rate

    def sparsity(self, layer):
        return self.stats(layer).sparsity

    def report(self):
        out = {}
        for layer in self._positive:
            s = self.stats(layer)
            out[layer] = {"units": s.units, "dead_units": int(s.dead.sum()),
                          "dead_fraction": s.dead_fraction, "sparsity": s.sparsity,
                          "batches": self._batches[layer]}
        return out

    def reset(self):
        self._positive.clear()
        self._per_unit.clear()
        self._batches.clear()

    def end_epoch(self):
        """The epoch's report, also appended to `history`; then starts a new epoch."""
        report = self.report()
        self.history.append(report)
        self.reset()
        return report

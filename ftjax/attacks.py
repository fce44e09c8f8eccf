"""Byzantine attacks: pure functions from this round's honest rows to Byzantine rows.

An attack is an :class:`Attack` built by :func:`make_attack` from a name in the
:data:`ATTACKS` table and a few static options. Calling it maps

    (honest [H, ...], own [f, ...] or None, key, AttackContext) -> Byzantine rows [f, ...]

for pytrees whose leaves carry a leading worker axis. The adversary is
omniscient: it sees every honest update of the current round (the paper's threat model).

Two families:

* Attacks that run the honest estimator themselves (``none``, ``lf``, ``sf``,
  ``backdoor``; ``uses_own_updates=True``): the training step computes the
  Byzantine workers' own updates (for ``lf`` and ``backdoor`` on poisoned data,
  :mod:`ftjax.poisoning`) and passes them as ``own``.
* Omniscient attacks (everything else): ``own`` is ``None`` and the rows are
  built from the honest ones. ``ipm``, ``alie``, ``min_max``, ``min_sum`` and
  the ``optimal_*`` line searches make all Byzantine workers send one vector.
  The attacks other libraries offer (``fang_krum``, ``fang_trmean``, ``mimic``,
  ``signguard_adaptive``, ``clipped_clustering_adaptive``) are built in
  :mod:`ftjax.attacks_peers` and listed in the same table.

All norms and distances are global over the leaves of the pytree. Options are
Python values fixed at construction, so an attack can be closed over inside
``jax.jit``; the output is a deterministic function of the inputs and the key.
docs/attacks.md lists every attack with its formula and defaults.

Every sum over coordinates (a norm, a Gram matrix, an inner product) goes
through :func:`ftjax.kernels.rows.coordinate_sum`, and every other step works
coordinate by coordinate, so an attack also runs on one device's slice of the
coordinates under :func:`ftjax.kernels.shard_coordinates` (the round of
``mesh.aggregation = "sharded"``); the line searches then call the aggregator
on the same slices. The random values of ``gaussian``, ``fang_trmean``,
``signguard_adaptive`` and ``fang_krum`` (with ``epsilon > 0``) come from
:meth:`Attack.draw`, which needs only the rows' shapes, so a caller holding
slices can draw them for the whole rows and pass its slice as ``draws``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import attack_maths as maths
from ftjax import attack_search as search
from ftjax import attacks_peers as peers
from ftjax import registry
from ftjax import poisoning
from ftjax.attack_maths import alie_z  # noqa: F401  (public here)
from ftjax.poisoning import flip_labels  # noqa: F401  (public here)

PyTree = Any
Aggregator = Callable[[PyTree, jax.Array], tuple]

# The inverse golden ratio, the shrink factor of golden-section search.
maths.INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class AttackContext:
  """What an attack may know besides the honest rows.

  Attributes:
    num_byzantine: f, the number of Byzantine rows to produce (static).
    aggregator: the server's full aggregation rule ``(updates[W, ...], key) ->
      (out, diagnostics)``, meta-aggregator included; the ``optimal_*`` attacks
      line-search against it.
    num_classes: number of classes C of the task (for label flipping).
  """
  num_byzantine: int
  aggregator: Optional[Aggregator] = None
  num_classes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Attack:
  """A configured attack; call it as ``attack(honest, own, key, ctx)``.

  Attributes:
    name: the canonical name (aliases are resolved).
    uses_own_updates: True when the Byzantine workers run the honest estimator
      themselves (``none``, ``lf``, ``sf``, ``backdoor``): the step must compute their updates
      and pass them as ``own``. False for omniscient attacks, whose Byzantine
      gradients the step may skip.
    flips_labels: True only for ``lf``: the step feeds the Byzantine workers the
      labels ``(C - 1) - y``.
    poisoning: for the attacks that poison the Byzantine workers' data (``lf``,
      ``backdoor``), what the round applies to their minibatches
      (:mod:`ftjax.poisoning`); None for the others.
    options: the resolved options as sorted ``(name, value)`` pairs.
    needs_aggregator: True when ``ctx.aggregator`` must be set.
    min_honest: the fewest honest rows the formula is defined for.
  """
  name: str
  uses_own_updates: bool
  flips_labels: bool
  options: tuple = ()
  needs_aggregator: bool = False
  min_honest: int = 1
  poisoning: Any = None
  count_check: Optional[Callable] = dataclasses.field(default=None, repr=False, compare=False)
  fn: Optional[Callable] = dataclasses.field(default=None, repr=False, compare=False)
  draw_fn: Optional[Callable] = dataclasses.field(default=None, repr=False, compare=False)

  def draw(self, honest: PyTree, key: jax.Array, ctx: AttackContext) -> Optional[PyTree]:
    """The random values this attack adds to its rows, or None for a deterministic attack.

    The structure of the rows, each leaf with a leading axis and the leaf's
    trailing shape: ``gaussian``'s noise, ``fang_trmean``'s uniform values and
    ``fang_krum``'s directions are [f, ...] like the Byzantine rows;
    ``signguard_adaptive``'s are int32 [2, ...] (a permutation's places and
    random bits). Only the shapes and dtypes of ``honest`` are read
    (``jax.ShapeDtypeStruct`` leaves will do), so the values for the whole rows
    can be drawn where only slices of them are held, and each slice passed to
    :meth:`__call__` as ``draws``.

    Args:
      honest: the honest rows (or their shapes), leaves ``[H, ...]``.
      key: the key :meth:`__call__` gets.
      ctx: the static :class:`AttackContext`.
    """
    if self.draw_fn is None:
      return None
    return self.draw_fn(honest, key, _check_context(ctx, self))

  def check_counts(self, num_workers: int, num_byzantine: int) -> None:
    """Refuses, in one line, worker counts this attack's formula is not defined for.

    Every call runs it first; a caller that knows W and f before tracing (a
    config check) can run it then.

    Raises:
      ValueError: fewer than ``min_honest`` honest rows, or (with f > 0) a
        count the attack's own condition refuses (``fang_krum``: W >= 2f + 2).
    """
    num_honest = num_workers - num_byzantine
    if num_honest < self.min_honest:
      raise ValueError(
          f"Attack {self.name!r} needs at least {self.min_honest} honest rows (docs/attacks.md "
          f"says why), got {num_honest}; use fewer Byzantine workers or another attack.")
    if num_byzantine and self.count_check is not None:
      self.count_check(self.name, num_workers, num_byzantine)

  def __call__(self, honest: PyTree, own: Optional[PyTree], key: jax.Array,
               ctx: AttackContext, draws: Optional[PyTree] = None) -> PyTree:
    """Produces this round's Byzantine rows.

    Args:
      honest: this round's honest updates, leaves shaped ``[H, ...]``.
      own: the Byzantine workers' own honest-estimator updates, leaves shaped
        ``[f, ...]``, when ``uses_own_updates``; otherwise ignored (pass None).
      key: PRNG key of this round's attack randomness.
      ctx: the static :class:`AttackContext`.
      draws: the attack's random values (:meth:`draw`) laid out like the
        Byzantine rows, e.g. this device's slice of them; None draws them
        here from ``key``.

    Returns:
      The Byzantine rows: the structure of ``honest`` with leading axis f and
      the dtypes of ``honest``.

    Raises:
      ValueError: on inconsistent shapes, a missing aggregator or too few
        honest rows, before anything is computed.
    """
    if self.fn is None:
      raise ValueError("Build attacks with make_attack(name, **options), not Attack(...).")
    f = _check_context(ctx, self)
    num_honest = _check_rows(honest, "honest")
    self.check_counts(num_honest + f, f)
    if self.uses_own_updates:
      if own is None:
        if f:
          raise ValueError(f"Attack {self.name!r} sends the Byzantine workers' own updates: "
                           f"pass them as `own` with leading axis f={f}.")
        own = maths.empty_rows(honest)
      else:
        _check_own(own, honest, f, self.name)
    if f == 0:
      return maths.empty_rows(honest)
    if self.draw_fn is None:
      rows = self.fn(honest, own, key, ctx, num_honest, f)
    else:
      if draws is None:
        draws = self.draw_fn(honest, key, f)
      rows = self.fn(honest, own, key, ctx, num_honest, f, draws)
    return jax.tree.map(lambda r, h: r.astype(h.dtype), rows, honest)


# --------------------------------------------------------------------------
# Public helpers


def canonical_name(name: str) -> str:
  """Resolves an attack name or alias (case and ``-``/``_`` insensitive).

  Args:
    name: e.g. ``"empire"``, ``"ALIE"``, ``"min-max"``.

  Returns:
    The canonical name, e.g. ``"ipm"``, ``"alie"``, ``"min_max"``.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if not isinstance(name, str):
    raise ValueError(f"An attack name must be a string, got {name!r}.")
  key = name.strip().lower().replace("-", "_")
  if key not in ATTACKS:
    raise ValueError(f"Unknown attack {name!r}; valid names: {', '.join(sorted(ATTACKS))}.")
  return ATTACKS[key].name


def make_attack(name: str, **options) -> Attack:
  """Builds an attack from its name and options.

  Args:
    name: a key of :data:`ATTACKS` (aliases ``empire`` = ``ipm``, ``little`` =
      ``alie``; ``min-max`` is read as ``min_max``).
    **options: the attack's options (see docs/attacks.md); missing ones take
      their defaults, None for an option with a default means "the default".

  Returns:
    The configured :class:`Attack`.

  Raises:
    ValueError: for an unknown name or option, or an invalid option value.
  """
  spec = ATTACKS[canonical_name(name)]
  unknown = sorted(set(options) - set(spec.defaults))
  if unknown:
    valid = ", ".join(sorted(spec.defaults)) or "none"
    raise ValueError(f"Unknown option(s) {', '.join(unknown)} for attack {spec.name!r}; "
                     f"valid options: {valid}.")
  resolved = {}
  for opt, default in spec.defaults.items():
    value = options.get(opt, default)
    if value is None:
      value = default
    resolved[opt] = spec.checks[opt](f"{spec.name}.{opt}", value)
  if spec.cross_check is not None:
    spec.cross_check(spec.name, resolved)
  return Attack(name=spec.name, uses_own_updates=spec.uses_own_updates,
                flips_labels=spec.flips_labels, options=tuple(sorted(resolved.items())),
                needs_aggregator=spec.needs_aggregator, min_honest=spec.min_honest,
                poisoning=None if spec.poisoning is None else spec.poisoning(**resolved),
                count_check=spec.count_check, fn=spec.build(**resolved),
                draw_fn=None if spec.draw is None else spec.draw(**resolved))


# --------------------------------------------------------------------------
# Input checks (plain Python on static shapes: they run before any tracing work)


def _check_context(ctx: AttackContext, attack: Attack) -> int:
  if not isinstance(ctx, AttackContext):
    raise ValueError(f"ctx must be an AttackContext, got {type(ctx).__name__}.")
  f = ctx.num_byzantine
  if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
    raise ValueError(f"AttackContext.num_byzantine must be an integer >= 0, got {f!r}.")
  if attack.needs_aggregator and f and ctx.aggregator is None:
    raise ValueError(f"Attack {attack.name!r} line-searches against the server's aggregator: "
                     "set AttackContext(aggregator=...) to the rule in use.")
  return int(f)


def _check_rows(tree: PyTree, what: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"`{what}` has no array leaves.")
  counts = set()
  for leaf in leaves:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(f"`{what}` leaves must be arrays, got {type(leaf).__name__}.")
    if len(leaf.shape) < 1:
      raise ValueError(f"`{what}` leaves need a leading worker axis; got a scalar leaf.")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f"`{what}` leaves must be floating point, got dtype {leaf.dtype}.")
    counts.add(leaf.shape[0])
  if len(counts) != 1:
    raise ValueError(f"All `{what}` leaves must share the leading worker axis, got sizes "
                     f"{sorted(counts)}.")
  n = counts.pop()
  if n < 1:
    raise ValueError(f"`{what}` must hold at least one row.")
  return n


def _check_own(own: PyTree, honest: PyTree, f: int, name: str) -> None:
  if jax.tree.structure(own) != jax.tree.structure(honest):
    raise ValueError(f"Attack {name!r}: `own` must have the pytree structure of `honest`.")
  for o, h in zip(jax.tree.leaves(own), jax.tree.leaves(honest)):
    if tuple(o.shape) != (f,) + tuple(h.shape[1:]):
      raise ValueError(f"Attack {name!r}: `own` leaves must be shaped [f={f}, ...] like the "
                       f"honest rows, got {tuple(o.shape)} against {tuple(h.shape)}.")


# --------------------------------------------------------------------------
# Attack bodies. Each builder takes the resolved options and returns
# fn(honest, own, key, ctx, num_honest, f) -> rows with leading axis f; an
# attack with a draw builder (_Spec.draw) gets its random values as a last
# argument.


def _build_own(**_):
  """none and lf: the Byzantine workers send what their honest estimator gave."""
  return lambda honest, own, key, ctx, h, f: own


def _build_boost(boost, **_):
  """backdoor: the Byzantine workers send their own updates on poisoned data, times boost."""
  return lambda honest, own, key, ctx, h, f: jax.tree.map(lambda u: boost * u, own)


def _build_sf(**_):
  return lambda honest, own, key, ctx, h, f: jax.tree.map(jnp.negative, own)


def _build_ipm(eps):
  def fn(honest, own, key, ctx, h, f):
    return maths.repeat(jax.tree.map(lambda m: -eps * m, maths.mean(honest)), f)
  return fn


def _build_alie(z):
  def fn(honest, own, key, ctx, h, f):
    scale = maths.alie_z(h + f, f) if z is None else z
    row = jax.tree.map(lambda m, s: m - scale * s, maths.mean(honest), maths.std(honest))
    return maths.repeat(row, f)
  return fn


def _draw_gaussian(sigma, center):
  del center

  def draw(honest, key, f):
    leaves, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(leaves))
    # Independent noise per Byzantine worker, as independent faulty devices would send.
    return jax.tree.unflatten(treedef, [
        sigma * jax.random.normal(k, (f,) + tuple(x.shape[1:]), x.dtype)
        for k, x in zip(keys, leaves)])
  return draw


def _build_gaussian(sigma, center):
  del sigma

  def fn(honest, own, key, ctx, h, f, noise):
    return jax.tree.map(lambda n, x: n + jnp.mean(x, axis=0) if center == "mean" else n,
                        noise, honest)
  return fn


def _build_constant(value):
  def fn(honest, own, key, ctx, h, f):
    return jax.tree.map(lambda x: jnp.full((f,) + x.shape[1:], value, x.dtype), honest)
  return fn


# --------------------------------------------------------------------------
# Option checks: (qualified option name, value) -> normalised value; the common ones are
# in ftjax.registry.


def _at_least_one(what, v):
  v = registry.finite(what, v)
  if v < 1:
    raise ValueError(f"{what} must be >= 1, got {v}.")
  return v


def _fraction(what, v):
  v = registry.finite(what, v)
  if not 0 < v <= 1:
    raise ValueError(f"{what} must be in (0, 1], got {v}.")
  return v


def _check_range(name, opts):
  if not opts["low"] < opts["high"]:
    raise ValueError(f"{name}: need low < high for the search range, got "
                     f"low={opts['low']}, high={opts['high']}.")


class _Spec(NamedTuple):
  name: str                            # canonical name
  build: Callable[..., Callable]       # (**options) -> fn(honest, own, key, ctx, H, f)
  defaults: Mapping[str, Any]          # option -> default (None: computed, e.g. alie's z)
  checks: Mapping[str, Callable]       # option -> (what, value) -> normalised value
  uses_own_updates: bool = False
  flips_labels: bool = False
  needs_aggregator: bool = False
  min_honest: int = 1
  cross_check: Optional[Callable] = None
  draw: Optional[Callable] = None      # (**options) -> draw(honest, key, f): random values
  count_check: Optional[Callable] = None  # (name, W, f) -> None, raises for counts it refuses
  module: str = __name__               # where it is defined (a user's module, if registered)
  poisoning: Optional[Callable] = None  # (**options) -> what poisons the Byzantine data


def _search_spec(name, kind):
  return _Spec(
      name, lambda **o: search.build_optimal(kind, **o),
      defaults=dict(low=0.0, high=10.0, num_candidates=21, refine_steps=8, batch_size=None),
      checks=dict(low=registry.finite, high=registry.finite, num_candidates=registry.int_at_least(2),
                  refine_steps=registry.int_at_least(0), batch_size=registry.optional(registry.int_at_least(1))),
      needs_aggregator=True, min_honest=2 if kind == "alie" else 1, cross_check=_check_range)


def _distance_spec(name):
  return _Spec(
      name, lambda **o: search.build_min_distance(name, **o),
      defaults=dict(perturbation="unit", solver="bisection", gamma_init=10.0, steps=40),
      checks=dict(perturbation=registry.choice("unit", "std", "sign"),
                  solver=registry.choice("bisection", "exact"), gamma_init=registry.positive,
                  steps=registry.int_at_least(1)),
      min_honest=2)


_IPM = _Spec("ipm", _build_ipm, defaults=dict(eps=maths.IPM_REFERENCE_EPS), checks=dict(eps=registry.finite))
_ALIE = _Spec("alie", _build_alie, defaults=dict(z=None), checks=dict(z=registry.optional(registry.nonnegative)),
              min_honest=2)
_OPTIMAL_IPM = _search_spec("optimal_ipm", "ipm")
_OPTIMAL_ALIE = _search_spec("optimal_alie", "alie")
# The peers' attacks (ftjax/attacks_peers.py).
_FANG_KRUM = _Spec(
    "fang_krum", peers.build_fang_krum,
    defaults=dict(threshold=1e-5, halvings=30, epsilon=0.0, batch_size=None),
    checks=dict(threshold=registry.positive, halvings=registry.int_at_least(0), epsilon=registry.nonnegative,
                batch_size=registry.optional(registry.int_at_least(1))),
    needs_aggregator=True, min_honest=3, draw=peers.draw_fang_krum,
    count_check=peers.check_fang_krum_counts)
_FANG_TRMEAN = _Spec("fang_trmean", peers.build_fang_trmean, defaults=dict(b=2.0),
                     checks=dict(b=_at_least_one), draw=peers.draw_uniform)
_SIGNGUARD_ADAPTIVE = _Spec(
    "signguard_adaptive", peers.build_signguard_adaptive, defaults=dict(magnitude="uniform"),
    checks=dict(magnitude=registry.choice("uniform", "median_norm")), draw=peers.draw_signguard)
_CLIPPED_CLUSTERING_ADAPTIVE = _Spec(
    "clipped_clustering_adaptive", peers.build_clipped_clustering_adaptive,
    defaults=dict(linkage="single", margin=0.1, scale=10.0),
    checks=dict(linkage=registry.choice("single", "complete", "average"), margin=registry.finite,
                scale=registry.positive),
    min_honest=2)

_BACKDOOR = _Spec(
    "backdoor", _build_boost,
    defaults=dict(size=3, position="bottom_right", target=0, fraction=1.0, boost=1.0),
    checks=dict(size=registry.int_at_least(1), position=registry.choice(*poisoning.POSITIONS),
                target=registry.int_at_least(0), fraction=_fraction, boost=registry.positive),
    uses_own_updates=True, poisoning=lambda boost, **o: poisoning.Trigger(**o))

# Every accepted attack name (lower case, "_" for "-") -> its spec. Aliases
# share their target's spec, whose `name` is the canonical one.
ATTACKS: dict[str, _Spec] = {
    "none": _Spec("none", _build_own, {}, {}, uses_own_updates=True),
    "lf": _Spec("lf", _build_own, {}, {}, uses_own_updates=True, flips_labels=True,
                poisoning=poisoning.LabelFlip),
    "backdoor": _BACKDOOR,
    "badnets": _BACKDOOR,               # FLPoison's class name, lowercased
    "sf": _Spec("sf", _build_sf, {}, {}, uses_own_updates=True),
    "ipm": _IPM,
    "empire": _IPM,
    "alie": _ALIE,
    "little": _ALIE,
    "mimic": _Spec("mimic", peers.build_mimic, defaults=dict(index=None),
                   checks=dict(index=registry.optional(registry.int_at_least(0)))),
    "gaussian": _Spec("gaussian", _build_gaussian, defaults=dict(sigma=1.0, center="mean"),
                      checks=dict(sigma=registry.nonnegative, center=registry.choice("mean", "zero")),
                      draw=_draw_gaussian),
    "inf": _Spec("inf", lambda: _build_constant(jnp.inf), {}, {}),
    "nan": _Spec("nan", lambda: _build_constant(jnp.nan), {}, {}),
    "optimal_ipm": _OPTIMAL_IPM,
    "optimal_alie": _OPTIMAL_ALIE,
    "min_max": _distance_spec("min_max"),
    "min_sum": _distance_spec("min_sum"),
    "fang_krum": _FANG_KRUM,
    "fangattack": _FANG_KRUM,           # FLPoison's class name, lowercased
    "fang_trmean": _FANG_TRMEAN,
    "fang_median": _FANG_TRMEAN,        # the paper attacks the median with the same rows
    "signguard_adaptive": _SIGNGUARD_ADAPTIVE,
    "clipped_clustering_adaptive": _CLIPPED_CLUSTERING_ADAPTIVE,
    "attackclippedclustering": _CLIPPED_CLUSTERING_ADAPTIVE,  # Blades' class name, lowercased
}


def shipped() -> dict[str, "_Spec"]:
  """The attack names (aliases included) that ftjax itself defines."""
  return {name: spec for name, spec in ATTACKS.items() if spec.module.startswith("ftjax.")}


# --------------------------------------------------------------------------
# Your own attacks: one function and one registration


def register(name: Optional[str] = None, *, uses_own_updates: bool = False,
             needs_aggregator: bool = False, min_honest: int = 1,
             aliases: tuple[str, ...] = ()) -> Callable:
  """Registers an attack under a name, so configs, sweeps and :func:`make_attack` can name it.

  The attack is one function, ``fn(honest, own, key, ctx, *, **options) ->
  Byzantine rows`` with leading axis ``ctx.num_byzantine``; its options and
  their defaults are its keyword-only parameters (each takes values of its
  default's type)::

    @attacks.register()
    def scaled_mean(honest, own, key, ctx, *, scale=-3.0):
      row = jax.tree.map(lambda h: scale * h.mean(0), honest)
      return jax.tree.map(lambda r: jnp.repeat(r[None], ctx.num_byzantine, 0), row)

    # config.attack.name = "scaled_mean"; config.attack.options.scaled_mean = {"scale": -5.0}

  Args:
    name: the attack's name (default: the function's name).
    uses_own_updates: the Byzantine workers compute honest updates of their
      own, passed as ``own`` (else ``own`` is None and their gradients are
      not computed).
    needs_aggregator: the attack reads ``ctx.aggregator``.
    min_honest: the fewest honest rows it is defined for.
    aliases: other names for it.

  Returns:
    A decorator that registers ``fn`` and returns it unchanged.
  """
  def decorator(fn: Callable) -> Callable:
    key = (name or fn.__name__).strip().lower().replace("-", "_")
    if key in ATTACKS:
      raise ValueError(f"An attack named {key!r} exists already; register yours under "
                       f"another name.")
    defaults = registry.options_from_signature(fn, 4, "(honest, own, key, ctx, *, ...)")

    def build(**options):
      return lambda honest, own, rng, ctx, h, f: fn(honest, own, rng, ctx, **options)

    checks = {opt: (lambda what, v, d=d: registry.check_like_default(what, v, d))
              for opt, d in defaults.items()}
    spec = _Spec(key, build, defaults, checks, uses_own_updates=uses_own_updates,
                 needs_aggregator=needs_aggregator, min_honest=min_honest, module=fn.__module__)
    for alias in (key,) + tuple(aliases):
      ATTACKS[alias.strip().lower().replace("-", "_")] = spec
    return fn

  return decorator

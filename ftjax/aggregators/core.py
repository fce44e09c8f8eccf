"""The :class:`Aggregator`, the tables of named rules, registration and the spec grammar.

Every named rule, built in or a user's, is a :class:`RuleInfo` in
:data:`AGGREGATORS` or :data:`META_AGGREGATORS`, put there by :func:`register`
(or a module's table, :func:`register_table`); :func:`make_aggregator` builds a
rule from its string spelling.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from optax.experimental import aggregating as optax_aggregating

from ftjax import kernels as kernels_lib
from ftjax import registry
from ftjax.aggregators import optax_adapter
from ftjax.aggregators import user_rules
from ftjax.aggregators import weighted
from ftjax.kernels import rows
from ftjax.aggregators import options as options_lib

PyTree = Any
Diagnostics = dict[str, jax.Array]
# (rows, key) -> (aggregate, diagnostics); rows is a pytree stacked on W.
RuleFn = Callable[[PyTree, Optional[jax.Array]], tuple[PyTree, Diagnostics]]


# --------------------------------------------------------------------------
# The Aggregator
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """A robust aggregation rule: ``agg(updates, key=None) -> (aggregate, diagnostics)``.

  Built by the rule functions of this module (:func:`cwtm`, :func:`ctma`, ...,
  :func:`rule` for a user-written function) or by :func:`make_aggregator`.
  Equal aggregators (same rules, f, options, inner rule, kernel set and, for a
  user-written rule, the same function) compute the same thing, so an
  aggregator can be a static argument of ``jax.jit``.

  Attributes:
    name: the rule's name, e.g. ``"ctma"``; a user-written rule's own name.
    f: number of Byzantine workers tolerated.
    options: the rule's options, sorted ``(name, value)`` pairs (every option,
      defaults included; ``dict(agg.options)`` gives the mapping).
    inner: the wrapped rule of a meta- or pre-aggregator, else None.
    kernels: kernel set of the :mod:`ftjax.kernels.rows` primitives while this
      rule runs: ``"auto"`` (the enclosing choice, else the backend's),
      ``"plain"`` or ``"cpu"``.
    fn: a user-written rule's function (None for the built-in rules).
  """
  name: str
  f: int
  options: tuple[tuple[str, Any], ...] = ()
  inner: Optional[Aggregator] = None
  kernels: str = "auto"
  fn: Optional[Callable[..., Any]] = None

  def __post_init__(self):
    _check_f(self.f)
    kernels_lib.check(self.kernels)
    if self.inner is not None and any(a.stateful for a in self.inner._layers()):
      raise ValueError(f"{self.inner.spec!r} keeps state across rounds, so it must be the "
                       f"outermost rule; {self.name!r} cannot wrap it.")

  def __repr__(self) -> str:
    opts = {a.name: dict(a.options) for a in self._layers() if a.options}
    return f"Aggregator({self.spec!r}, f={self.f}, options={opts}, kernels={self.kernels!r})"

  @property
  def spec(self) -> str:
    """Canonical spelling, e.g. ``"ctma(cwtm)"``."""
    return self.name if self.inner is None else f"{self.name}({self.inner.spec})"

  @property
  def stochastic(self) -> bool:
    """Whether a call needs a PRNG key (bucketing anywhere in the rule)."""
    return any(a.fn is None and _TABLE[a.name].stochastic for a in self._layers())

  @property
  def needs_server(self) -> bool:
    """Whether a layer reads the server's own update (``server=``; FLTrust's g0)."""
    return any(a.fn is None and _TABLE[a.name].server for a in self._layers())

  @property
  def stateful(self) -> bool:
    """Whether the rule keeps state across rounds (:meth:`init_state`, :meth:`update`)."""
    return self._initial_state(None) is not None

  def _initial_state(self, row_like: Any) -> Any:
    info = None if self.fn is not None else _TABLE[self.name]
    if info is None or info.state is None:
      return None
    if row_like is None:  # only whether there is a state: shapes do not matter
      row_like = jnp.zeros((1,))
    return info.state(row_like, **dict(self.options))

  def init_state(self, row_like: PyTree) -> PyTree:
    """The state before the first round: ``()`` for a stateless rule.

    Args:
      row_like: one row's pytree (e.g. the parameters), or its shapes.
    """
    state = self._initial_state(row_like)
    return () if state is None else state

  def update(self, updates: PyTree, key: jax.Array | None, state: PyTree, *,
             server: Any = None) -> tuple[PyTree, dict[str, jax.Array], PyTree]:
    """One round of a rule that keeps state: ``(aggregate, diagnostics, new_state)``.

    The optax-style contract of stateful rules (docs/aggregators.md): the
    state starts as :meth:`init_state` and is handed back every round. A
    stateless rule returns ``state`` unchanged, so the round treats every
    rule alike.
    """
    if not self.stateful:
      return (*self(updates, key, server=server), state)
    return self(updates, key, state=state, server=server)

  def with_kernels(self, name: str) -> Aggregator:
    """The same rule with kernel set ``name``.

    Inner rules whose kernel set is ``"auto"`` follow it.

    Args:
      name: ``"auto"``, ``"plain"`` or ``"cpu"``.

    Returns:
      The new :class:`Aggregator`.
    """
    return dataclasses.replace(self, kernels=kernels_lib.check(name))

  def _layers(self) -> list[Aggregator]:
    out, a = [], self
    while a is not None:
      out.append(a)
      a = a.inner
    return out

  def _apply(self, x: PyTree, key: jax.Array | None, state: Any = None, server: Any = None
             ) -> tuple[PyTree, Diagnostics]:
    """The rule's body on validated rows, under this rule's kernel set; ``server`` goes
    to the layers that read the server's update (:attr:`needs_server`)."""
    with kernels_lib.use(self.kernels):
      if self.fn is not None:
        return user_rules.call(self.fn, self.name, x, key)
      info = _TABLE[self.name]
      options = dict(self.options, **({"server": server} if info.server else {}))
      if state is not None:  # a stateful rule: (aggregate, diag, new_state)
        return info.body(x, key, f=self.f, state=state, **options)
      if self.inner is None:
        return info.body(x, key, f=self.f, **options)
      return info.body(_InnerRule(self.inner, server), x, key, f=self.f, **options)

  def _apply_with_distances(self, x: PyTree, key: jax.Array | None, server: Any = None
                            ) -> tuple[PyTree, Diagnostics, jax.Array | None]:
    """:meth:`_apply`, plus every row's squared distance [W] to the aggregate, or None.

    The distances come from rules that compute them anyway (the pairwise
    distances of krum and multikrum); for any other rule they are None and a
    caller that needs them makes its own pass over the rows.
    """
    if not self._knows_distances():
      return (*self._apply(x, key, server=server), None)
    with kernels_lib.use(self.kernels):
      return _TABLE[self.name].with_distances(x, key, f=self.f, **dict(self.options))

  def _knows_distances(self) -> bool:
    """Whether :meth:`_apply_with_distances` returns distances (not None)."""
    return (self.fn is None and self.inner is None
            and _TABLE[self.name].with_distances is not None)

  def _rows_needed(self, num_workers: int, robust: bool) -> list[tuple[str, int, int, str]]:
    """(name, rows it sees, least rows it needs, condition) for each layer."""
    out, n = [], num_workers
    for a in self._layers():
      if a.fn is not None:
        out.append((a.name, n, 1, "any W"))
        continue
      info, opts = _TABLE[a.name], dict(a.options)
      need = (info.robust_rows if robust else info.min_rows)(a.f, opts)
      out.append((a.name, n, need, info.requirement))
      if info.rows_after is not None:
        n = info.rows_after(n, a.f, opts)
    return out

  def _validate(self, num_workers: Any, robust: bool) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
      raise ValueError(f"The number of workers must be an integer >= 1, got {num_workers!r}; "
                       f"pass updates with a non-empty leading worker axis.")
    for name, n, need, requirement in self._rows_needed(num_workers, robust):
      if n < need:
        where = "" if n == num_workers else (
            f" (bucketing leaves {n} bucket means out of {num_workers} workers; "
            f"lower options['bucketing']['bucket_size'])")
        raise ValueError(
            f"{self.spec!r} with f={self.f} cannot run on {n} rows{where}: {name} needs "
            f"{requirement}, i.e. at least {need} rows; lower f to fewer Byzantine workers or "
            f"use more workers.")

  def check(self, num_workers: int) -> None:
    """Refuses a worker count for which the rule is not robust to f faults.

    Args:
      num_workers: W, the number of rows the aggregator will see.

    Raises:
      ValueError: a sentence saying what to change (e.g. cwtm needs W > 2f,
        bucketing f <= W/4, krum W > 2f + 2).
    """
    self._validate(num_workers, robust=True)

  def __call__(self, updates: PyTree, key: jax.Array | None = None, *,
               weights: Any = None, state: Any = None,
               server: Any = None) -> tuple[PyTree, dict[str, jax.Array]]:
    """Aggregates W worker rows.

    Args:
      updates: pytree whose leaves all share a leading worker axis W.
      key: PRNG key, required only by stochastic rules (bucketing).
      weights: optional nonnegative weight per row, [W] (e.g. example counts):
        the weighted version of the rule (:mod:`ftjax.aggregators.weighted`;
        avg, cwmed, cwtm and gm, optionally inside ctma). Equal weights give
        the unweighted result exactly.
      state: for a rule that keeps state (:attr:`stateful`), its state; the
        call then returns ``(aggregate, diagnostics, new_state)`` (use
        :meth:`update`). None runs a stateful rule from :meth:`init_state`,
        as in its first round, and returns the pair.
      server: for a rule that reads the server's own update
        (:attr:`needs_server`, e.g. fltrust), that update: one row's pytree
        (no worker axis). Required by such a rule, ignored by the others.

    Returns:
      (aggregate with the W axis removed, same structure and dtypes;
      diagnostics dict of fixed-shape arrays, possibly empty).

    Raises:
      ValueError: before tracing, for empty input, mismatched leading axes,
        non-float leaves, or too few rows to compute the rule at all. The
        stricter robustness conditions are in :meth:`check`.
    """
    leaves = jax.tree.leaves(updates)
    if not leaves:
      raise ValueError("updates is empty: pass a pytree of arrays stacked on a worker axis.")
    bare = [l for l in leaves if not jnp.ndim(l)]
    if bare:
      raise ValueError(f"A leaf of updates has no worker axis (a {type(bare[0]).__name__} of "
                       f"shape ()); every leaf needs the workers on axis 0, [W, ...].")
    shapes = {jnp.shape(l)[0] for l in leaves}
    if len(shapes) != 1:
      raise ValueError(f"Every leaf of updates needs the same leading worker axis; got leading "
                       f"sizes {sorted(map(str, shapes))}. Stack the workers' updates on axis 0.")
    for l in leaves:
      if not jnp.issubdtype(jnp.result_type(l), jnp.floating):
        raise ValueError(f"Aggregators need floating-point updates, got {jnp.result_type(l)}; "
                         f"cast the updates to float32 or float64.")
    if weights is not None:
      weighted.check(self)
    self._validate(shapes.pop(), robust=False)
    if self.stochastic and key is None:
      raise ValueError(f"{self.spec!r} is stochastic: pass a PRNG key, "
                       f"agg(updates, jax.random.key(seed)).")
    if self.needs_server:
      _check_server(self.spec, server, leaves)
    with kernels_lib.use(self.kernels):
      # The rows are computed once, not inside every pass over them.
      updates = rows.materialize(jax.tree.map(jnp.asarray, updates))
      if weights is not None:
        if self.stateful:
          raise ValueError(f"{self.spec!r} keeps state across rounds and has no weighted "
                           f"version.")
        return weighted.apply(self, updates, key, weights)
      if not self.stateful:
        return self._apply(updates, key, server=server)
      if state is None:
        return self._apply(updates, key, self.init_state(
            jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape[1:], l.dtype), updates)),
            server)[:2]
      return self._apply(updates, key, state, server)

  def as_optax(self, key: jax.Array | None = None) -> optax_aggregating.Aggregator:
    """Wraps the rule as an ``optax.experimental.aggregating.Aggregator``.

    Its ``update(per_worker_updates, state)`` returns
    ``((aggregate, diagnostics), state)``, the auxiliary-output convention of
    ``optax.experimental.aggregating.process(..., aggregator_has_aux=True)``,
    which passes the diagnostics on to the postprocessor as extra arguments::

      tx = aggregating.process(optax.identity(), rule.as_optax(), optax.sgd(0.1),
                               aggregator_has_aux=True)

    Args:
      key: PRNG key for stochastic rules (default ``jax.random.key(0)``); each
        update folds in its count.

    Returns:
      The optax aggregator; its state is an
      :class:`~ftjax.aggregators.optax_adapter.AggregatorState`.
    """
    return optax_adapter.as_optax(self, key)


class _InnerRule:
  """The rule a meta-aggregator wraps, as a :data:`RuleFn`.

  Calling it runs the inner rule; ``with_distances`` also returns every row's
  squared distance to its output where the rule knows them (else None).
  """

  def __init__(self, agg: Aggregator, server: Any = None):
    self._agg, self._server = agg, server

  def __call__(self, x: PyTree, key: jax.Array | None) -> tuple[PyTree, Diagnostics]:
    return self._agg._apply(x, key, server=self._server)

  def with_distances(self, x: PyTree, key: jax.Array | None
                     ) -> tuple[PyTree, Diagnostics, jax.Array | None]:
    return self._agg._apply_with_distances(x, key, self._server)

  @property
  def knows_distances(self) -> bool:
    """Whether ``with_distances`` returns the distances rather than None."""
    return self._agg._knows_distances()


def _check_server(spec: str, server: Any, leaves: list) -> None:
  """Refuses a missing server update, or one not shaped like a row of the updates."""
  given, row = [jnp.shape(l) for l in jax.tree.leaves(server)], [jnp.shape(l)[1:] for l in leaves]
  if server is None or given != row:
    raise ValueError(f"{spec!r} weighs the rows against the server's own update: pass it as "
                     f"server=..., shaped like one row of the updates (leaves {row}), got "
                     f"{'none' if server is None else given}; in a run set "
                     f"data.server_examples > 0.")


# --------------------------------------------------------------------------
# Public rules
# --------------------------------------------------------------------------


def _check_f(f: Any) -> None:
  if not isinstance(f, int) or isinstance(f, bool) or f < 0:
    raise ValueError(f"f (the number of Byzantine workers) must be an integer >= 0, got {f!r}.")


def _base(name: str, f: int, **options) -> Aggregator:
  _check_f(f)
  for key, value in options.items():
    _check_option(name, key, value)
  return Aggregator(name=name, f=f, options=tuple(sorted(options.items())))


def _meta(name: str, inner: Union[Aggregator, Callable], f: int | None, **options) -> Aggregator:
  if not isinstance(inner, Aggregator):
    inner = rule(inner, f=0 if f is None else f)
  f = inner.f if f is None else f
  _check_f(f)
  for key, value in options.items():
    _check_option(name, key, value)
  return Aggregator(name=name, f=f, options=tuple(sorted(options.items())), inner=inner)


def rule(fn: Callable, f: int = 0, name: str | None = None) -> Aggregator:
  """Wraps a user-written rule as an :class:`Aggregator`.

  ``fn`` is either a function of the updates alone, ``updates -> aggregate``,
  or of two positional arguments, ``(updates, key) -> (aggregate,
  diagnostics)``. It can call the :mod:`ftjax.kernels.rows` primitives, which
  then run with the kernel set of the aggregator around it. Two wrappers of
  the same function (and f, name) are equal.

  Args:
    fn: the rule, over pytrees stacked on a leading worker axis.
    f: number of Byzantine workers it tolerates (what meta-aggregators that
      wrap it use by default).
    name: its name in :attr:`Aggregator.spec` (default ``fn.__name__``).

  Returns:
    The :class:`Aggregator`; ``fn`` itself when it already is one.
  """
  if isinstance(fn, Aggregator):
    return fn
  if not callable(fn):
    raise ValueError(f"A rule must be a function updates -> aggregate or (updates, key) -> "
                     f"(aggregate, diagnostics), got {fn!r}.")
  if name is None:
    name = getattr(fn, "__name__", type(fn).__name__)
  return Aggregator(name=str(name), f=f, fn=fn)



# --------------------------------------------------------------------------
# Tables: names, options, validation
# --------------------------------------------------------------------------


class RuleInfo(NamedTuple):
  """A named rule: its builder, body, default options and row requirements."""
  build: Callable[..., Aggregator]     # the public rule function
  body: Callable[..., Any]             # ([inner,] x, key, *, f, **options) -> (aggregate, diag)
  options: Mapping[str, Any]           # option name -> default (the builder's defaults)
  min_rows: Callable[[int, Mapping[str, Any]], int]    # f, options -> least W computable
  robust_rows: Callable[[int, Mapping[str, Any]], int]  # least W it is meant for
  requirement: str                     # the robust condition, in words
  # Base rules only, optional: (x, key, *, f, **options) -> (aggregate, diag,
  # [W] squared distance of every row to the aggregate), for rules that know
  # those distances without another pass over the rows (ctma uses them).
  with_distances: Optional[Callable[..., Any]] = None
  stochastic: bool = False             # a call needs a PRNG key
  # Rows the inner rule of a meta-aggregator sees: (W, f, options) -> rows.
  rows_after: Optional[Callable[[int, int, Mapping[str, Any]], int]] = None
  check: Optional[Callable[..., None]] = None  # (**options) -> None, raises ValueError
  meta: bool = False                   # wraps an inner rule
  registered: bool = False             # by register(): options checked against their defaults
  # Rules that keep state across rounds: (row_like, **options) -> the initial
  # state, or None when these options make the rule stateless. A stateful
  # body takes ``state=`` and returns (aggregate, diag, new_state).
  state: Optional[Callable[..., Any]] = None
  # Rules that read the server's own update (FLTrust's g0): the body takes ``server=``,
  # and the round computes that update only for them (Aggregator.needs_server).
  server: bool = False


def _info(build, body, min_rows, robust_rows, requirement, with_distances=None,
          **more) -> RuleInfo:
  # The builder's keyword defaults are the one source of each option's default.
  defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()
              if name not in ("inner", "f")}
  return RuleInfo(build, body, types.MappingProxyType(defaults), min_rows, robust_rows,
                  requirement, with_distances, **more)


def _half(f, o):
  return 2 * f + 1


def _any(f, o):
  return 1


def _above(f, o):
  return f + 1



AGGREGATORS: dict[str, RuleInfo] = {}
"""Base rules: name -> :class:`RuleInfo` (filled by :mod:`.base` and by :func:`register`)."""

META_AGGREGATORS: dict[str, RuleInfo] = {}
"""Meta- and pre-aggregators (wrapping an inner rule): name -> :class:`RuleInfo`."""

_TABLE = collections.ChainMap(AGGREGATORS, META_AGGREGATORS)  # every rule, a live view



def shipped(table: Mapping[str, RuleInfo]) -> dict[str, RuleInfo]:
  """The rules of ``table`` that ftjax itself defines (not a user's registered ones)."""
  return {name: info for name, info in table.items()
          if info.build.__module__.startswith("ftjax.")}


def options_of(name: str) -> Mapping[str, Any]:
  """A rule's options and their defaults, built-in or registered."""
  return _TABLE[_canonical(name)].options


# --------------------------------------------------------------------------
# Your own rules: one function and one registration
# --------------------------------------------------------------------------


def register(name: Optional[str] = None, *, meta: bool = False, min_rows: int | Callable = 1,
             robust_rows: Optional[int | Callable] = None, requirement: str = "any W",
             stochastic: bool = False, check: Optional[Callable[..., None]] = None,
             aliases: tuple[str, ...] = (),
             with_distances: Optional[Callable[..., Any]] = None,
             state: Optional[Callable[..., Any]] = None, server: bool = False) -> Callable:
  """Registers a rule under a name, so specs, configs and sweeps can name it.

  The rule is one function, ``body(updates, key, *, f, **options) ->
  (aggregate, diagnostics)`` (a meta-aggregator takes the inner rule first,
  ``body(inner, updates, key, *, f, **options)``, and calls ``inner(updates,
  key)``); its options and their defaults are its keyword-only parameters::

    @aggregators.register(requirement="W > 2f", robust_rows=lambda f, o: 2 * f + 1)
    def trimmed_norm(updates, key, *, f, keep=0.5):
      ...
      return aggregate, {}

    make_aggregator("ctma(trimmed_norm)", f=4)      # or in a config:
    # config.aggregator.name = "trimmed_norm"; config.aggregator.options.trimmed_norm = {...}

  Args:
    name: the rule's name (default: the function's name).
    meta: whether it wraps an inner rule.
    min_rows: the fewest rows it can compute on, an int or ``(f, options) -> int``.
    robust_rows: the fewest rows it is robust on (default ``min_rows``).
    requirement: that condition in words, for error messages and ``ftjax list``.
    stochastic: whether a call needs the PRNG key.
    check: ``check(**options)`` raising ValueError for bad option values;
      without it each option must have the type of its default.
    aliases: other names for it.
    with_distances: optional, for a base rule: the body that also returns
      every row's squared distance [W] to the aggregate, when the rule has
      them anyway (:func:`ctma` then skips its own distance pass).
    state: for a rule that keeps state across rounds, ``state(row_like,
      **options)`` returning the state before the first round (or None when
      those options make the rule stateless); the body then also takes
      ``state=`` and returns ``(aggregate, diagnostics, new_state)``. The
      round carries the state in ``TrainState.aggregator_state`` and the
      checkpoints (:meth:`Aggregator.update`).
    server: the rule reads the server's own update (FLTrust's g0, computed by
      the round on the server's examples, ``data.server_examples``); the body
      takes ``server=`` (one row's pytree).

  Returns:
    A decorator returning a builder: ``builder(f=..., **options)`` (for a
    meta-aggregator ``builder(inner, f=None, **options)``) makes the
    :class:`Aggregator`.
  """
  def as_rows(value):
    return value if callable(value) else (lambda f, o: value)

  def decorator(body: Callable) -> Callable:
    rule_name = _canonical(name or body.__name__)
    if rule_name in _TABLE or rule_name in ALIASES:
      raise ValueError(f"A rule named {rule_name!r} exists already; register yours under "
                       f"another name.")
    shape = "(inner, updates, key, *, f, ...)" if meta else "(updates, key, *, f, ...)"
    options = registry.options_from_signature(body, 3 if meta else 2, shape, keyword="f")
    if state is not None:
      options.pop("state", None)  # the round's state, not an option
    if server:
      options.pop("server", None)  # the round's server update, not an option

    def builder(*args, f: Optional[int] = None if meta else 0, **given):
      return (_meta if meta else lambda n, f, **o: _base(n, f, **o))(
          rule_name, *args, f=f, **{**options, **given})

    builder.__name__, builder.__doc__, builder.__module__ = (rule_name, body.__doc__,
                                                             body.__module__)
    info = RuleInfo(builder, body, types.MappingProxyType(options), as_rows(min_rows),
                    as_rows(robust_rows if robust_rows is not None else min_rows), requirement,
                    with_distances=with_distances, stochastic=stochastic, check=check,
                    meta=meta, registered=True, state=state, server=server)
    (META_AGGREGATORS if meta else AGGREGATORS)[rule_name] = info
    for alias in aliases:
      ALIASES[_canonical(alias)] = rule_name
    return builder

  return decorator

ALIASES: dict[str, str] = {"rfa": "gm"}
"""Other spellings accepted in specs and options."""

def register_table(rules: Mapping[str, Mapping[str, Any]],
                   aliases: Mapping[str, str] = types.MappingProxyType({})) -> None:
  """Registers a module's table of rules, one line each: name -> :func:`register`'s arguments
  plus ``body`` (and ``options``, which must equal the body's keyword defaults)."""
  for name, entry in rules.items():
    entry = dict(entry)
    body, options = entry.pop("body"), entry.pop("options", None)
    own = tuple(a for a, target in aliases.items() if target == name)
    register(name, aliases=own, **entry)(body)
    if options is not None and dict(options) != dict(_TABLE[name].options):
      raise ValueError(f"The table's options for {name!r} differ from its body's defaults.")


def canonical(name: str) -> str:
  """A rule's canonical name: lower case, aliases resolved (``rfa`` -> ``gm``)."""
  name = name.strip().lower()
  return ALIASES.get(name, name)


_canonical = canonical


def _check_option(rule_name: str, name: str, value: Any) -> None:
  options_lib.check(_TABLE.get(rule_name), rule_name, name, value)
